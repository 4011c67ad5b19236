"""``SwarmRegistry``: the named actor through which servers join a swarm and clients find them.

Servers register themselves when they start (and again after a restart) and deregister
when they leave. The registry also drops servers that have died: on a client's report, and
on its own periodic health check, so a swarm's listing converges on what is alive.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import ray

from rayfin.llm.server_info import ServerRecord


@dataclass(frozen=True, slots=True)
class SwarmSpec:
    """What every member of a swarm shares."""

    name: str
    model: str
    num_blocks: int
    dtype: str
    quantization: str | None
    compression: str | None


class SwarmRegistry:
    """Membership of one swarm. Created by :func:`rayfin.llm.launch_swarm`."""

    def __init__(self, spec: SwarmSpec, health_interval_s: float = 5.0) -> None:
        self.spec_ = spec
        self.health_interval_s = health_interval_s
        self._servers: dict[str, ServerRecord] = {}
        self._joined: dict[str, float] = {}
        self._health: asyncio.Task[None] | None = None

    def _ensure_health_loop(self) -> None:
        if self._health is None or self._health.done():
            self._health = asyncio.get_running_loop().create_task(self._health_loop())

    async def spec(self) -> SwarmSpec:
        self._ensure_health_loop()
        return self.spec_

    async def register(self, record: ServerRecord) -> None:
        """Add or refresh a server. A heartbeat from a known server keeps the handle the
        registry already holds: that copy may be what keeps the actor alive."""
        self._ensure_health_loop()
        known = self._servers.get(record.server_id)
        if known is None or known.handle != record.handle:
            self._servers[record.server_id] = record
            self._joined[record.server_id] = time.time()

    async def deregister(self, server_id: str) -> bool:
        self._joined.pop(server_id, None)
        return self._servers.pop(server_id, None) is not None

    async def servers(self) -> list[ServerRecord]:
        self._ensure_health_loop()
        return list(self._servers.values())

    async def _alive(self, record: ServerRecord, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(record.handle.info.remote(), timeout=timeout_s)
        except ray.exceptions.ActorUnavailableError:
            return True  # restarting: Ray will bring it back, and it re-registers
        except (ray.exceptions.RayActorError, TimeoutError):
            return False
        return True

    async def report_failure(self, server_id: str, timeout_s: float = 2.0) -> bool:
        """A client could not reach ``server_id``; drop it if it is really gone."""
        record = self._servers.get(server_id)
        if record is None:
            return True
        if await self._alive(record, timeout_s):
            return False
        if self._servers.get(server_id) is record:  # it may have re-registered meanwhile
            await self.deregister(server_id)
        return True

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            records = list(self._servers.values())
            alive = await asyncio.gather(*(self._alive(r, self.health_interval_s) for r in records))
            for record, ok in zip(records, alive, strict=True):
                if not ok and self._servers.get(record.server_id) is record:
                    await self.deregister(record.server_id)
