"""``PointsBank``: the named actor through which a swarm's servers record work and charge
bids; and ``WorkMeter``, what a block server counts its work with.

The bank is a thin async front on :class:`~rayfin.llm.points.PointsLedger`: the database
holds all state, so a restarted bank (``max_restarts=-1``) carries on where it stopped,
and the calls Ray retries into it (``max_task_retries=-1``) are idempotent there.

A server's :class:`WorkMeter` counts work in memory and flushes it to the bank, about once
a second and when the server leaves. Records stay with the meter until the bank confirms
them, so a bank that is restarting or unreachable delays pay but loses none. What a server
counted since its last flush is lost if the server process crashes: that only under-pays
its operator, never over-pays anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import ray
from sqlalchemy.engine import make_url

from rayfin.cluster import NAMESPACE
from rayfin.config import get_settings
from rayfin.errors import InsufficientPointsError, LLMError, PointsError
from rayfin.llm.points import PointsLedger, PointsPolicy, WorkKind, WorkRecord

__all__ = ["PointsBank", "WorkMeter", "bank_name", "find_points_bank", "launch_points_bank"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def bank_name(swarm: str) -> str:
    return f"rayfin.points.{swarm}"


class PointsBank:
    """The points ledger of one swarm, as a Ray actor. Started by :func:`launch_points_bank`.

    Ledger calls block on the database, so they run on a thread pool and the event loop
    stays free for other callers. SQLite serialises writers anyway: it gets one thread.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        schema: str | None = None,
        policy: PointsPolicy | None = None,
        threads: int | None = None,
    ) -> None:
        # No database access here: a constructor that fails is never restarted by Ray,
        # and a database that is down for a moment should not end the bank for good.
        self.ledger = PointsLedger(url, schema=schema, policy=policy)
        threads = threads or (1 if self.ledger.dialect == "sqlite" else 4)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="points")

    async def _run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(func, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def ready(self) -> tuple[str, str | None]:
        """Create the tables if missing; returns the database URL (password hidden) and
        schema. The launcher waits on it."""
        await self._run(self.ledger.ensure_tables)
        return self.ledger.url, self.ledger.schema

    async def policy(self) -> PointsPolicy:
        return self.ledger.policy

    async def record_work(self, records: Sequence[WorkRecord]) -> int:
        """Credit servers' work; see :meth:`PointsLedger.record_work`."""
        return await self._run(self.ledger.record_work, records)

    async def charge(
        self,
        account: str,
        points: int,
        request_id: str,
        *,
        server_id: str | None = None,
        detail: str = "",
    ) -> bool:
        """Debit a client's bid; see :meth:`PointsLedger.charge`."""
        return await self._run(
            self.ledger.charge, account, points, request_id, server_id=server_id, detail=detail
        )

    async def grant(
        self, account: str, points: int, reason: str, *, grant_id: str | None = None
    ) -> bool:
        """Credit an account by an operator's decision; see :meth:`PointsLedger.grant`."""
        return await self._run(self.ledger.grant, account, points, reason, grant_id=grant_id)

    async def balance(self, account: str) -> int:
        return await self._run(self.ledger.balance, account)

    async def balances(self) -> dict[str, int]:
        return await self._run(self.ledger.balances)


def find_points_bank(swarm: str = "default") -> Any | None:
    """The points bank of ``swarm``, or ``None`` when it has none."""
    try:
        return ray.get_actor(bank_name(swarm), namespace=NAMESPACE)
    except ValueError:
        return None


def _display_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def launch_points_bank(
    swarm: str = "default",
    url: str | None = None,
    *,
    schema: str | None = None,
    policy: PointsPolicy | None = None,
    detached: bool = False,
    timeout_s: float = 60.0,
) -> Any:
    """The points bank of ``swarm``: the running one, else a new one on ``url`` (default:
    this process's ``database.points_url``, so the CLI here reads the same database).
    Returns its handle once its tables exist.

    A bank on a SQLite file is pinned to this node, where the file is. Raises
    :class:`LLMError` when the running bank uses another database than ``url``.
    """
    target = url or get_settings().database.points_url
    assert target is not None  # Settings always derives one
    options: dict[str, Any] = {
        "name": bank_name(swarm),
        "namespace": NAMESPACE,
        "get_if_exists": True,
        "num_cpus": 0,
        "max_restarts": -1,
        "max_task_retries": -1,
        "max_concurrency": 1000,
        "lifetime": "detached" if detached else None,
    }
    if make_url(target).get_backend_name() == "sqlite":
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    bank = ray.remote(PointsBank).options(**options).remote(target, schema=schema, policy=policy)
    try:
        got_url, got_schema = ray.get(bank.ready.remote(), timeout=timeout_s)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
        raise LLMError(f"the points bank of swarm {swarm!r} did not start: {exc}") from exc
    if url is not None and (got_url, got_schema) != (_display_url(url), schema):
        raise LLMError(
            f"swarm {swarm!r} already has a points bank on {got_url} (schema {got_schema}), "
            f"not on {_display_url(url)} (schema {schema})"
        )
    return bank


async def _wait(ref: Any) -> Any:
    return await ref


# Merged while a record is still open: (kind, blocks, client, request_id).
_Key = tuple[WorkKind, int, str | None, str | None]


class WorkMeter:
    """Counts one server's work and sends it to its swarm's points bank.

    :meth:`add` is cheap and synchronous (no I/O): work of the same kind, block count,
    client and request is merged until the next flush, so a decode session makes one
    record per flush, not one per token. :meth:`flush` seals what was added into
    :class:`WorkRecord`\\ s with ids ``<server_id>:<epoch>:<seq>`` (a fresh epoch per meter,
    so a restarted server never reuses an id) and sends them; until the bank confirms a
    batch, that batch is kept and re-sent as is, so a reply lost after the bank committed
    credits nothing twice. Give ``bank`` (a handle) or ``swarm`` (looked up, and looked
    up again if the bank dies for good). Use it from one event loop.
    """

    def __init__(
        self,
        server_id: str,
        operator: str,
        *,
        swarm: str | None = None,
        bank: Any | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        if swarm is None and bank is None:
            raise LLMError("WorkMeter needs the points bank's handle or its swarm's name")
        # Validated once here, so no record this meter makes can be refused by the bank.
        WorkRecord("-", server_id, operator, "forward", 0, 0)
        self.server_id = server_id
        self.operator = operator
        self.epoch = uuid.uuid4().hex[:12]
        self.timeout_s = timeout_s
        # Points the bank reported crediting; less than the truth (the ledger) when a
        # reply was lost and the re-sent batch found its records already credited.
        self.credited = 0
        self.last_error: str | None = None
        self._swarm = swarm
        self._bank = bank
        self._seq = 0
        self._bids = 0
        self._open: dict[_Key, list[int]] = {}  # key -> [tokens, calls]
        self._sealed: list[WorkRecord] = []  # sent, or to send, until confirmed
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Requests counted but not yet confirmed by the bank."""
        return sum(r.calls for r in self._sealed) + sum(c for _, c in self._open.values())

    def add(
        self,
        kind: WorkKind,
        tokens: int,
        blocks: int,
        client: str | None = None,
        request_id: str | None = None,
    ) -> None:
        """Count one request's work: ``tokens`` token positions through ``blocks`` blocks."""
        WorkRecord("-", self.server_id, self.operator, kind, tokens, blocks, client, request_id)
        if tokens == 0 or blocks == 0:
            return
        counts = self._open.setdefault((kind, blocks, client, request_id), [0, 0])
        counts[0] += tokens
        counts[1] += 1

    def _seal(self) -> None:
        now = time.time_ns()
        for (kind, blocks, client, request_id), (tokens, calls) in self._open.items():
            record_id = f"{self.server_id}:{self.epoch}:{self._seq}"
            self._seq += 1
            self._sealed.append(
                WorkRecord(
                    record_id,
                    self.server_id,
                    self.operator,
                    kind,
                    tokens,
                    blocks,
                    client,
                    request_id,
                    now,
                    calls,
                )
            )
        self._open.clear()

    async def _find_bank(self) -> Any | None:
        if self._bank is None and self._swarm is not None:
            # A GCS lookup blocks: off the event loop.
            self._bank = await asyncio.to_thread(find_points_bank, self._swarm)
        return self._bank

    async def _send(self, bank: Any, records: list[WorkRecord]) -> int:
        return await bank.record_work.remote(records)

    async def flush(self) -> int:
        """Send what was counted; returns the points the bank newly credited. Never raises
        for an unreachable bank: the records are kept for the next flush, and
        :attr:`last_error` says what went wrong."""
        async with self._lock:
            credited = 0
            # At most two rounds: a batch kept from a failed flush, then what came since.
            for _ in range(2):
                if not self._sealed:
                    self._seal()
                if not self._sealed:
                    break
                bank = await self._find_bank()
                if bank is None:
                    self.last_error = f"swarm {self._swarm!r} has no points bank"
                    break
                try:
                    credited += await asyncio.wait_for(
                        self._send(bank, self._sealed), self.timeout_s
                    )
                except Exception as exc:  # Ray errors, timeouts: keep the batch, retry later
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("points: %d record(s) kept for the next flush: %s",
                                len(self._sealed), self.last_error)  # fmt: skip
                    if isinstance(exc, ray.exceptions.ActorDiedError) and self._swarm:
                        self._bank = None  # gone for good: find its successor next time
                    break
                self._sealed = []
                self.last_error = None
            self.credited += credited
            return credited

    async def charge(
        self, client: str, points: int, *, detail: str = "", timeout_s: float = 5.0
    ) -> bool:
        """Debit ``client``'s bid of ``points`` for one request to this server: True when
        it is paid (serve it with that priority), False when it is not (serve it without):
        the balance is too low, the bid is 0, or the bank did not answer in ``timeout_s``
        (a charge that lands after that is still debited: the client then paid for nothing,
        which a bank that answers in time never causes).

        The charge's key is made here, from this meter's epoch and a counter, never from
        an id the client chose: a client could otherwise send a paid id again to be served
        first for free. Ray's retries of the call reuse the key, so they never debit twice.
        """
        if not isinstance(points, int) or isinstance(points, bool) or points < 0:
            raise PointsError(f"a bid must be an int >= 0, got {points!r}")
        if points == 0:
            return False
        request_id = f"{self.server_id}:{self.epoch}:bid{self._bids}"
        self._bids += 1
        bank = await self._find_bank()
        if bank is None:
            return False
        call = bank.charge.remote(
            client, points, request_id, server_id=self.server_id, detail=detail
        )
        try:
            await asyncio.wait_for(_wait(call), timeout_s)
        except InsufficientPointsError:
            return False
        except Exception as exc:  # an unreachable bank must not hold up the request
            log.warning("points: bid of %r not charged: %s: %s", client, type(exc).__name__, exc)
            return False
        return True

    def start(self, interval_s: float = 1.0) -> None:
        """Flush every ``interval_s`` seconds from a task on the running event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush_every(interval_s))

    async def _flush_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush()
            except Exception:  # never let the loop die; flush already keeps the records
                log.exception("points: flush failed")

    async def aclose(self, timeout_s: float = 10.0) -> int:
        """Stop the periodic flush and send what is left, waiting at most ``timeout_s``
        (a server calls it in ``leave``); returns the points credited by this flush."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            return await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            log.warning("points: %d request(s) not confirmed at close", self.pending)
            return 0
