"""Block execution and KV caches in one process: exact against transformers, per family."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rayfin.errors import CacheFullError, SessionError, UnsupportedModelError
from rayfin.llm.blocks import BlockSpan, CacheSlot
from rayfin.llm.checkpoint import load_blocks, load_client_parts, load_config, model_shape
from rayfin.llm.kv_cache import KVCacheManager
from rayfin.testing import tiny_causal_lm


def _parts(folder: Path, cuts: list[int]) -> tuple[list[BlockSpan], tuple[torch.nn.Module, ...]]:
    config = load_config(folder)
    spans = [
        BlockSpan(*load_blocks(folder, config, a, b, torch.float32), a)
        for a, b in itertools.pairwise(cuts)
    ]
    return spans, load_client_parts(folder, config, torch.float32)


def _manager(folder: Path, capacity: int = 1 << 24) -> KVCacheManager:
    shape = model_shape(load_config(folder))
    return KVCacheManager(
        capacity,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_spans_match_the_local_model(tmp_path: Path, family: str) -> None:
    folder = tiny_causal_lm(tmp_path / family, family=family)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    spans, (embed, norm, head) = _parts(folder, [0, 1, 4])
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        positions = torch.arange(12).expand(2, -1)
        hidden = embed(ids)
        for span in spans:
            hidden = span.forward(hidden, positions)
        full = head(norm(hidden))

        # The same through per-session caches, in uneven steps.
        manager = _manager(folder)
        caches = [
            asyncio.run(
                manager.allocate(
                    f"s{i}", first=s.first, num_layers=len(s.layers), batch_size=2, max_length=16
                )
            )
            for i, s in enumerate(spans)
        ]
        stepped = []
        for a, b in [(0, 5), (5, 6), (6, 7), (7, 12)]:
            hidden = embed(ids[:, a:b])
            for span, cache in zip(spans, caches, strict=True):
                hidden = span.forward(
                    hidden, torch.arange(a, b).expand(2, -1), [CacheSlot(slice(None), cache, a)]
                )
            stepped.append(head(norm(hidden)))
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(stepped, dim=1), expected, atol=1e-5, rtol=0)


def test_batched_decode_equals_sessions_alone(tmp_path: Path) -> None:
    folder = tiny_causal_lm(tmp_path / "m")
    (span,), (embed, _, _) = _parts(folder, [0, 4])
    manager = _manager(folder)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (1, n), generator=gen) for n in (3, 7, 5)]
    nxt = torch.randint(0, 128, (3, 1), generator=gen)

    def prefill(tag: str) -> list:
        caches = []
        for i, ids in enumerate(prompts):
            cache = asyncio.run(
                manager.allocate(f"{tag}{i}", first=0, num_layers=4, batch_size=1, max_length=16)
            )
            span.forward(
                embed(ids), torch.arange(ids.shape[1])[None], [CacheSlot(slice(None), cache, 0)]
            )
            caches.append(cache)
        return caches

    with torch.no_grad():
        alone = [
            span.forward(
                embed(nxt[i : i + 1]),
                torch.tensor([[p.shape[1]]]),
                [CacheSlot(slice(None), c, p.shape[1])],
            )
            for i, (p, c) in enumerate(zip(prompts, prefill("a"), strict=True))
        ]
        caches = prefill("b")
        slots = [
            CacheSlot(slice(i, i + 1), c, p.shape[1])
            for i, (p, c) in enumerate(zip(prompts, caches, strict=True))
        ]
        positions = torch.tensor([[p.shape[1]] for p in prompts])
        together = span.forward(embed(nxt), positions, slots)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=0)


def test_unsupported_family_and_bad_range(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(UnsupportedModelError, match="supported families: llama"):
        load_config(tmp_path / "gpt2")
    folder = tiny_causal_lm(tmp_path / "m")
    with pytest.raises(UnsupportedModelError, match=r"\[2, 9\) is outside"):
        load_blocks(folder, load_config(folder), 2, 9, torch.float32)


def test_cache_cap_wait_and_expiry(tmp_path: Path) -> None:
    folder = tiny_causal_lm(tmp_path / "m")
    one = _manager(folder).bytes_for(4, 1, 32)
    manager = _manager(folder, capacity=2 * one)

    async def scenario() -> None:
        await manager.allocate("a", first=0, num_layers=4, batch_size=1, max_length=32)
        await manager.allocate("b", first=0, num_layers=4, batch_size=1, max_length=32)
        assert manager.free_bytes == 0
        with pytest.raises(CacheFullError, match=r"KV cache full.*2 sessions open"):
            await manager.allocate("c", first=0, num_layers=4, batch_size=1, max_length=32)
        with pytest.raises(CacheFullError, match=r"after waiting 0\.1 s"):
            await manager.allocate(
                "c", first=0, num_layers=4, batch_size=1, max_length=32, wait_s=0.1
            )
        # A waiting session gets in as soon as another closes.
        asyncio.get_running_loop().call_later(0.05, manager.free, "a")
        await manager.allocate("c", first=0, num_layers=4, batch_size=1, max_length=32, wait_s=5)
        with pytest.raises(CacheFullError, match="more than this server's whole cache"):
            await manager.allocate("d", first=0, num_layers=4, batch_size=1, max_length=96)
        with pytest.raises(SessionError, match="already open"):
            await manager.allocate("b", first=0, num_layers=4, batch_size=1, max_length=1)

    asyncio.run(scenario())
    assert manager.expire_idle(3600) == []
    assert sorted(manager.expire_idle(0)) == ["b", "c"]
    assert manager.used_bytes == 0
    with pytest.raises(SessionError, match="not open on this server"):
        manager.get("b")
