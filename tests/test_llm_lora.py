"""Client-held LoRA and prompt tuning on remote blocks, on a real local Ray: exactness
against a local peft model, frozen server weights, isolation between clients, failover
between forward and backward, the adapter cache, priorities, and the training loop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from rayfin.errors import UnsupportedModelError
from rayfin.llm import DistributedCausalLM, Swarm, launch_swarm
from rayfin.llm.finetune import ClassificationHead, hidden_states
from rayfin.llm.lora import LoraAdapter, LoraConfig
from rayfin.llm.points import PointsLedger
from rayfin.llm.priority import TRAINING, Priority
from rayfin.testing import tiny_causal_lm, wait_until

pytestmark = pytest.mark.integration

CPUS = 0.1
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("lora") / "tiny-llama", layers=6)


@pytest.fixture(scope="module")
def swarm(ray_local: None, tiny: Path) -> Iterator[Swarm]:
    # Three uneven stages, each served twice: failover has somewhere to go.
    swarm = launch_swarm(str(tiny), name="t-lora", num_stages=3, replicas=2, num_cpus=CPUS)
    yield swarm
    swarm.shutdown()


def _client(swarm: Swarm, tiny: Path, **options) -> DistributedCausalLM:
    return DistributedCausalLM.from_pretrained(tiny, swarm=swarm, **options)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _randomise(adapter: LoraAdapter, seed: int, std: float = 0.05) -> None:
    """Non-zero B (a fresh adapter's B is zero, which makes A's gradient zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.named_tensors().items():
            if name.endswith("lora_B"):
                param.normal_(0.0, std, generator=generator)


def _peft_reference(tiny: Path, adapter: LoraAdapter):
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny).eval()
    config = adapter.config
    model = get_peft_model(
        base,
        PeftConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            target_modules=list(config.target_modules),
            lora_dropout=0.0,
        ),
    )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in adapter.named_tensors().items():
            _, block, module, which = name.split(".")
            parent = "self_attn" if module in TARGETS[:4] else "mlp"
            key = f"base_model.model.model.layers.{block}.{parent}.{module}.{which}.default.weight"
            params[key].copy_(tensor)
    return model, params


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_outputs_and_gradients_match_local_peft(swarm: Swarm, tiny: Path) -> None:
    client = _client(swarm, tiny)
    adapter = client.add_lora(rank=4, alpha=8, target_modules=TARGETS, seed=1)
    _randomise(adapter, 2)
    ids = _ids(2, 12, seed=3)
    targets = _ids(2, 12, seed=4)

    hidden = hidden_states(client, ids)
    logits = client.lm_head(hidden)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()

    reference, params = _peft_reference(tiny, adapter)
    expected = reference(ids).logits
    F.cross_entropy(expected.flatten(0, 1), targets.flatten()).backward()

    assert torch.allclose(logits, expected, atol=1e-3)
    worst = 0.0
    for name, param in adapter.named_tensors().items():
        _, block, module, which = name.split(".")
        parent = "self_attn" if module in TARGETS[:4] else "mlp"
        key = f"base_model.model.model.layers.{block}.{parent}.{module}.{which}.default.weight"
        assert param.grad is not None, name
        worst = max(worst, _relative(param.grad, params[key].grad))
    assert worst <= 3e-2, worst
    # In float32 the two computations agree far tighter than the Petals tolerance.
    assert worst < 1e-4


def test_prompt_tuning_gradients_match_a_local_prefix(swarm: Swarm, tiny: Path) -> None:
    client = _client(swarm, tiny)
    prefix = client.add_prompt_tuning(num_virtual_tokens=3, seed=5)
    ids = _ids(1, 8, seed=6)
    hidden = hidden_states(client, ids)
    client.lm_head(hidden).logsumexp(-1).sum().backward()

    local = AutoModelForCausalLM.from_pretrained(tiny).eval().requires_grad_(False)
    embeddings = prefix.embeddings.detach().clone().requires_grad_(True)
    embeds = torch.cat([embeddings[None], local.model.embed_tokens(ids)], dim=1)
    out = local(inputs_embeds=embeds, output_hidden_states=True)
    local.lm_head(out.hidden_states[-1][:, 3:]).logsumexp(-1).sum().backward()
    assert _relative(prefix.embeddings.grad, embeddings.grad) < 1e-4


