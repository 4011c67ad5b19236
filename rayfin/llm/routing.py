"""Choose which servers carry a request: a chain covering the blocks at the lowest cost.

The cost of running blocks ``[i, j)`` on a server is one network round trip plus its
compute time for those blocks, the whole inflated by how busy the server is. The cheapest chain is a
shortest path over block boundaries, so a chain may use part of a server's range and
mix servers with different boundaries. A little random jitter spreads otherwise equal
sessions across replicas.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from rayfin.errors import CacheFullError, SwarmUnavailableError

# How much each session or queued request already on a server inflates its compute cost.
# Below 1 because decode steps of concurrent sessions are batched, so they share work.
LOAD_WEIGHT = 0.5
# Relative random jitter on each span's cost: enough to break ties between replicas.
JITTER = 0.05


@dataclass(frozen=True, slots=True)
class Span:
    """Blocks ``[start, end)`` on server ``server_id``."""

    server_id: str
    start: int
    end: int

    @property
    def num_blocks(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Candidate:
    """A server as the router sees it."""

    server_id: str
    start: int
    end: int
    ping_s: float
    block_latency_s: float
    load: float = 0.0
    cache_free_bytes: int | None = None  # None: unknown, do not filter on it

    def cost(self, num_blocks: int) -> float:
        # Load scales the whole hop, round trip included: a busy server's answer waits
        # behind others' work, and replicas whose pings differ by noise still spread.
        return (self.ping_s + num_blocks * self.block_latency_s) * (1 + LOAD_WEIGHT * self.load)


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """Which servers a client may use: an optional allowlist, and a blocklist."""

    allowlist: frozenset[str] | None = None
    blocklist: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(
        cls, allowlist: Iterable[str] | None = None, blocklist: Iterable[str] = ()
    ) -> RoutingPolicy:
        return cls(None if allowlist is None else frozenset(allowlist), frozenset(blocklist))

    def permits(self, server_id: str) -> bool:
        if server_id in self.blocklist:
            return False
        return self.allowlist is None or server_id in self.allowlist


def find_chain(
    candidates: Iterable[Candidate],
    start: int,
    end: int,
    *,
    policy: RoutingPolicy | None = None,
    exclude: Iterable[str] = (),
    cache_bytes_per_block: int = 0,
    rng: random.Random | None = None,
) -> list[Span]:
    """The cheapest chain of spans covering blocks ``[start, end)``.

    ``exclude`` holds servers that failed this client; ``cache_bytes_per_block`` is what
    the session will reserve per block, so servers without that room are passed over.
    """
    policy = policy or RoutingPolicy()
    rng = rng or random.Random()
    banned = set(exclude)
    usable = [
        c
        for c in candidates
        if policy.permits(c.server_id)
        and c.server_id not in banned
        and c.end > start
        and c.start < end
    ]
    best = {start: 0.0}
    came_from: dict[int, tuple[int, Candidate]] = {}
    for i in range(start, end):
        if i not in best:
            continue
        for cand in usable:
            if not cand.start <= i < cand.end:
                continue
            jitter = 1 + JITTER * rng.random()
            for j in range(i + 1, min(cand.end, end) + 1):
                room = cand.cache_free_bytes
                if room is not None and room < cache_bytes_per_block * (j - i):
                    break
                cost = best[i] + cand.cost(j - i) * jitter
                if cost < best.get(j, math.inf):
                    best[j] = cost
                    came_from[j] = (i, cand)
    if end not in best:
        if cache_bytes_per_block:
            # Would the chain exist if servers had room? Then the honest error is a full cache.
            try:
                find_chain(usable, start, end, rng=rng)
            except SwarmUnavailableError:
                pass
            else:
                raise CacheFullError(
                    f"every permitted server for blocks [{start}, {end}) is out of KV cache "
                    f"room for this session ({cache_bytes_per_block:,} bytes per block); "
                    "close sessions, wait (wait_for_cache_s=...), or add servers"
                )
        reached = max(best)
        why = "" if policy.allowlist is None and not policy.blocklist else " permitted"
        raise SwarmUnavailableError(
            f"no{why} live server with free cache holds block {reached} "
            f"(need blocks [{start}, {end}) covered; {len(usable)} usable servers)"
        )
    chain: list[Span] = []
    j = end
    while j != start:
        i, cand = came_from[j]
        chain.append(Span(cand.server_id, i, j))
        j = i
    return chain[::-1]
