"""The distributed LLM against one local process, all in one run. Prints one JSON object.

On SmolLM2-135M (fp32 unless --dtype), with a 3-stage swarm on a local Ray:

- decode latency per token: local transformers ``generate`` vs the swarm (ratio), and vs
  a bare chain of Ray actors holding the same blocks (what Ray itself costs here);
- aggregate tokens/s of 8 concurrent sessions vs 1 (batching);
- hidden-state bytes per hop with blockwise-8 compression vs without;
- greedy agreement of the compressed swarm with the exact one;
- failover: time to recover when a server is killed mid-generation;
- weight memory and decode speed of one stage with int8 / nf4 weights.

Ratios are taken against a baseline measured in the same run, interleaved, because the
machine is shared and absolute times drift.

    .venv/bin/python benchmarks/llm_pipeline.py [--tokens 64] [--repeats 3] [--sessions 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

from rayfin.llm import DistributedCausalLM, Swarm, launch_swarm, load_local_model
from rayfin.llm.swarm import SERVER_ENV, stage_bounds

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the stock market.",
    "Explain what a futures contract is in one sentence.",
    "List three risks of high-frequency trading.",
    "What is the square root of 144?",
    "Summarise: the central bank raised rates by 25 basis points.",
    "Translate to French: good morning, traders.",
    "Why is diversification useful?",
]

# More text for the agreement measurement: one greedy flip in 8 x 32 tokens is 0.4 %, too
# coarse for a 99 % goal, so agreement is taken over these plus PROMPTS (38 x 48 tokens).
MORE_PROMPTS = [
    "Once upon a time, in a small village,",
    "The Federal Reserve announced today that",
    "def fibonacci(n):",
    "In 1969, the first humans",
    "The best way to learn a language is",
    "Bitcoin fell sharply after",
    "Photosynthesis is the process by which",
    "The recipe calls for two cups of",
    "Shares of Apple rose 3% after the company",
    "My favourite book is",
    "The theory of relativity states that",
    "To install the package, run",
    "Oil prices climbed on reports that",
    "The quick brown fox",
    "Machine learning models can overfit when",
    "The weather in London is usually",
    "A good risk manager always",
    "Dear customer, we regret to inform you",
    "The E-mini S&P 500 futures contract",
    "Water boils at",
    "In the first quarter, revenue grew",
    "The main causes of the French Revolution were",
    "Python is a programming language that",
    "Inflation data released on Tuesday showed",
    "The cat sat on the",
    "Three tips for a good night's sleep:",
    "The central bank is expected to",
    "Gold is often considered a safe haven because",
    "Yesterday the market closed",
    "The solar system consists of",
]


def _median_per_token(run: Callable[[int], float], tokens: int, repeats: int) -> float:
    """Decode seconds per token: a long run minus a one-token run (which pays the prefill)."""
    samples = [(run(tokens + 1) - run(1)) / tokens for _ in range(repeats)]
    return statistics.median(samples)


def _timed(fn: Callable[[], Any]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


class _BareStage:
    """Blocks in a plain Ray actor: no sessions, caches, batching, routing or failover.

    A chain of these is the floor for any pipeline of Ray actors on this machine: what the
    calls and the processes cost, whatever runs in them.
    """

    def __init__(self, model: str, start: int, end: int) -> None:
        from rayfin.llm.blocks import BlockSpan
        from rayfin.llm.checkpoint import load_blocks, load_config
        from rayfin.llm.loading import resolve_model_path

        path = resolve_model_path(model)
        layers, rotary = load_blocks(path, load_config(path), start, end, torch.float32)
        self.span = BlockSpan(layers, rotary, start)
        self.positions = torch.zeros(1, 1, dtype=torch.long)

    def forward(self, hidden: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.span.forward(torch.tensor(hidden), self.positions).numpy()


def bare_pipeline(model: str, local, num_stages: int) -> Callable[[torch.Tensor, int], None]:
    """Greedy decoding through ``num_stages`` bare actors (no KV cache: each step feeds one
    token, which costs the blocks what a cached step does at these lengths)."""
    stage = ray.remote(_BareStage).options(num_cpus=0.5, runtime_env={"env_vars": SERVER_ENV})
    stages = [stage.remote(model, a, b) for a, b in stage_bounds(local.config.num_hidden_layers, 3)]
    embed, norm, head = local.model.embed_tokens, local.model.norm, local.lm_head

    def run(ids: torch.Tensor, n: int) -> None:
        token = ids[:, -1:]
        with torch.no_grad():
            for _ in range(n):
                hidden = embed(token).numpy()
                for actor in stages:
                    hidden = ray.get(actor.forward.remote(hidden))
                token = head(norm(torch.tensor(hidden))).argmax(-1)

    return run


def decode_latency(local, client, bare, ids, tokens: int, repeats: int) -> dict[str, float]:
    def run_local(n: int) -> float:
        return _timed(
            lambda: local.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
            )
        )

    def run_swarm(n: int) -> float:
        return _timed(lambda: client.generate(ids, max_new_tokens=n, eos_token_id=[]))

    def run_bare(n: int) -> float:
        return _timed(lambda: bare(ids, n))

    run_local(4), run_swarm(4), run_bare(4)  # warm up every path
    local_s, swarm_s, bare_s = [], [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits all alike
        local_s.append(_median_per_token(run_local, tokens, 1))
        swarm_s.append(_median_per_token(run_swarm, tokens, 1))
        bare_s.append(_median_per_token(run_bare, tokens, 1))
    local_ms = statistics.median(local_s) * 1e3
    swarm_ms = statistics.median(swarm_s) * 1e3
    bare_ms = statistics.median(bare_s) * 1e3
    return {
        "local_generate_ms_per_token": round(local_ms, 2),
        "swarm_ms_per_token": round(swarm_ms, 2),
        "swarm_vs_local_ratio": round(swarm_ms / local_ms, 3),
        "bare_ray_pipeline_ms_per_token": round(bare_ms, 2),
        "bare_ray_pipeline_vs_local_ratio": round(bare_ms / local_ms, 3),
        "swarm_vs_bare_ray_pipeline_ratio": round(swarm_ms / bare_ms, 3),
    }


def concurrency(
    client: DistributedCausalLM, tokenizer, tokens: int, sessions: int
) -> dict[str, Any]:
    prompts = [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
    prompts = [prompts[i % len(prompts)] for i in range(sessions)]

    def one(i: int) -> None:
        client.generate(prompts[i], max_new_tokens=tokens, eos_token_id=[])

    one(0)
    single_s = min(_timed(lambda: one(0)) for _ in range(2))

    def many() -> None:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    before = client._cohort.batches
    many_s = min(_timed(many) for _ in range(2))
    cohort_steps = client._cohort.batches - before
    single = tokens / single_s
    aggregate = sessions * tokens / many_s
    return {
        "sessions": sessions,
        "single_session_tokens_per_s": round(single, 2),
        "concurrent_aggregate_tokens_per_s": round(aggregate, 2),
        "concurrent_vs_single_ratio": round(aggregate / single, 2),
        # Session steps per client cohort step (8 when the sessions stay in step).
        "mean_cohort_size": round(2 * sessions * tokens / cohort_steps, 2),
    }


def batching_ceiling(local, sessions: int) -> dict[str, Any]:
    """What batching can gain at best on this machine: one decode step of the model body
    for ``sessions`` rows against one row, in this process, no Ray involved."""
    from transformers import DynamicCache

    def step_s(rows: int) -> float:
        ids = torch.randint(0, local.config.vocab_size, (rows, 32))
        with torch.no_grad():
            cache = DynamicCache(config=local.config)
            local.model(ids, past_key_values=cache, use_cache=True)
            nxt = torch.randint(0, local.config.vocab_size, (rows, 1))
            times = sorted(
                _timed(lambda: local.model(nxt, past_key_values=cache, use_cache=True))
                for _ in range(8)
            )
        return statistics.median(times)

    one, many = step_s(1), step_s(sessions)
    return {
        f"body_step_ms_batch_{sessions}": round(many * 1e3, 1),
        "body_step_ms_batch_1": round(one * 1e3, 1),
        "cost_ratio": round(many / one, 2),
        "throughput_ceiling_ratio": round(sessions * one / many, 2),
    }


def traffic(
    client: DistributedCausalLM, compressed: DistributedCausalLM, ids, tokens: int
) -> dict[str, Any]:
    """Bytes of hidden states actually sent and received per hop, in one generation each."""
    out: dict[str, Any] = {}
    for name, model in (("fp32", client), ("blockwise8", compressed)):
        with model.inference_session(ids.shape[1] + tokens) as session:
            prefill = model.generate(ids, max_new_tokens=1, eos_token_id=[], session=session)
            b = session.blocks
            prefill_bytes, prefill_hops = b.bytes_sent + b.bytes_received, b.hops
            model.generate(None, max_new_tokens=tokens, eos_token_id=[], session=session)
            decode_bytes = b.bytes_sent + b.bytes_received - prefill_bytes
            decode_hops = b.hops - prefill_hops
        assert prefill.shape[1] == ids.shape[1] + 1
        # Each hop carries the hidden state there and back: count one direction.
        out[f"{name}_decode_bytes_per_hop"] = round(decode_bytes / decode_hops / 2, 1)
        out[f"{name}_prefill_bytes_per_hop"] = round(prefill_bytes / prefill_hops / 2, 1)
    out["decode_bytes_ratio"] = round(
        out["blockwise8_decode_bytes_per_hop"] / out["fp32_decode_bytes_per_hop"], 4
    )
    out["prefill_bytes_ratio"] = round(
        out["blockwise8_prefill_bytes_per_hop"] / out["fp32_prefill_bytes_per_hop"], 4
    )
    return out


def agreement(local, client, compressed, tokenizer, tokens: int) -> dict[str, Any]:
    """Greedy agreement of the compressed swarm with the exact model.

    Teacher-forced: along each greedy continuation of the local model, the share of
    positions where a swarm picks the same next token, and the mean KL divergence of its
    next-token distribution from the local one. The exact (uncompressed) swarm is measured
    the same way as a control. Free-running: the share of the first prompts' sequences that
    the compressed swarm generates identically end to end (one early flip changes
    everything after it).
    """
    agree = {"exact": 0, "blockwise8": 0}
    kl = {"exact": 0.0, "blockwise8": 0.0}
    total = identical = 0
    for prompt in PROMPTS + MORE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            reference = local.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False
            )
            expected = local(reference[:, :-1]).logits[0, ids.shape[1] - 1 :].log_softmax(-1)
        target = reference[0, ids.shape[1] :]
        for name, model in (("exact", client), ("blockwise8", compressed)):
            logits = model(reference[:, :-1]).logits[0, ids.shape[1] - 1 :].log_softmax(-1)
            agree[name] += int((logits.argmax(-1) == target).sum())
            kl[name] += float(
                torch.nn.functional.kl_div(logits, expected, log_target=True, reduction="sum")
            )
        total += len(target)
        if prompt in PROMPTS:
            free = compressed.generate(ids, max_new_tokens=tokens, eos_token_id=[])
            identical += int(torch.equal(free, reference))
    share = agree["blockwise8"] / total
    low, high = _wilson(share, total)
    return {
        "positions": total,
        "greedy_agreement_teacher_forced": round(share, 4),
        "agreement_95ci": [round(low, 4), round(high, 4)],
        "mean_kl": f"{kl['blockwise8'] / total:.2e}",
        "exact_swarm_agreement": round(agree["exact"] / total, 4),
        "exact_swarm_mean_kl": f"{kl['exact'] / total:.2e}",
        "identical_free_running_sequences": f"{identical}/{len(PROMPTS)}",
    }


def _wilson(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((share * (1 - share) + z * z / (4 * n)) / n) ** 0.5 / (1 + z * z / n)
    return centre - half, centre + half


def failover(swarm: Swarm, client: DistributedCausalLM, ids, tokens: int) -> dict[str, Any]:
    """Kill the server of the middle stage halfway through a generation; a replica takes over."""
    start, end = stage_bounds(swarm.spec.num_blocks, 3)[1]
    swarm.add_server(start, end, server_id="replica-1", num_cpus=0.5)
    expected = client.generate(ids, max_new_tokens=tokens, eos_token_id=[])
    steps: list[float] = []
    pieces: list[torch.Tensor] = []

    def step(session) -> None:
        pieces.append(client.generate(None, max_new_tokens=1, eos_token_id=[], session=session))

    with client.inference_session(ids.shape[1] + tokens) as session:
        pieces.append(
            client.generate(ids, max_new_tokens=tokens // 2, eos_token_id=[], session=session)
        )
        victim = session.blocks.chain[1].server_id
        handle = next(r.handle for r in swarm.servers() if r.server_id == victim)
        for _ in range(3):  # normal steps, for the baseline
            steps.append(_timed(lambda: step(session)))
        ray.kill(handle)
        recovery = _timed(lambda: step(session))
        pieces.append(
            client.generate(
                None, max_new_tokens=tokens - tokens // 2 - 4, eos_token_id=[], session=session
            )
        )
        new_server = session.blocks.chain[1].server_id
    full = torch.cat(pieces, dim=1)
    normal = statistics.median(steps)
    return {
        "killed": victim,
        "replaced_by": new_server,
        "history_tokens_replayed": ids.shape[1] + tokens // 2 + 3,
        "normal_step_ms": round(normal * 1e3, 1),
        "recovery_step_ms": round(recovery * 1e3, 1),
        "failover_recovery_s": round(recovery - normal, 3),
        "tokens_identical_to_clean_run": bool(torch.equal(full, expected)),
    }


def quantized_stage(model: str, ids, tokens: int) -> dict[str, Any]:
    """Weights and decode time of blocks [0, 10) served fp32, int8 and nf4."""
    out: dict[str, Any] = {}
    for method in (None, "int8", "nf4"):
        name = f"q-{method or 'fp32'}"
        swarm = launch_swarm(model, name=name, quantization=method, num_cpus=0.5)
        try:
            (info,) = swarm.status()
            out[f"{method or 'fp32'}_weight_mb"] = round(info.weight_bytes / 2**20, 1)
            out[f"{method or 'fp32'}_block_decode_ms"] = round(info.block_latency_s * 1e3, 3)
        finally:
            swarm.shutdown()
    out["int8_weight_ratio"] = round(out["int8_weight_mb"] / out["fp32_weight_mb"], 3)
    out["nf4_weight_ratio"] = round(out["nf4_weight_mb"] / out["fp32_weight_mb"], 3)
    return out


SECTIONS = ("decode", "concurrency", "traffic", "agreement", "failover", "quantized")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)})",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    if unknown := only - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    dtype = getattr(torch, args.dtype)
    local, tokenizer = load_local_model(args.model, dtype=dtype)
    local.generation_config.eos_token_id = None
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        num_cpus=max(8, os.cpu_count() or 1),
    )
    begin = time.perf_counter()
    swarm = launch_swarm(args.model, name="bench", num_stages=3, dtype=args.dtype, num_cpus=0.5)
    squeezed = launch_swarm(
        args.model,
        name="bench-c8",
        num_stages=3,
        dtype=args.dtype,
        compression="blockwise8",
        num_cpus=0.5,
    )
    launch_s = time.perf_counter() - begin
    client = DistributedCausalLM.from_pretrained(args.model, swarm=swarm, dtype=dtype)
    compressed = DistributedCausalLM.from_pretrained(args.model, swarm=squeezed, dtype=dtype)
    result: dict[str, Any] = {
        "benchmark": "llm_pipeline",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
        "model": args.model,
        "dtype": args.dtype,
        "stages": 3,
        "launch_two_swarms_s": round(launch_s, 1),
    }
    if "decode" in only:
        bare = bare_pipeline(args.model, local, 3)
        result["decode"] = decode_latency(local, client, bare, ids, args.tokens, args.repeats)
    if "concurrency" in only:
        result["concurrency"] = concurrency(client, tokenizer, args.tokens // 2, args.sessions)
        result["concurrency"]["ceiling"] = batching_ceiling(local, args.sessions)
    if "traffic" in only:
        result["traffic"] = traffic(client, compressed, ids, args.tokens // 2)
    if "agreement" in only:
        result["compression_agreement"] = agreement(local, client, compressed, tokenizer, 48)
    squeezed.shutdown()
    if "failover" in only:
        result["failover"] = failover(swarm, client, ids, 32)
    swarm.shutdown()
    if "quantized" in only:
        result["quantized_stage"] = quantized_stage(args.model, ids, args.tokens)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