def test_servers_never_change_and_adapters_apply_per_request(swarm: Swarm, tiny: Path) -> None:
    before = {r.server_id: ray.get(r.handle.weights_digest.remote()) for r in swarm.servers()}
    client = _client(swarm, tiny)
    ids = _ids(1, 10, seed=7)
    base = client(ids).logits
    adapter = client.add_lora(rank=4, seed=8)
    _randomise(adapter, 9)
    tuned = client(ids).logits
    assert not torch.allclose(base, tuned, atol=1e-4)

    data = [" ".join(f"w{(i * 7 + j) % 100 + 3}" for j in range(9)) for i in range(8)]
    report = client.train_adapter(data, epochs=2, lr=5e-3, batch_size=4, progress=False)
    assert report.steps == 4
    assert report.losses[-1] < report.losses[0]

    # Another client with no adapter still gets the base model.
    assert torch.equal(_client(swarm, tiny)(ids).logits, base)
    after = {r.server_id: ray.get(r.handle.weights_digest.remote()) for r in swarm.servers()}
    assert after == before
    client.remove_adapters()
    assert torch.equal(client(ids).logits, base)


def _train(client: DistributedCausalLM, seed: int, steps: int) -> dict[str, torch.Tensor]:
    adapter = client.add_lora(rank=2, seed=seed)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.05)
    for step in range(steps):
        ids = _ids(2, 8, seed=seed * 100 + step)
        logits = client.lm_head(hidden_states(client, ids))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return adapter.state_tensors()


def test_two_clients_training_at_once_do_not_interfere(swarm: Swarm, tiny: Path) -> None:
    alone = {seed: _train(_client(swarm, tiny), seed, 3) for seed in (11, 12)}
    together: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            together[seed] = _train(_client(swarm, tiny), seed, 3)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (11, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for seed in (11, 12):
        for name, tensor in alone[seed].items():
            assert torch.equal(together[seed][name], tensor), name


@pytest.fixture
def fragile(ray_local: None, tiny: Path) -> Iterator[Swarm]:
    swarm = launch_swarm(
        str(tiny), name="t-lora-fragile", num_stages=2, replicas=2, num_cpus=CPUS, max_restarts=1
    )
    yield swarm
    swarm.shutdown()


def test_forward_and_backward_survive_servers_dying(fragile: Swarm, tiny: Path) -> None:
    client = _client(fragile, tiny, step_timeout_s=5.0)
    adapter = client.add_lora(rank=4, seed=13)
    _randomise(adapter, 14)
    embeds = client.embed(_ids(2, 10, seed=15))
    grad = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(16))
    backprop = client.backprop

    out, hops = backprop.forward(embeds, adapter)
    expected = backprop.backward(hops, grad, adapter)
    # The same forward again, then the server that ran its first span dies for good
    # before the backward: the span is re-run on the other replica.
    again, hops = backprop.forward(embeds, adapter)
    assert torch.equal(again, out)
    victim = hops[0].span.server_id
    ray.kill(next(r.handle for r in fragile.servers() if r.server_id == victim), no_restart=True)
    grad_in, grads = backprop.backward(hops, grad, adapter)
    assert backprop.recoveries >= 1
    assert torch.allclose(grad_in, expected[0], atol=1e-6)
    assert set(grads) == set(expected[1]) == set(adapter.named_tensors())
    for name, value in expected[1].items():
        assert torch.allclose(grads[name], value, atol=1e-6), name

    # A forward whose second stage's server is dead re-routes to its replica.
    second = next(h.span for h in hops if h.span.start > 0)
    victim = next(r for r in fragile.servers() if r.server_id == second.server_id)
    ray.kill(victim.handle, no_restart=True)
    after, _ = backprop.forward(embeds, adapter)
    assert torch.allclose(after, out, atol=1e-6)


def test_adapter_weights_are_cached_per_digest_and_resent_when_lost(
    swarm: Swarm, tiny: Path
) -> None:
    # One server per stage, so that both calls go to the same servers (a replica that was
    # never sent the matrices gets them in full, rightly).
    chain = {r.start: r.server_id for r in swarm.servers()}
    client = _client(swarm, tiny, allowlist=chain.values())
    adapter = client.add_lora(rank=4, seed=16)
    _randomise(adapter, 17)
    ids = _ids(1, 6, seed=18)
    first = client(ids).logits
    sent = client.backprop.bytes_sent
    client(ids)
    again = client.backprop.bytes_sent - sent
    hidden = 3 * 2 * ids.numel() * client.config.hidden_size * 4  # 3 hops, out and back
    assert again < sent
    assert client.backprop.bytes_received <= 2 * hidden  # no matrices come back
    assert again == hidden // 2  # the second call sent hidden states and references only
    # Servers forget (as a restart would): the client resends and gets the same answer.
    for server_id, key in list(client.backprop._sent):
        handle = next(r.handle for r in swarm.servers() if r.server_id == server_id)
        assert ray.get(handle.release_adapter.remote(key))
    assert torch.equal(client(ids).logits, first)
    infos = [ray.get(r.handle.info.remote()) for r in swarm.servers()]
    assert all(i.extra["adapter_cache_bytes"] >= 0 for i in infos)


