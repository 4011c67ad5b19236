"""A server's memory of the adapters its clients sent: never written anywhere, bounded.

A training step sends its adapter matrices with the forward and refers to them by digest
in the backward; a scorer sends them once and reuses them for every call. The cache keeps
one entry per client key (the newest content replaces the old), evicts the least recently
used beyond ``max_bytes``, and is lost with the process: adapters are the client's, and a
restarted server simply asks for them again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from rayfin.errors import AdapterNotCachedError
from rayfin.llm.lora import AdapterPayload, tensors_bytes

DEFAULT_ADAPTER_CACHE_BYTES = 256 << 20


@dataclass(slots=True)
class _Entry:
    digest: str
    tensors: dict[str, torch.Tensor]
    nbytes: int


class AdapterCache:
    """``key -> (digest, tensors)``, least recently used out first."""

    def __init__(self, max_bytes: int = DEFAULT_ADAPTER_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def resolve(self, payload: AdapterPayload, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors ``payload`` stands for, caching sent ones; raises
        :class:`AdapterNotCachedError` for a digest this server does not hold."""
        if payload.tensors is not None:
            tensors = {
                name: t.detach().to(device, non_blocking=True)
                for name, t in payload.tensors.items()
            }
            self._put(payload.key, payload.digest, tensors)
            return tensors
        entry = self._entries.get(payload.key)
        if entry is None or entry.digest != payload.digest:
            self.misses += 1
            raise AdapterNotCachedError(
                f"adapter {payload.key!r} ({payload.digest[:12]}) is not cached here; resend it"
            )
        self.hits += 1
        self._entries.move_to_end(payload.key)
        return entry.tensors

    def _put(self, key: str, digest: str, tensors: dict[str, torch.Tensor]) -> None:
        self.release(key)
        nbytes = tensors_bytes(tensors)
        if nbytes > self.max_bytes:
            return  # used for this request only
        self._entries[key] = _Entry(digest, tensors, nbytes)
        self.used_bytes += nbytes
        while self.used_bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.used_bytes -= old.nbytes

    def release(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.used_bytes -= entry.nbytes
        return True
