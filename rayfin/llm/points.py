"""The points ledger: servers earn points for the blocks they compute, clients spend them.

A block server's work is metered in token-blocks (tokens times the blocks they went
through) and priced by a :class:`PointsPolicy` in whole points per 1,000 token-blocks.
Only servers record work (through the points bank actor, :mod:`rayfin.actors.points`);
clients can only spend what they were credited or granted, and a spend is burned, not
paid to anyone, so no party gains points by charging.

Balances are integers. Fractions of a point are never rounded away nor up: the ledger
keeps each server's running total of token-blocks per kind of work and credits the whole
points that total crossed, so a server earns exactly ``points_for(kind, total work)``
however finely its work is cut into records (a decode step is worth a hundredth of a
point, and a hundred of them make one).

SQLite (the default, ``points.db`` in the state dir) or PostgreSQL through SQLAlchemy
Core; ``schema`` puts the tables in a PostgreSQL schema of their own. Every write is one
transaction and idempotent on a key: a work record's id, a charge's (account, request),
a grant's id. So Ray's retries of a call whose reply was lost change nothing.
Balances never go negative: a charge checks and debits under the account's row lock
(``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite writers take the database's write
lock at ``BEGIN IMMEDIATE``), and the database rejects a negative balance outright.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, get_args
from urllib.parse import quote

import pandas as pd
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    case,
    cast,
    event,
    func,
    select,
    text,
    update,
)

from rayfin.database import AUTO_ID, SqlStore
from rayfin.errors import InsufficientPointsError, PointsError

__all__ = [
    "TOKEN_BLOCKS_PER_RATE",
    "WORK_KINDS",
    "EntryKind",
    "PointsLedger",
    "PointsPolicy",
    "WorkKind",
    "WorkRecord",
]

WorkKind = Literal["inference", "forward", "backward"]
"""``inference``: cached prefill and decode steps of a session; ``forward``: a stateless
(training) forward; ``backward``: a backward pass through the blocks."""
WORK_KINDS: tuple[WorkKind, ...] = get_args(WorkKind)

EntryKind = Literal["earn", "spend", "grant"]

TOKEN_BLOCKS_PER_RATE = 1_000
"""A policy rate is points per this many token-blocks."""

# Rows per INSERT statement: well under SQLite's and PostgreSQL's bound-parameter limits.
_CHUNK = 500


def _count(value: object, what: str, *, positive: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < int(positive):
        bound = "> 0" if positive else ">= 0"
        raise PointsError(f"{what} must be an int {bound}, got {value!r}")
    return value


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise PointsError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _kind(kind: object) -> WorkKind:
    if kind not in WORK_KINDS:
        raise PointsError(f"work kind must be one of {', '.join(WORK_KINDS)}, got {kind!r}")
    return kind  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class PointsPolicy:
    """Whole points per 1,000 token-blocks of each kind of work. A backward pass costs
    about twice a forward, so it earns twice as much."""

    inference: int = 1
    forward: int = 1
    backward: int = 2

    def __post_init__(self) -> None:
        for kind in WORK_KINDS:
            _count(getattr(self, kind), f"PointsPolicy.{kind}")

    def rate(self, kind: WorkKind) -> int:
        """Points per :data:`TOKEN_BLOCKS_PER_RATE` token-blocks of ``kind``."""
        return int(getattr(self, _kind(kind)))

    def points_for(self, kind: WorkKind, tokens: int, blocks: int) -> int:
        """Whole points that ``tokens`` tokens through ``blocks`` blocks are worth on their
        own, rounded down. The ledger carries the fractions instead (see
        :meth:`points_between`), so many small pieces of work earn what their sum does."""
        token_blocks = _count(tokens, "tokens") * _count(blocks, "blocks")
        return self.points_between(kind, 0, token_blocks)

    def points_between(self, kind: WorkKind, before: int, after: int) -> int:
        """Whole points a server earns when its running total of ``kind`` token-blocks
        goes from ``before`` to ``after``: the points boundaries crossed, so the sum over
        consecutive steps is exactly the worth of the total."""
        rate = self.rate(kind)
        if not 0 <= before <= after:
            raise PointsError(
                f"token-block totals must satisfy 0 <= before <= after, got {before}, {after}"
            )
        return after * rate // TOKEN_BLOCKS_PER_RATE - before * rate // TOKEN_BLOCKS_PER_RATE


@dataclass(frozen=True, slots=True)
class WorkRecord:
    """Work one server did, to credit ``operator`` for. ``record_id`` is unique for all
    time (the meter makes it from the server id, a per-process epoch and a sequence), so a
    record sent twice is credited once. ``calls`` is how many requests it sums."""

    record_id: str
    server_id: str
    operator: str
    kind: WorkKind
    tokens: int
    blocks: int
    client: str | None = None
    request_id: str | None = None
    at_ns: int = field(default_factory=time.time_ns)
    calls: int = 1

    def __post_init__(self) -> None:
        _name(self.record_id, "record_id")
        _name(self.server_id, "server_id")
        _name(self.operator, "operator")
        _kind(self.kind)
        _count(self.tokens, "tokens")
        _count(self.blocks, "blocks")
        _count(self.at_ns, "at_ns")
        _count(self.calls, "calls")

    @property
    def token_blocks(self) -> int:
        return self.tokens * self.blocks


def _entry_id(kind: EntryKind, *parts: str) -> str:
    # Quoting keeps the parts apart: account "a/b" + request "c" never meets "a" + "b/c".
    return "/".join([kind, *(quote(part, safe=":@") for part in parts)])


class _Tables(NamedTuple):
    entries: Table
    accounts: Table
    progress: Table


def _tables(metadata: MetaData) -> _Tables:
    entries = Table(
        "points_entries",
        metadata,
        Column("seq", AUTO_ID, primary_key=True, autoincrement=True),
        Column("entry_id", String, nullable=False, unique=True),
        Column("account", String, nullable=False),
        Column("amount", BigInteger, nullable=False),  # + earn and grant, - spend
        Column("kind", String, nullable=False),  # earn | spend | grant
        Column("work", String),  # WorkKind of an earn entry
        Column("server_id", String),
        Column("client", String),
        Column("request_id", String),
        Column("tokens", BigInteger, nullable=False),
        Column("blocks", Integer, nullable=False),
        Column("calls", Integer, nullable=False),
        Column("detail", String, nullable=False),
        Column("at_ns", BigInteger, nullable=False),
        Index(None, "account", "seq"),
        Index(None, "server_id"),
    )
    accounts = Table(
        "points_accounts",
        metadata,
        Column("account", String, primary_key=True),
        Column("balance", BigInteger, nullable=False),
        # The last line of defence: no code path may leave a balance below zero.
        CheckConstraint("balance >= 0", name="points_balance_not_negative"),
    )
    progress = Table(
        "points_progress",
        metadata,
        Column("server_id", String, primary_key=True),
        Column("work", String, primary_key=True),
        Column("token_blocks", BigInteger, nullable=False),
    )
    return _Tables(entries, accounts, progress)


def _sqlite_autocommit(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy issues BEGIN itself (see _sqlite_begin); pysqlite would defer it.
    dbapi_connection.isolation_level = None


def _sqlite_begin(conn: Connection) -> None:
    # A deferred transaction that reads and then writes cannot take the write lock once
    # another writer has committed since its read (SQLite fails at once, without waiting),
    # so writers take it at BEGIN, waiting their turn, and check-then-write is atomic.
    write = conn.get_execution_options().get("points_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class PointsLedger(SqlStore):
    """Points balances and their history in one database (see the module docstring).

    ``url`` is a SQLAlchemy URL, SQLite or PostgreSQL; None means the configured
    ``database.points_url`` (by default ``sqlite:///<state_dir>/points.db``). ``schema``
    (PostgreSQL only) keeps the tables in that schema, created if missing. ``policy``
    prices the work :meth:`record_work` credits.
    """

    _error = PointsError
    _url_setting = "points_url"
    _sqlite_connect_args: ClassVar[Mapping[str, Any]] = {"timeout": 30.0}

    def __init__(
        self,
        url: str | None = None,
        *,
        schema: str | None = None,
        policy: PointsPolicy | None = None,
    ) -> None:
        super().__init__(url, schema=schema)
        self.policy = policy or PointsPolicy()
        self._t = _tables(self._metadata)

    def _listen_sqlite(self, engine: Engine, file_backed: bool) -> None:
        event.listen(engine, "connect", _sqlite_autocommit)
        super()._listen_sqlite(engine, file_backed)  # WAL lets the CLI read while the bank writes
        event.listen(engine, "begin", _sqlite_begin)

    def _create_tables(self, conn: Connection) -> None:
        if self._dialect == "postgresql":
            # Serialise creators: two processes' CREATE TABLEs would otherwise race.
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('rayfin.points'))"))
        super()._create_tables(conn)

    def ensure_tables(self) -> None:
        """Create the tables now if missing (otherwise done on first use); this also
        checks that the database can be reached."""
        if not self._created:
            # A transaction of its own, a writer's whatever the first use is (see _sqlite_begin).
            with super()._begin(points_write=True):
                pass

    @contextmanager
    def _begin(self, *, write: bool = False) -> Iterator[Connection]:
        """A transaction, that takes SQLite's write lock at once if it will ``write``."""
        self.ensure_tables()
        with super()._begin(points_write=write) as conn:
            yield conn

    def _credit(self, conn: Connection, credits: dict[str, int]) -> None:
        # Sorted, so concurrent transactions lock account rows in one order: no deadlock.
        rows = [{"account": a, "balance": n} for a, n in sorted(credits.items()) if n > 0]
        if not rows:
            return
        t = self._t.accounts
        stmt = self._insert(t)
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.account], set_={"balance": t.c.balance + stmt.excluded.balance}
        )
        for row in rows:
            conn.execute(stmt, row)

    # --- writes ----------------------------------------------------------------------------

    def record_work(self, records: Sequence[WorkRecord]) -> int:
        """Credit each record's operator for its work, in one transaction; a record whose
        ``record_id`` is already stored is skipped. Returns the points newly credited."""
        unique: dict[str, WorkRecord] = {}
        for record in records:
            if not isinstance(record, WorkRecord):
                raise PointsError(f"record_work takes WorkRecords, got {type(record).__name__}")
            unique.setdefault(_entry_id("earn", record.record_id), record)
        if not unique:
            return 0
        t = self._t
        with self._begin(write=True) as conn:
            # 1. Claim the records: those whose entry was already stored come back from
            # nowhere (ON CONFLICT DO NOTHING), so a replay is found even when a
            # concurrent transaction is inserting the same records right now.
            rows = [
                {
                    "entry_id": entry_id,
                    "account": r.operator,
                    "amount": 0,
                    "kind": "earn",
                    "work": r.kind,
                    "server_id": r.server_id,
                    "client": r.client,
                    "request_id": r.request_id,
                    "tokens": r.tokens,
                    "blocks": r.blocks,
                    "calls": r.calls,
                    "detail": "",
                    "at_ns": r.at_ns,
                }
                for entry_id, r in sorted(unique.items())
            ]
            fresh: set[str] = set()
            for i in range(0, len(rows), _CHUNK):
                stmt = (
                    self._insert(t.entries)
                    .values(rows[i : i + _CHUNK])
                    .on_conflict_do_nothing(index_elements=[t.entries.c.entry_id])
                    .returning(t.entries.c.entry_id)
                )
                fresh.update(conn.execute(stmt).scalars())
            # 2. Price the new work against each server's running total, carrying fractions.
            by_total: dict[tuple[str, WorkKind], list[tuple[str, WorkRecord]]] = defaultdict(list)
            for entry_id, r in unique.items():  # in the caller's order: the meter's sequence
                if entry_id in fresh:
                    by_total[(r.server_id, r.kind)].append((entry_id, r))
            amounts: dict[str, int] = {}
            credits: dict[str, int] = defaultdict(int)
            progress = self._insert(t.progress)
            progress = progress.on_conflict_do_update(
                index_elements=[t.progress.c.server_id, t.progress.c.work],
                set_={"token_blocks": t.progress.c.token_blocks + progress.excluded.token_blocks},
            ).returning(t.progress.c.token_blocks)
            for (server_id, kind), items in sorted(by_total.items()):
                added = sum(r.token_blocks for _, r in items)
                after = conn.execute(
                    progress, {"server_id": server_id, "work": kind, "token_blocks": added}
                ).scalar_one()
                total = int(after) - added
                for entry_id, r in items:
                    points = self.policy.points_between(kind, total, total + r.token_blocks)
                    total += r.token_blocks
                    if points:
                        amounts[entry_id] = points
                        credits[r.operator] += points
            if amounts:
                conn.execute(
                    update(t.entries)
                    .where(t.entries.c.entry_id == bindparam("b_entry_id"))
                    .values(amount=bindparam("b_amount")),
                    [{"b_entry_id": e, "b_amount": n} for e, n in sorted(amounts.items())],
                )
            self._credit(conn, credits)
        return sum(amounts.values())

    def charge(
        self,
        account: str,
        points: int,
        request_id: str,
        *,
        server_id: str | None = None,
        detail: str = "",
    ) -> bool:
        """Debit ``points`` from ``account`` for request ``request_id``, once: the same
        (account, request) again is a no-op, and returns False instead of True. Raises
        :class:`InsufficientPointsError` when the balance is below ``points`` (nothing is
        charged then). A charge of 0 points records nothing and returns False."""
        _name(account, "account")
        _name(request_id, "request_id")
        _count(points, "points")
        if points == 0:
            return False
        entry_id = _entry_id("spend", account, request_id)
        t = self._t
        with self._begin(write=True) as conn:
            # The row lock serialises every charge of this account until commit, so the
            # balance read here is the one the debit applies to.
            balance = conn.execute(
                select(t.accounts.c.balance)
                .where(t.accounts.c.account == account)
                .with_for_update()
            ).scalar_one_or_none()
            charged = conn.execute(
                select(t.entries.c.amount).where(t.entries.c.entry_id == entry_id)
            ).scalar_one_or_none()
            if charged is not None:
                if -charged != points:
                    raise PointsError(
                        f"request {request_id!r} of {account!r} was already charged "
                        f"{-charged} points, not {points}"
                    )
                return False
            if balance is None or balance < points:
                raise InsufficientPointsError(account, int(balance or 0), points)
            conn.execute(
                t.entries.insert(),
                {
                    "entry_id": entry_id,
                    "account": account,
                    "amount": -points,
                    "kind": "spend",
                    "server_id": server_id,
                    "request_id": request_id,
                    "tokens": 0,
                    "blocks": 0,
                    "calls": 1,
                    "detail": detail,
                    "at_ns": time.time_ns(),
                },
            )
            conn.execute(
                update(t.accounts)
                .where(t.accounts.c.account == account)
                .values(balance=t.accounts.c.balance - points)
            )
        return True

    def grant(self, account: str, points: int, reason: str, *, grant_id: str | None = None) -> bool:
        """Credit ``points`` to ``account`` by an operator's decision (how a new client
        gets its first points). With a ``grant_id``, a second grant of that id is a no-op
        returning False; without one, every call credits."""
        _name(account, "account")
        _count(points, "points", positive=True)
        _name(reason, "reason")
        entry_id = _entry_id("grant", grant_id or uuid.uuid4().hex)
        t = self._t
        with self._begin(write=True) as conn:
            stmt = (
                self._insert(t.entries)
                .values(
                    entry_id=entry_id,
                    account=account,
                    amount=points,
                    kind="grant",
                    tokens=0,
                    blocks=0,
                    calls=1,
                    detail=reason,
                    at_ns=time.time_ns(),
                )
                .on_conflict_do_nothing(index_elements=[t.entries.c.entry_id])
                .returning(t.entries.c.entry_id)
            )
            if conn.execute(stmt).first() is None:
                return False
            self._credit(conn, {account: points})
        return True

    # --- reads -----------------------------------------------------------------------------

    def balance(self, account: str) -> int:
        """The points ``account`` holds now (0 for an account never credited)."""
        t = self._t.accounts
        with self._begin(write=False) as conn:
            value = conn.execute(
                select(t.c.balance).where(t.c.account == account)
            ).scalar_one_or_none()
        return int(value or 0)

    def balances(self) -> dict[str, int]:
        """Every account ever credited and its balance, by account name."""
        t = self._t.accounts
        with self._begin(write=False) as conn:
            rows = conn.execute(select(t.c.account, t.c.balance).order_by(t.c.account))
            return {account: int(balance) for account, balance in rows}

    def history(self, account: str | None = None, limit: int | None = 100) -> pd.DataFrame:
        """Ledger entries, newest first, of ``account`` if given; at most ``limit``."""
        if limit is not None:
            _count(limit, "limit")
        t = self._t.entries
        query = select(*(c for c in t.c if c.name != "seq"))
        if account is not None:
            query = query.where(t.c.account == account)
        return self._frame(query.order_by(t.c.seq.desc()).limit(limit))

    def earned_by_server(self) -> pd.DataFrame:
        """What each server earned its operator: tokens per kind of work, backward
        passes, token-blocks and points, one row per (server, operator)."""
        t = self._t.entries

        def total(value: Any, kind: WorkKind | None = None) -> Any:
            if kind is not None:
                value = case((t.c.work == kind, value), else_=0)
            return cast(func.coalesce(func.sum(value), 0), BigInteger)

        query = (
            select(
                t.c.server_id,
                t.c.account.label("operator"),
                *(total(t.c.tokens, kind).label(f"{kind}_tokens") for kind in WORK_KINDS),
                total(t.c.calls, "backward").label("backward_passes"),
                total(t.c.tokens * t.c.blocks).label("token_blocks"),
                total(t.c.amount).label("points"),
            )
            .where(t.c.kind == "earn")
            .group_by(t.c.server_id, t.c.account)
            .order_by(t.c.server_id, t.c.account)
        )
        frame = self._frame(query)
        numeric = [c for c in frame.columns if c not in ("server_id", "operator")]
        return frame.astype(dict.fromkeys(numeric, "int64"))