@pytest.fixture
def paid(ray_local: None, tiny: Path, tmp_path: Path) -> Iterator[tuple[Swarm, PointsLedger]]:
    """A one-server swarm with a points bank on a SQLite ledger; alice and bob have points."""
    url = f"sqlite:///{tmp_path / 'points.db'}"
    ledger = PointsLedger(url)
    ledger.grant("alice", 100, "welcome")
    ledger.grant("bob", 100, "welcome")
    swarm = launch_swarm(str(tiny), name="t-paid", num_cpus=CPUS, points_url=url, operator="carol")
    yield swarm, ledger
    swarm.shutdown()
    ledger.close()


def test_inference_runs_before_training_and_higher_bids_first(
    paid: tuple[Swarm, PointsLedger],
) -> None:
    from rayfin.llm.compression import encode

    swarm, ledger = paid
    record = swarm.servers()[0]
    server = record.handle
    # Requests long enough to finish at clearly different times; they queue behind
    # whichever runs first, and then run by priority, not by arrival.
    work = encode(torch.randn(96, 128, 64))
    start, end = record.start, record.end
    # Warm up the charging path (the first charge finds the bank), so that the bids below
    # are paid and queued while the first request still runs.
    warm = Priority(bid=1, account="bob")
    ray.get(server.forward.remote(encode(torch.randn(1, 2, 64)), start, end, None, warm))
    refs = {
        "busy": server.forward.remote(work, start, end),
        "train-0": server.forward.remote(work, start, end, None, TRAINING),
        "train-5": server.forward.remote(
            work, start, end, None, Priority(training=True, bid=5, account="alice")
        ),
        "infer-0": server.forward.remote(work, start, end),
        "infer-9": server.forward.remote(work, start, end, None, Priority(bid=9, account="bob")),
    }
    finished: list[str] = []
    pending = {ref: name for name, ref in refs.items()}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.002)
        finished += sorted(pending.pop(ref) for ref in ready)
    finished.remove("busy")
    assert finished == ["infer-9", "infer-0", "train-5", "train-0"]
    assert ledger.balance("alice") == 95
    assert ledger.balance("bob") == 90


def test_servers_earn_for_the_work_they_record_and_unfunded_bids_wait(
    paid: tuple[Swarm, PointsLedger], tiny: Path
) -> None:
    swarm, ledger = paid
    client = _client(swarm, tiny)
    client.add_lora(rank=2, seed=20)
    data = [" ".join(f"w{(i * 5 + j) % 90 + 3}" for j in range(32)) for i in range(8)]
    bid = Priority(training=True, bid=3, account="alice")
    report = client.train_adapter(data, batch_size=4, priority=bid, progress=False)
    assert report.steps == 2
    # A bid with no points behind it is served, without priority, and charges nothing.
    broke = Priority(training=True, bid=50, account="mallory")
    client.train_adapter(data[:4], batch_size=4, priority=broke, progress=False)

    # A generation session's bid is paid once, when it opens on the server.
    chat = _client(swarm, tiny)
    with chat.inference_session(12, priority=Priority(bid=2, account="bob")) as session:
        chat.generate(_ids(1, 4, seed=25), max_new_tokens=5, eos_token_id=[], session=session)
    assert ledger.balance("bob") == 98

    info = ray.get(swarm.servers()[0].handle.info.remote())
    assert info.extra["unpaid_bids"] == 2  # mallory's forward and backward
    # Each step is one forward and one backward on the single server, each charged.
    assert ledger.balance("alice") == 100 - 3 * 4
    assert ledger.balance("mallory") == 0

    def earned() -> bool:
        rows = ledger.earned_by_server()
        return len(rows) == 1 and int(rows["backward_passes"].iloc[0]) == 3

    wait_until(earned, 30, "the server's work to reach the ledger")
    row = ledger.earned_by_server().iloc[0]
    tokens = 12 * 32  # 12 examples of 32 tokens, forward and backward each
    assert row["operator"] == "carol"
    assert int(row["forward_tokens"]) == tokens
    assert int(row["backward_tokens"]) == tokens
    wait_until(
        lambda: int(ledger.earned_by_server().iloc[0]["inference_tokens"]) == 8,
        30,
        "the session's 4 prompt and 4 fed tokens to be credited",
    )
    assert int(row["points"]) == ledger.balance("carol") > 0


