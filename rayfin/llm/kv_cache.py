"""Per-session attention caches under one byte cap, with admission control and idle expiry.

A session reserves its whole cache (``max_length`` tokens) when it opens, so a running
session can never run out of room halfway through a generation: the only place a full
server says no is at the door, with a clear :class:`CacheFullError` (or after waiting for
room, when the client asks to wait).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rayfin.errors import CacheFullError, SessionError, SessionNotOpenError


@dataclass(slots=True)
class SessionCache:
    """Keys and values of blocks ``[first, first + layers)`` for one session."""

    session_id: str
    first: int
    keys: torch.Tensor  # [layers, batch, kv_heads, max_length, head_dim]
    values: torch.Tensor
    nbytes: int
    length: int = 0
    last_used: float = field(default_factory=time.monotonic)
    # What the server attaches to the session (its queue priority, its adapter); freed
    # with the cache, so nothing outlives an expired session.
    context: Any = None

    @property
    def end(self) -> int:
        """One past the last block this cache covers."""
        return self.first + self.keys.shape[0]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    def append(
        self, layer: int, past: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' ``key``/``value`` at ``past`` for global block ``layer``;
        return the cache's keys and values up to and including them."""
        end = past + key.shape[2]
        index = layer - self.first
        self.keys[index, :, :, past:end] = key
        self.values[index, :, :, past:end] = value
        return self.keys[index, :, :, :end], self.values[index, :, :, :end]


class KVCacheManager:
    """Owns every session cache on one server and the byte budget they share."""

    def __init__(
        self,
        capacity_bytes: int,
        *,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self._sessions: dict[str, SessionCache] = {}
        self._used = 0
        self._freed = asyncio.Event()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self._used

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def bytes_for(self, num_layers: int, batch_size: int, max_length: int) -> int:
        """Bytes a session of this shape reserves."""
        element = torch.empty((), dtype=self.dtype).element_size()
        per_token = 2 * num_layers * self.num_kv_heads * self.head_dim * element
        return per_token * batch_size * max_length

    async def allocate(
        self,
        session_id: str,
        *,
        first: int,
        num_layers: int,
        batch_size: int,
        max_length: int,
        wait_s: float | None = None,
    ) -> SessionCache:
        """Reserve a cache; when full, raise at once or after waiting up to ``wait_s``."""
        if session_id in self._sessions:
            raise SessionError(f"session {session_id} is already open on this server")
        need = self.bytes_for(num_layers, batch_size, max_length)
        if need > self.capacity_bytes:
            raise CacheFullError(
                f"a session of {max_length} tokens x batch {batch_size} needs {need:,} bytes of "
                f"KV cache, more than this server's whole cache ({self.capacity_bytes:,} bytes); "
                "use a shorter max_length or servers with a larger cache_bytes"
            )
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while need > self.free_bytes:
            remaining = 0.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                waited = "" if wait_s is None else f" after waiting {wait_s:g} s"
                raise CacheFullError(
                    f"KV cache full{waited}: the session needs {need:,} bytes, "
                    f"{self.free_bytes:,} of {self.capacity_bytes:,} are free "
                    f"({self.num_sessions} sessions open); close sessions, wait "
                    "(wait_for_cache_s=...), or add servers"
                )
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), timeout=remaining)
            except TimeoutError:
                continue
        shape = (num_layers, batch_size, self.num_kv_heads, max_length, self.head_dim)
        cache = SessionCache(
            session_id=session_id,
            first=first,
            keys=torch.empty(shape, dtype=self.dtype, device=self.device),
            values=torch.empty(shape, dtype=self.dtype, device=self.device),
            nbytes=need,
        )
        self._sessions[session_id] = cache
        self._used += need
        return cache

    def get(self, session_id: str) -> SessionCache:
        try:
            cache = self._sessions[session_id]
        except KeyError:
            raise SessionNotOpenError(
                f"session {session_id} is not open on this server (closed, expired after "
                "idling, or the server restarted)"
            ) from None
        cache.last_used = time.monotonic()
        return cache

    def free(self, session_id: str) -> bool:
        """Release a session's cache; ``False`` if it was not open."""
        cache = self._sessions.pop(session_id, None)
        if cache is None:
            return False
        self._used -= cache.nbytes
        self._freed.set()
        return True

    def active_sessions(self, within_s: float) -> int:
        """Sessions used in the last ``within_s`` seconds."""
        cutoff = time.monotonic() - within_s
        return sum(1 for cache in self._sessions.values() if cache.last_used >= cutoff)

    def expire_idle(self, idle_timeout_s: float) -> list[str]:
        """Free sessions unused for longer than ``idle_timeout_s``; return their ids."""
        cutoff = time.monotonic() - idle_timeout_s
        stale = [sid for sid, cache in self._sessions.items() if cache.last_used < cutoff]
        for session_id in stale:
            self.free(session_id)
        return stale
