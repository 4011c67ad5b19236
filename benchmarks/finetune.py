"""Distributed LoRA training vs local peft on the same model, in one run. Prints JSON.

Both train a rank-8 LoRA adapter on ``q_proj`` and ``v_proj`` of every block of
SmolLM2-135M with AdamW, the same batches (causal-LM loss on ``--batch`` rows of
``--length`` tokens) and the same number of steps:

* ``local_peft``: transformers + peft in this process (the baseline);
* ``distributed``: :class:`rayfin.llm.DistributedCausalLM` with a client-held adapter on
  a 3-stage swarm of block servers on a local Ray (forward, then a backward per stage that
  recomputes the stage's forward);
* ``distributed_blockwise8``: the same, with hidden states and gradients compressed on
  the wire.

Reported per setting: steps/s, the ratio to local peft, and bytes sent and received per
step (hidden states, gradients and adapter matrices). The losses of the first steps are
printed too: peft's and the uncompressed swarm's agree.

    .venv/bin/python benchmarks/finetune.py [--steps 8] [--batch 8] [--length 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import ray
import torch
import torch.nn.functional as F

from rayfin.llm import DistributedCausalLM, launch_swarm, load_local_model
from rayfin.llm.finetune import hidden_states
from rayfin.llm.lora import tensors_bytes

MODEL = "smollm2-135m"
RANK, ALPHA, TARGETS = 8, 16.0, ("q_proj", "v_proj")


def batches(steps: int, batch: int, length: int, vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab, (batch, length), generator=generator) for _ in range(steps)]


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def local_peft(data: list[torch.Tensor]) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    base, _ = load_local_model(MODEL)
    model = get_peft_model(
        base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    begin = time.perf_counter()
    for ids in data:
        loss = _loss(model(ids).logits, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - begin
    return {"steps_per_s": len(data) / seconds, "seconds": seconds, "losses": losses[:3]}


def distributed(data: list[torch.Tensor], compression: str | None) -> dict[str, Any]:
    name = f"finetune-{compression or 'exact'}"
    swarm = launch_swarm(MODEL, name=name, num_stages=3, num_cpus=0.5, compression=compression)
    try:
        client = DistributedCausalLM.from_pretrained(MODEL, swarm=swarm)
        adapter = client.add_lora(RANK, ALPHA, TARGETS)
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
        # One untimed step: routing's first look at the servers, and their warm-up.
        warm = data[0][:1, :8]
        _loss(client.lm_head(hidden_states(client, warm)), warm).backward()
        adapter.zero_grad(set_to_none=True)
        sent, received = client.backprop.bytes_sent, client.backprop.bytes_received
        losses = []
        begin = time.perf_counter()
        for ids in data:
            loss = _loss(client.lm_head(hidden_states(client, ids)), ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        seconds = time.perf_counter() - begin
        steps = len(data)
        return {
            "steps_per_s": steps / seconds,
            "seconds": seconds,
            "bytes_sent_per_step": (client.backprop.bytes_sent - sent) / steps,
            "bytes_received_per_step": (client.backprop.bytes_received - received) / steps,
            "recoveries": client.backprop.recoveries,
            # What one copy of each thing costs on the wire, for reading the totals.
            "adapter_bytes": tensors_bytes(adapter.state_tensors()),
            "hidden_state_bytes": data[0].numel() * client.config.hidden_size * 4,
            "losses": losses[:3],
        }
    finally:
        swarm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        data = batches(args.steps, args.batch, args.length, 49152)
        results: dict[str, Any] = {
            "model": MODEL,
            "lora": {"rank": RANK, "alpha": ALPHA, "targets": list(TARGETS)},
            "batch": args.batch,
            "length": args.length,
            "steps": args.steps,
            "cpus": os.cpu_count(),
            "local_peft": local_peft(data),
        }
        for label, compression in (("distributed", None), ("distributed_blockwise8", "blockwise8")):
            results[label] = distributed(data, compression)
            results[label]["ratio_to_local"] = (
                results[label]["steps_per_s"] / results["local_peft"]["steps_per_s"]
            )
        exact = results["distributed"]
        results["blockwise8_bytes_ratio"] = (
            results["distributed_blockwise8"]["bytes_sent_per_step"] / exact["bytes_sent_per_step"]
        )
    finally:
        ray.shutdown()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