def test_training_tasks_and_bad_requests(swarm: Swarm, tiny: Path) -> None:
    client = _client(swarm, tiny)
    with pytest.raises(ValueError, match="nothing to train"):
        client.train_adapter(["w3 w4 w5"], progress=False)
    with pytest.raises(UnsupportedModelError, match="unknown LoRA target"):
        client.add_lora(target_modules=("lm_head",))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)

    client.add_lora(rank=4, seed=19)
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        client.train_adapter(["w3 w4"], max_length=200, progress=False)
    labels = ("w10", "w11", "w12")
    data = [(f"w{3 + i} w{20 + i} w{40 + i % 5}", labels[i % 3]) for i in range(12)]
    with pytest.raises(ValueError, match="not one of"):
        client.train_adapter([("w3 w4", "w99")], task="label-scoring", labels=labels)
    scoring = client.train_adapter(
        data, epochs=3, lr=1e-2, batch_size=6, task="label-scoring", labels=labels, progress=False
    )
    assert scoring.losses[-1] < scoring.losses[0]
    assert scoring.bytes_per_step > 0

    head = ClassificationHead(client.config.hidden_size, labels, seed=0)
    classify = client.train_adapter(
        data, epochs=3, lr=1e-2, batch_size=6, task="classification", labels=labels,
        head=head, progress=False,
    )  # fmt: skip
    assert classify.losses[-1] < classify.losses[0]

    client.remove_adapters()
    client.add_prompt_tuning(num_virtual_tokens=4)
    prompt = client.train_adapter(
        [("w5 w6 w7", "w8 w9")] * 4, epochs=3, lr=5e-2, batch_size=2, progress=False
    )
    assert prompt.losses[-1] < prompt.losses[0]


def test_adapters_round_trip_through_the_hub_and_refuse_another_base(
    swarm: Swarm, tiny: Path, tmp_path: Path
) -> None:
    from rayfin.errors import AdapterMismatchError

    hub = str(tmp_path / "hub")
    client = _client(swarm, tiny)
    adapter = client.add_lora(rank=4, alpha=8, target_modules=("q_proj", "down_proj"), seed=21)
    _randomise(adapter, 22)
    client.add_prompt_tuning(num_virtual_tokens=2, seed=23)
    ids = _ids(1, 7, seed=24)
    expected = client(ids).logits
    card = client.save_adapter("news", hub, metrics={"loss": 1.5}, training_data_fingerprint="f")
    assert (card.version, card.kind, card.rank, card.num_virtual_tokens) == (1, "lora", 4, 2)

    other = _client(swarm, tiny)
    loaded = other.load_adapter("news", hub=hub)
    assert loaded.target_modules == ("q_proj", "down_proj")
    assert torch.equal(other(ids).logits, expected)

    different = tiny_causal_lm(tmp_path / "other-base", layers=6, seed=1)
    stranger = DistributedCausalLM.from_pretrained(different, swarm=swarm)
    with pytest.raises(AdapterMismatchError, match="base model"):
        stranger.load_adapter("news", hub=hub)


def test_generation_runs_with_the_adapter_and_prefix_on_the_servers(
    swarm: Swarm, tiny: Path
) -> None:
    client = _client(swarm, tiny)
    adapter = client.add_lora(rank=4, alpha=8, target_modules=TARGETS, seed=26)
    _randomise(adapter, 27, std=1.0)  # strong enough to change greedy tokens
    prompt = _ids(1, 5, seed=28)
    reference, _ = _peft_reference(tiny, adapter)
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = reference.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False
        )
    assert torch.equal(client.generate(prompt, max_new_tokens=8, eos_token_id=[]), expected)
    base = _client(swarm, tiny).generate(prompt, max_new_tokens=8, eos_token_id=[])
    assert not torch.equal(base, expected)  # the adapter made a difference

    # A prefix too: the session feeds it before the prompt; greedy decoding equals a
    # greedy loop of stateless forwards (which apply the same adapter and prefix).
    client.add_prompt_tuning(num_virtual_tokens=3, seed=29)
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, client(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(client.generate(prompt, max_new_tokens=6, eos_token_id=[]), ids)
