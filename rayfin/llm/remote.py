"""The client's view of a swarm: which servers exist, how fast they are, and calls to them.

:class:`RemoteBlocks` turns registry records into routing candidates (measuring each
server's round trip as it asks for its load), builds chains, and reports failed servers.
Stateless passes (scoring, training) go through
:class:`rayfin.llm.backprop.RemoteBackprop`, stateful generation through
:class:`rayfin.llm.session.BlockSession`.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import ray

from rayfin.errors import CacheFullError, LLMError, SwarmUnavailableError
from rayfin.llm.routing import Candidate, RoutingPolicy, Span, find_chain
from rayfin.llm.server_info import ServerInfo, ServerRecord
from rayfin.llm.swarm import connect_swarm

# Errors after which a server is given up on for this client: it died, is restarting,
# or did not answer in time. Anything else a server raises is a real error and surfaces.
SERVER_FAILURES: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,
    ray.exceptions.GetTimeoutError,
    ray.exceptions.ObjectLostError,
)


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How a client talks to the swarm."""

    allowlist: frozenset[str] | None = None
    blocklist: frozenset[str] = frozenset()
    # Longest wait for one server call before the server counts as failed.
    step_timeout_s: float = 60.0
    # How long to wait for a replacement when no permitted server covers a range.
    wait_for_servers_s: float = 30.0
    # How long a snapshot of the servers' load stays fresh.
    refresh_interval_s: float = 1.0
    info_timeout_s: float = 5.0

    @property
    def policy(self) -> RoutingPolicy:
        return RoutingPolicy(self.allowlist, self.blocklist)


class RemoteBlocks:
    """Routing state and server calls for one client, safe to share between threads."""

    def __init__(self, swarm: str, num_blocks: int, options: ClientOptions) -> None:
        self.swarm = swarm
        self.num_blocks = num_blocks
        self.options = options
        self.compression: str | None = None
        self._lock = threading.Lock()
        self._records: dict[str, ServerRecord] = {}
        self._infos: dict[str, ServerInfo] = {}
        self._ping: dict[str, float] = {}
        self._opened_since_refresh: Counter[str] = Counter()
        self._refreshed = 0.0
        self._rng = random.Random()
        handle = connect_swarm(swarm)
        self.registry = handle.registry
        spec = handle.spec
        if spec.num_blocks != num_blocks:
            raise LLMError(
                f"swarm {swarm!r} serves a model with {spec.num_blocks} blocks, "
                f"the client's model has {num_blocks}"
            )
        self.compression = spec.compression

    # -- discovery -------------------------------------------------------------------

    def refresh(self, force: bool = False, exclude: set[str] | None = None) -> None:
        """Re-read the registry and every server's load, timing each round trip.

        Servers in ``exclude`` (those that just failed this client) are not asked: a hung
        one would hold the refresh up for the whole ``info_timeout_s``.
        """
        with self._lock:
            if not force and time.monotonic() - self._refreshed < self.options.refresh_interval_s:
                return
            # Sessions routed from now on may reach their servers after the servers answer
            # below: only those routed before count as seen by the new figures.
            counted = Counter(self._opened_since_refresh)
        records = ray.get(self.registry.servers.remote(), timeout=self.options.info_timeout_s)
        records = [
            r
            for r in records
            if self.options.policy.permits(r.server_id) and r.server_id not in (exclude or ())
        ]
        sent = time.perf_counter()
        pending = {r.handle.info.remote(): r for r in records}
        infos: dict[str, ServerInfo] = {}
        pings: dict[str, float] = {}
        deadline = time.monotonic() + self.options.info_timeout_s
        while pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=deadline - time.monotonic())
            for ref in ready:
                record = pending.pop(ref)
                try:
                    infos[record.server_id] = ray.get(ref)
                except ray.exceptions.RayError:
                    continue
                pings[record.server_id] = time.perf_counter() - sent
        with self._lock:
            self._records = {r.server_id: r for r in records if r.server_id in infos}
            self._infos = infos
            for server_id, ping in pings.items():
                previous = self._ping.get(server_id, ping)
                self._ping[server_id] = min(ping, 0.5 * previous + 0.5 * ping)
            self._opened_since_refresh -= counted
            self._refreshed = time.monotonic()

    def handle(self, server_id: str) -> Any:
        with self._lock:
            return self._records[server_id].handle

    def candidates(self) -> list[Candidate]:
        with self._lock:
            return [
                Candidate(
                    server_id=sid,
                    start=info.start,
                    end=info.end,
                    ping_s=self._ping.get(sid, 0.01),
                    block_latency_s=info.block_latency_s,
                    load=info.sessions + info.queued + self._opened_since_refresh[sid],
                    cache_free_bytes=info.cache_free_bytes,
                )
                for sid, info in self._infos.items()
            ]

    def plan(
        self,
        start: int,
        end: int,
        *,
        exclude: set[str],
        cache_bytes_per_block: int = 0,
        wait_for_cache_s: float | None = None,
    ) -> list[Span]:
        """A chain for blocks ``[start, end)``. With no permitted server for some block,
        wait up to ``wait_for_servers_s`` for one to join; with no cache room, wait up to
        ``wait_for_cache_s`` (default: fail at once with :class:`CacheFullError`)."""
        now = time.monotonic()
        server_deadline = now + self.options.wait_for_servers_s
        cache_deadline = now + (wait_for_cache_s or 0.0)
        force = False
        while True:
            self.refresh(force=force, exclude=exclude)
            try:
                chain = find_chain(
                    self.candidates(),
                    start,
                    end,
                    policy=self.options.policy,
                    exclude=exclude,
                    cache_bytes_per_block=cache_bytes_per_block,
                    rng=self._rng,
                )
            except CacheFullError:
                if time.monotonic() >= cache_deadline:
                    raise
                time.sleep(0.2)
                force = True
                continue
            except SwarmUnavailableError:
                if time.monotonic() >= server_deadline:
                    raise
                time.sleep(0.5)
                force = True
                if exclude:
                    # A server that failed us may be back (Ray restarted it): any that
                    # answers again is usable, with a fresh session replayed onto it.
                    self.refresh(force=True)
                    with self._lock:
                        exclude.difference_update(self._infos)
                continue
            with self._lock:
                self._opened_since_refresh.update(span.server_id for span in chain)
            return chain

    def report_failure(self, server_id: str) -> None:
        """Tell the registry (it drops the server if it is really gone) and forget the
        server's snapshot, so the next plan asks everyone afresh."""
        self.registry.report_failure.remote(server_id)
        with self._lock:
            self._infos.pop(server_id, None)
            self._refreshed = 0.0

    def call(self, ref: ray.ObjectRef) -> Any:
        """Wait for a server's reply, never longer than the step timeout."""
        return ray.get(ref, timeout=self.options.step_timeout_s)
