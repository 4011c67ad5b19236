"""The SQLAlchemy plumbing shared by rayfin's stores of tables in a database.

:class:`SqlStore` holds one engine on a SQLite or PostgreSQL URL (by default one from
``settings.database``), with the tables of a :class:`~sqlalchemy.MetaData` created on first
use, in a PostgreSQL schema of their own if asked. What the tables are and how they are
used is up to each subclass: the trading :class:`~rayfin.trading.ledger.Ledger` and the LLM
:class:`~rayfin.llm.points.PointsLedger`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Self

import pandas as pd
from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Executable,
    Integer,
    MetaData,
    Table,
    create_engine,
    event,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.schema import CreateSchema

from rayfin.config import get_settings
from rayfin.errors import RayfinError

__all__ = ["AUTO_ID", "SqlStore", "enable_sqlite_wal"]

AUTO_ID = BigInteger().with_variant(Integer, "sqlite")
"""The type of an auto-incrementing key: SQLite only auto-increments a column declared
exactly ``INTEGER PRIMARY KEY``."""


def enable_sqlite_wal(dbapi_connection: Any, _record: Any = None) -> None:
    """Put a SQLite connection's database in WAL mode (a ``connect`` listener)."""
    # WAL lets readers (API, CLI, dashboards) query while a writer writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


class SqlStore:
    """Tables in one SQLite or PostgreSQL database, through SQLAlchemy 2.0 Core.

    ``url`` is a SQLAlchemy URL; None means the ``settings.database`` field named by
    :attr:`_url_setting`. ``schema`` (PostgreSQL only) keeps the tables in that schema,
    created if missing. Errors are :attr:`_error`, prefixed with the class's name. A subclass
    defines its tables on :attr:`_metadata` and works in :meth:`_begin` transactions.
    """

    _error: ClassVar[type[RayfinError]]
    """What a bad URL or a missing driver raises."""
    _url_setting: ClassVar[str]
    """The field of ``settings.database`` with the default URL."""
    _sqlite_connect_args: ClassVar[Mapping[str, Any]] = {}
    """DBAPI connect arguments on SQLite."""

    def __init__(self, url: str | None = None, *, schema: str | None = None) -> None:
        name = type(self).__name__
        url = url or getattr(get_settings().database, self._url_setting)
        assert url is not None  # Settings always derives one
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise self._error(f"{name}: not a database URL: {exc}") from None
        dialect = parsed.get_backend_name()
        if dialect not in ("sqlite", "postgresql"):
            raise self._error(f"{name}: SQLite or PostgreSQL only, got a {dialect} URL")
        if schema is not None and dialect != "postgresql":
            raise self._error(f"{name}: schema is for PostgreSQL only")
        file_backed = dialect == "sqlite" and parsed.database not in (None, "", ":memory:")
        if file_backed:
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._dialect = dialect
        self._schema = schema
        connect_args = dict(self._sqlite_connect_args) if dialect == "sqlite" else {}
        try:
            self._engine: Engine = create_engine(parsed, connect_args=connect_args)
        except (NoSuchModuleError, ImportError) as exc:
            raise self._error(f"{name}: no usable driver for {parsed.drivername}: {exc}") from None
        if dialect == "sqlite":
            self._listen_sqlite(self._engine, file_backed)
        self._metadata = MetaData(schema=schema)
        self._created = False

    def _listen_sqlite(self, engine: Engine, file_backed: bool) -> None:
        """Add the SQLite engine's event listeners: WAL mode on a database file."""
        if file_backed:
            event.listen(engine, "connect", enable_sqlite_wal)

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def schema(self) -> str | None:
        """The PostgreSQL schema holding the tables, or None for the default one."""
        return self._schema

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._dialect

    def close(self) -> None:
        """Release the engine's connections."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create_tables(self, conn: Connection) -> None:
        """Create the schema, if one is named, and the tables, where missing."""
        if self._schema is not None:
            conn.execute(CreateSchema(self._schema, if_not_exists=True))
        self._metadata.create_all(conn)

    @contextmanager
    def _begin(self, **options: Any) -> Iterator[Connection]:
        """One transaction, on a connection with these execution options. The first one
        creates the tables (:meth:`_create_tables`) before anything else."""
        with self._engine.connect() as conn:
            if options:
                conn.execution_options(**options)
            with conn.begin():
                if not self._created:
                    self._create_tables(conn)
                yield conn
        self._created = True  # only once the creating transaction committed

    def _insert(self, table: Table) -> Any:
        """An INSERT in the dialect's own form, which has ``ON CONFLICT``."""
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    def _frame(self, query: Executable) -> pd.DataFrame:
        """The rows ``query`` returns, as a frame with its columns."""
        with self._begin() as conn:
            result = conn.execute(query)
            return pd.DataFrame(result.fetchall(), columns=list(result.keys()))
