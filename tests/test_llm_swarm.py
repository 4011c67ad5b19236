"""The distributed LLM on a real local Ray: exactness, sessions, failover, routing, batching,
cache limits, compression and quantized weights, on tiny models of real architectures."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayfin.errors import CacheFullError, LLMError, SessionError, UnsupportedModelError
from rayfin.llm import DistributedCausalLM, Swarm, launch_swarm
from rayfin.testing import tiny_causal_lm

pytestmark = pytest.mark.integration

# Tiny servers need little of Ray's CPU accounting; the test Ray has 2 CPUs.
CPUS = 0.1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("llm") / "tiny-llama")


@pytest.fixture(scope="module")
def local(tiny: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def swarm(ray_local: None, tiny: Path) -> Iterator[Swarm]:
    swarm = launch_swarm(str(tiny), name="t-main", num_stages=2, replicas=2, num_cpus=CPUS)
    yield swarm
    swarm.shutdown()


@pytest.fixture(scope="module")
def client(swarm: Swarm, tiny: Path) -> DistributedCausalLM:
    return DistributedCausalLM.from_pretrained(tiny, swarm=swarm)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _record(swarm: Swarm, server_id: str):
    return next(r for r in swarm.servers() if r.server_id == server_id)


def test_remote_logits_match_the_local_model(client: DistributedCausalLM, local) -> None:
    ids = _ids(2, 20)
    with torch.no_grad():
        expected = local(ids).logits
    torch.testing.assert_close(client(ids).logits, expected, atol=1e-3, rtol=0)


def test_session_steps_equal_a_full_forward(client: DistributedCausalLM, local) -> None:
    ids = _ids(1, 16, seed=1)
    with torch.no_grad():
        expected = local(ids).logits
    with client.inference_session(max_length=32) as session:
        chunks = [session.step(ids[:, a:b]) for a, b in [(0, 7), (7, 8), (8, 9), (9, 16)]]
        assert session.position == 16
        assert len(session.blocks.chain) == 2
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, atol=1e-3, rtol=0)


def test_greedy_generation_equals_transformers(client: DistributedCausalLM, local) -> None:
    ids = _ids(2, 6, seed=2)
    expected = local.generate(ids, max_new_tokens=32, do_sample=False)
    got = client.generate(ids, max_new_tokens=32, eos_token_id=[])
    assert torch.equal(got, expected)


def test_sampling_is_seeded_and_stops_where_asked(client: DistributedCausalLM, tiny: Path) -> None:
    ids = _ids(1, 4, seed=3)
    first = client.generate(
        ids, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, seed=7, eos_token_id=[]
    )
    again = client.generate(
        ids, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, seed=7, eos_token_id=[]
    )
    other = client.generate(ids, max_new_tokens=12, do_sample=True, seed=8, eos_token_id=[])
    assert torch.equal(first, again)
    assert not torch.equal(first, other)

    greedy = client.generate(ids, max_new_tokens=12, eos_token_id=[])
    stop_at = int(greedy[0, 7])  # the fourth new token
    stopped = client.generate(ids, max_new_tokens=12, eos_token_id=stop_at)
    assert stopped.shape[1] <= 8
    assert int(stopped[0, -1]) == stop_at

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    word = tokenizer.decode(greedy[0, 6:7])
    by_string = client.generate(
        ids, max_new_tokens=12, eos_token_id=[], stop_strings=word, tokenizer=tokenizer
    )
    new = greedy[0, 4:]
    first_match = next(
        k
        for k in range(1, len(new) + 1)
        if word in tokenizer.decode(new[:k], skip_special_tokens=True)
    )
    assert first_match <= 3
    assert torch.equal(by_string, greedy[:, : 4 + first_match])

    # Continuing a session chains like one long generation.
    with client.inference_session(max_length=40) as session:
        part = client.generate(ids, max_new_tokens=5, eos_token_id=[], session=session)
        rest = client.generate(None, max_new_tokens=7, eos_token_id=[], session=session)
    assert torch.equal(torch.cat([part, rest[:, :]], dim=1), greedy)


def test_bad_requests_get_clear_errors(client: DistributedCausalLM, tiny: Path) -> None:
    with pytest.raises(SessionError, match="exceed the model's 128 positions"):
        client.generate(_ids(1, 100), max_new_tokens=40)
    with client.inference_session(max_length=8) as session:
        session.step(_ids(1, 6))
        with pytest.raises(SessionError, match="past its max_length 8"):
            session.step(_ids(1, 3))
    with pytest.raises(ValueError, match="padded batches are not supported"):
        client.generate(_ids(2, 4), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))
    with pytest.raises(LLMError, match="no swarm named 'nope'"):
        DistributedCausalLM.from_pretrained(tiny, swarm="nope")
    with pytest.raises(LLMError, match="already running"):
        launch_swarm(str(tiny), name="t-main")
    with pytest.raises(UnsupportedModelError, match="int8"):
        launch_swarm(str(tiny), name="t-bad", quantization="int3")


def test_allowlist_is_never_left(swarm: Swarm, tiny: Path) -> None:
    trusted = {"t-main-s0-r1", "t-main-s1-r1"}
    before = {i.server_id: i.requests for i in swarm.status()}
    client = DistributedCausalLM.from_pretrained(tiny, swarm=swarm, allowlist=trusted)
    for seed in range(4):
        client.generate(_ids(1, 5, seed=seed), max_new_tokens=4, eos_token_id=[])
        client(_ids(1, 5, seed=seed))
    after = {i.server_id: i.requests for i in swarm.status()}
    for server_id in before:
        if server_id in trusted:
            assert after[server_id] > before[server_id]
        else:
            assert after[server_id] == before[server_id], server_id
    blocked = DistributedCausalLM.from_pretrained(tiny, swarm=swarm, blocklist=trusted)
    with blocked.inference_session(max_length=8) as session:
        assert not {s.server_id for s in session.blocks.chain} & trusted


def test_concurrent_sessions_are_batched_and_spread(
    swarm: Swarm, client: DistributedCausalLM
) -> None:
    prompts = [_ids(1, 5, seed=10 + i) for i in range(6)]
    alone = [client.generate(p, max_new_tokens=16, eos_token_id=[]) for p in prompts]
    results: list[torch.Tensor | None] = [None] * len(prompts)
    chains: list[list[str]] = [[] for _ in prompts]

    def run(i: int) -> None:
        with client.inference_session(max_length=24) as session:
            chains[i] = [s.server_id for s in session.blocks.chain]
            results[i] = client.generate(
                prompts[i], max_new_tokens=16, eos_token_id=[], session=session
            )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(torch.equal(a, b) for a, b in zip(alone, results, strict=True))
    infos = swarm.status()
    assert max(i.extra["largest_batch"] for i in infos) > 1
    assert client._cohort.largest_batch > 1  # the client sent their steps together
    # Sessions were spread: both replicas of the first stage served some.
    assert {c[0] for c in chains} == {"t-main-s0-r0", "t-main-s0-r1"}


def test_cache_full_is_a_clear_error_or_a_wait(ray_local: None, tiny: Path) -> None:
    per_token = 2 * 4 * 2 * 16 * 4  # k and v, 4 blocks, 2 kv heads, head_dim 16, fp32
    swarm = launch_swarm(str(tiny), name="t-small", cache_bytes=per_token * 64, num_cpus=CPUS)
    try:
        client = DistributedCausalLM.from_pretrained(tiny, swarm=swarm)
        first = client.inference_session(max_length=48)
        begin = time.monotonic()
        # Refused at the door, by the router or the server, whichever sees it first.
        with pytest.raises(CacheFullError, match=r"KV cache (full|room)"):
            client.inference_session(max_length=48)
        assert time.monotonic() - begin < 10
        threading.Timer(1.0, first.close).start()
        with client.inference_session(max_length=48, wait_for_cache_s=20) as second:
            second.step(_ids(1, 4))
        info = swarm.status()[0]
        assert info is not None
        assert info.cache_used_bytes == 0
        assert info.sessions == 0
    finally:
        swarm.shutdown()


@pytest.fixture
def fragile(ray_local: None, tiny: Path) -> Iterator[Swarm]:
    """A swarm for tests that break servers."""
    swarm = launch_swarm(
        str(tiny),
        name="t-fragile",
        num_stages=2,
        replicas=2,
        num_cpus=CPUS,
        max_restarts=1,
        idle_timeout_s=1.0,
    )
    yield swarm
    swarm.shutdown()


def _generate_with(
    client: DistributedCausalLM, prompt: torch.Tensor, n: int, fault
) -> torch.Tensor:
    """Greedy generation that calls ``fault(session)`` halfway through."""
    with client.inference_session(max_length=prompt.shape[1] + n) as session:
        first = client.generate(prompt, max_new_tokens=n // 2, eos_token_id=[], session=session)
        fault(session)
        rest = client.generate(None, max_new_tokens=n - n // 2, eos_token_id=[], session=session)
    return torch.cat([first, rest], dim=1)


def test_failover_keeps_tokens_identical(fragile: Swarm, tiny: Path) -> None:
    client = DistributedCausalLM.from_pretrained(tiny, swarm=fragile, step_timeout_s=3.0)
    prompt = _ids(1, 6, seed=20)
    expected = client.generate(prompt, max_new_tokens=24, eos_token_id=[])

    def kill(session) -> None:
        victim = session.blocks.chain[1].server_id
        ray.kill(_record(fragile, victim).handle)  # no restart: the replica takes over

    got = _generate_with(client, prompt, 24, kill)
    assert torch.equal(got, expected)

    def freeze(session) -> None:
        victim = session.blocks.chain[0].server_id
        pid = next(i for i in fragile.status() if i and i.server_id == victim).extra["pid"]
        os.kill(pid, signal.SIGSTOP)  # a hung server: the client must time out, not hang
        threading.Timer(8.0, os.kill, (pid, signal.SIGCONT)).start()

    begin = time.monotonic()
    assert torch.equal(_generate_with(client, prompt, 24, freeze), expected)
    assert time.monotonic() - begin < 8

    def expire(session) -> None:
        time.sleep(2.5)  # idle_timeout_s=1: the servers drop the session's caches

    assert torch.equal(_generate_with(client, prompt, 24, expire), expected)


def test_concurrent_sessions_fail_over_together(fragile: Swarm, tiny: Path) -> None:
    client = DistributedCausalLM.from_pretrained(tiny, swarm=fragile, step_timeout_s=3.0)
    prompts = [_ids(1, 5, seed=30 + i) for i in range(4)]
    expected = [client.generate(p, max_new_tokens=16, eos_token_id=[]) for p in prompts]
    halfway = threading.Barrier(len(prompts) + 1, timeout=60)
    resume = threading.Barrier(len(prompts) + 1, timeout=60)
    used: list[str] = [""] * len(prompts)
    results: list[torch.Tensor | None] = [None] * len(prompts)

    def run(i: int) -> None:
        with client.inference_session(max_length=21) as session:
            first = client.generate(prompts[i], max_new_tokens=8, eos_token_id=[], session=session)
            used[i] = session.blocks.chain[1].server_id
            halfway.wait()
            resume.wait()
            rest = client.generate(None, max_new_tokens=8, eos_token_id=[], session=session)
        results[i] = torch.cat([first, rest], dim=1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    halfway.wait()
    ray.kill(_record(fragile, used[0]).handle)  # no restart: the other replica takes over
    resume.wait()
    for thread in threads:
        thread.join(timeout=120)
    assert all(torch.equal(a, b) for a, b in zip(expected, results, strict=True))
    assert client._cohort.largest_batch > 1


def test_a_restarted_server_is_replayed_onto(fragile: Swarm, tiny: Path) -> None:
    client = DistributedCausalLM.from_pretrained(tiny, swarm=fragile, wait_for_servers_s=60)
    prompt = _ids(1, 6, seed=21)
    expected = client.generate(prompt, max_new_tokens=16, eos_token_id=[])

    def kill_stage(session) -> None:
        first = session.blocks.chain[1]
        for record in fragile.servers():
            if (record.start, record.end) == (first.start, first.end):
                if record.server_id == first.server_id:
                    ray.kill(record.handle, no_restart=False)  # Ray restarts it
                else:
                    fragile.remove_server(record.server_id)  # the replica leaves for good

    assert torch.equal(_generate_with(client, prompt, 16, kill_stage), expected)


def test_servers_join_and_leave_while_clients_run(fragile: Swarm, tiny: Path) -> None:
    client = DistributedCausalLM.from_pretrained(tiny, swarm=fragile)
    prompt = _ids(1, 6, seed=22)
    expected = client.generate(prompt, max_new_tokens=16, eos_token_id=[])
    joined: list[str] = []

    def reshape(session) -> None:
        # A server for every block joins, then all the original servers leave.
        joined.append(fragile.add_server(0, 4, num_cpus=CPUS))
        for record in fragile.servers():
            if record.server_id != joined[0]:
                fragile.remove_server(record.server_id)

    assert torch.equal(_generate_with(client, prompt, 16, reshape), expected)
    assert [r.server_id for r in fragile.servers()] == joined
    with client.inference_session(max_length=8) as session:
        assert [s.server_id for s in session.blocks.chain] == joined


def test_compression_is_close_but_not_exact(ray_local: None, tiny: Path, local) -> None:
    swarm = launch_swarm(
        str(tiny), name="t-c8", num_stages=2, compression="blockwise8", num_cpus=CPUS
    )
    try:
        client = DistributedCausalLM.from_pretrained(tiny, swarm=swarm)
        ids = _ids(2, 16, seed=4)
        with torch.no_grad():
            expected = local(ids).logits
        got = client(ids).logits
        diff = (got - expected).abs()
        assert 0 < diff.mean() < 0.01
        with client.inference_session(max_length=20, batch_size=2) as session:
            stepped = torch.cat([session.step(ids[:, :10]), session.step(ids[:, 10:])], dim=1)
        assert 0 < (stepped - expected).abs().mean() < 0.01
    finally:
        swarm.shutdown()


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_weights_run_and_use_less_memory(
    ray_local: None,
    swarm: Swarm,
    tiny: Path,
    local,
    method: str,
) -> None:
    quantized = launch_swarm(str(tiny), name=f"t-{method}", quantization=method, num_cpus=CPUS)
    try:
        fp32_bytes = sum(i.weight_bytes for i in swarm.status()) / 2  # two replicas
        (info,) = quantized.status()
        assert info is not None
        assert info.quantization == method
        assert info.weight_bytes < 0.5 * fp32_bytes
        client = DistributedCausalLM.from_pretrained(tiny, swarm=quantized)
        ids = _ids(1, 12, seed=5)
        with torch.no_grad():
            expected = local(ids).logits
        got = client(ids).logits
        assert got.shape == expected.shape
        assert torch.isfinite(got).all()
        # Quantization error, not noise: the outputs still track the fp32 model.
        assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9
    finally:
        quantized.shutdown()


def test_a_second_family_end_to_end(ray_local: None, tmp_path: Path) -> None:
    folder = tiny_causal_lm(tmp_path / "qwen2", family="qwen2")
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    local.generation_config.eos_token_id = None
    swarm = launch_swarm(str(folder), name="t-qwen2", num_stages=2, num_cpus=CPUS)
    try:
        client = DistributedCausalLM.from_pretrained(folder, swarm=swarm)
        ids = _ids(1, 8, seed=6)
        with torch.no_grad():
            torch.testing.assert_close(client(ids).logits, local(ids).logits, atol=1e-3, rtol=0)
        assert torch.equal(
            client.generate(ids, max_new_tokens=16, eos_token_id=[]),
            local.generate(ids, max_new_tokens=16, do_sample=False),
        )
    finally:
        swarm.shutdown()
