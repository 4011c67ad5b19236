"""Chain selection: coverage, cost, spreading, trust lists and honest errors."""

from __future__ import annotations

import itertools
import random

import pytest

from rayfin.errors import CacheFullError, SwarmUnavailableError, UnsupportedModelError
from rayfin.llm.routing import Candidate, RoutingPolicy, Span, find_chain
from rayfin.llm.swarm import stage_bounds


def _c(sid: str, start: int, end: int, **kw: float) -> Candidate:
    return Candidate(
        sid,
        start,
        end,
        ping_s=kw.pop("ping_s", 0.001),
        block_latency_s=kw.pop("block_latency_s", 0.001),
        **kw,
    )  # type: ignore[arg-type]


def test_chain_covers_with_mixed_boundaries() -> None:
    servers = [_c("a", 0, 4), _c("b", 2, 8), _c("c", 6, 10)]
    chain = find_chain(servers, 0, 10, rng=random.Random(0))
    assert chain[0].start == 0
    assert chain[-1].end == 10
    assert all(x.end == y.start for x, y in itertools.pairwise(chain))
    assert [s.server_id for s in chain] == ["a", "b", "c"]


def test_cheaper_servers_and_fewer_hops_win() -> None:
    slow = _c("slow", 0, 10, block_latency_s=0.01)
    fast = _c("fast", 0, 10, block_latency_s=0.001)
    assert find_chain([slow, fast], 0, 10) == [Span("fast", 0, 10)]
    # Two hops cost two round trips: one server for everything beats a split.
    split = [_c("x", 0, 5, ping_s=0.01), _c("y", 5, 10, ping_s=0.01), _c("z", 0, 10, ping_s=0.01)]
    assert find_chain(split, 0, 10) == [Span("z", 0, 10)]


def test_load_spreads_sessions_over_replicas() -> None:
    busy, idle = _c("r0", 0, 4, load=2), _c("r1", 0, 4, load=0)
    picks = {find_chain([busy, idle], 0, 4, rng=random.Random(i))[0].server_id for i in range(20)}
    assert picks == {"r1"}
    equal = [_c("r0", 0, 4), _c("r1", 0, 4)]
    picks = {find_chain(equal, 0, 4, rng=random.Random(i))[0].server_id for i in range(40)}
    assert picks == {"r0", "r1"}  # jitter breaks ties both ways


def test_allowlist_blocklist_and_exclusion() -> None:
    servers = [_c("trusted", 0, 4, block_latency_s=0.1), _c("fast", 0, 4)]
    assert (
        find_chain(servers, 0, 4, policy=RoutingPolicy.of(allowlist=["trusted"]))[0].server_id
        == "trusted"
    )
    assert (
        find_chain(servers, 0, 4, policy=RoutingPolicy.of(blocklist=["fast"]))[0].server_id
        == "trusted"
    )
    assert find_chain(servers, 0, 4, exclude={"fast"})[0].server_id == "trusted"
    with pytest.raises(SwarmUnavailableError, match=r"no permitted live server .* holds block 0"):
        find_chain(servers, 0, 4, policy=RoutingPolicy.of(allowlist=["nobody"]))


def test_gaps_and_full_caches_are_named() -> None:
    with pytest.raises(SwarmUnavailableError, match="holds block 4"):
        find_chain([_c("a", 0, 4), _c("b", 5, 8)], 0, 8)
    full = [_c("a", 0, 4, cache_free_bytes=100)]
    with pytest.raises(CacheFullError, match="out of KV cache room"):
        find_chain(full, 0, 4, cache_bytes_per_block=1000)
    assert find_chain(full, 0, 4, cache_bytes_per_block=25) == [Span("a", 0, 4)]


def test_stage_bounds() -> None:
    assert stage_bounds(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert stage_bounds(4, 3) == [(0, 1), (1, 3), (3, 4)]
    with pytest.raises(UnsupportedModelError, match="num_stages"):
        stage_bounds(4, 5)
