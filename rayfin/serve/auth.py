"""Who may call the API: API keys with a role, checked in constant time, and a token
bucket per key.

Keys arrive in the ``X-API-Key`` header (or ``Authorization: Bearer <key>``). A key is
known by its SHA-256 only, so the configuration may hold digests instead of keys. Roles
are ordered: ``trade`` may do everything ``read`` may, plus what changes trading state
(promoting or uploading a model).

Rate limits are per key and per ingress replica (a token bucket each: ``rate`` per second
sustained, ``burst`` at once); with N replicas a key gets up to N times the rate. A
refused request costs nothing and says when to retry.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from rayfin.config import ApiKey

Role = Literal["read", "trade"]
ROLES: tuple[Role, ...] = ("read", "trade")
KEY_HEADER = "X-API-Key"
KEY_PREFIX = "rf_"


def digest(key: str) -> str:
    """The SHA-256 (hex) a key is known by."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key (32 bytes of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Caller:
    """The holder of a valid key, and the key's own rate limit if it has one."""

    name: str
    role: Role
    rate_limit_per_s: float | None = None
    rate_limit_burst: int | None = None

    def may(self, role: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


class KeyRing:
    """The configured keys, by digest."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_digest: dict[str, Caller] = {}
        for key in keys:
            secret = key.sha256 or digest(key.key.get_secret_value())  # type: ignore[union-attr]
            self._by_digest[secret] = Caller(
                key.name, key.role, key.rate_limit_per_s, key.rate_limit_burst
            )

    def __len__(self) -> int:
        return len(self._by_digest)

    def identify(self, key: str | None) -> Caller | None:
        """The caller holding ``key``, or None for a missing or unknown key."""
        if not key:
            return None
        wanted = digest(key)
        found = None
        # Compare against every digest, so the time taken says nothing about which matched.
        for known, caller in self._by_digest.items():
            if hmac.compare_digest(known, wanted):
                found = caller
        return found


class RateLimiter:
    """A token bucket per caller; thread-safe (sync endpoints run in a thread pool).
    ``rate_per_s`` and ``burst`` apply to callers whose key sets none of its own."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        self._lock = threading.Lock()

    def limits(self, caller: Caller) -> tuple[float, int]:
        """(requests/s, burst) for ``caller``."""
        return caller.rate_limit_per_s or self.rate, caller.rate_limit_burst or self.burst

    def acquire(self, caller: Caller) -> float:
        """Take one token for ``caller``; returns 0.0 when granted, else seconds to wait."""
        rate, burst = self.limits(caller)
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(caller.name, (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[caller.name] = (tokens - 1.0, now)
                return 0.0
            self._buckets[caller.name] = (tokens, now)
            return (1.0 - tokens) / rate
