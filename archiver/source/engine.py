"""Engines for the Prefect database, configured for maintenance work.

PostgreSQL (asyncpg): the archiver's own session gets a ``lock_timeout`` and a
generous ``statement_timeout`` (Prefect's API uses 10 s, which would kill big
batches), and planner settings that keep ``= ANY(<ids>)`` lookups on indexes
(see shared performance notes: random_page_cost 1.1 and jit off took a batch
from ~400 ms to ~20 ms).

SQLite (aiosqlite): every connection enables ``foreign_keys`` exactly as Prefect
does, before any BEGIN, and reads it back; ``busy_timeout`` makes us wait for
Prefect's writes instead of failing. SQLAlchemy emits BEGIN itself so that a
batch can ask for ``BEGIN IMMEDIATE`` (the write lock from the start).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event, exc, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from archiver.errors import ConfigError, DatabaseError, TransientDatabaseError

SQLITE_BEGIN_OPTION = "archiver_sqlite_begin"


@dataclass(frozen=True)
class DatabaseOptions:
    url: str
    lock_timeout: float = 30
    statement_timeout: float = 900
    busy_timeout: float = 60


def create_engine(options: DatabaseOptions) -> AsyncEngine:
    """Build an engine; raise ConfigError for a URL archiver cannot use."""
    url = _parse_url(options.url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, options)
    if url.get_backend_name() == "postgresql":
        return _postgres_engine(url, options)
    raise ConfigError(
        f"unsupported database {url.get_backend_name()!r} in database_url",
        hint="use postgresql+asyncpg://user:pass@host/db or sqlite+aiosqlite:///path/prefect.db",
    )


def _parse_url(text: str) -> URL:
    try:
        url = make_url(text)
    except exc.ArgumentError:
        raise ConfigError(
            f"database_url {_redact(text)!r} is not a database URL",
            hint="use postgresql+asyncpg://user:pass@host/db or sqlite+aiosqlite:///path/prefect.db",
        ) from None
    drivers = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
    wanted = drivers.get(url.get_backend_name())
    if wanted and url.get_driver_name() != wanted:
        url = url.set(drivername=f"{url.get_backend_name()}+{wanted}")
    return url


def _redact(text: str) -> str:
    try:
        return make_url(text).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return text.split("@")[-1]


def _sqlite_engine(url: URL, options: DatabaseOptions) -> AsyncEngine:
    path = url.database or ""
    if not path or path == ":memory:" or not Path(path).is_file():
        raise ConfigError(
            f"no SQLite database at {path or '(empty path)'}",
            hint="set database_url to sqlite+aiosqlite:///<PREFECT_HOME>/prefect.db, "
            "or set PREFECT_HOME",
        )
    engine = create_async_engine(url)
    busy_ms = int(options.busy_timeout * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys")
        enabled = cursor.fetchone()[0]
        cursor.close()
        if enabled != 1:
            raise DatabaseError("SQLite refused PRAGMA foreign_keys=ON")

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _postgres_engine(url: URL, options: DatabaseOptions) -> AsyncEngine:
    settings = {
        "application_name": "archiver",
        "lock_timeout": str(int(options.lock_timeout * 1000)),
        "statement_timeout": str(int(options.statement_timeout * 1000)),
        "random_page_cost": "1.1",
        "jit": "off",
        # Uploads happen inside the batch transaction; a server-wide idle timeout
        # would kill the session mid-batch.
        "idle_in_transaction_session_timeout": "0",
    }
    return create_async_engine(
        url,
        pool_pre_ping=True,
        connect_args={"server_settings": settings, "timeout": 15},
    )


async def write_transaction_options(conn: AsyncConnection) -> None:
    """Make the next BEGIN on ``conn`` take SQLite's write lock at once."""
    if conn.dialect.name == "sqlite":
        await conn.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})


@asynccontextmanager
async def read_only_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection that refuses writes.

    PostgreSQL: its transactions are READ ONLY and REPEATABLE READ (one snapshot
    for everything read); the pool resets both when the connection returns.
    SQLite: ``PRAGMA query_only``; the connection is discarded afterwards, so no
    later user of the pool inherits it.
    """
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            yield conn
            return
        await conn.execute(text("PRAGMA query_only = ON"))
        try:
            yield conn
        finally:
            await conn.invalidate()


_CONNECTION_LOST = {
    "ConnectionDoesNotExistError",
    "ConnectionFailureError",
    "AdminShutdownError",
    "CannotConnectNowError",
    "ConnectionResetError",
    "BrokenPipeError",
}


#: deadlock detected, lock_not_available (lock_timeout), serialization_failure
_CONFLICTS = {"40P01", "55P03", "40001"}


def _root_cause(error: BaseException) -> BaseException:
    """The driver's own exception under SQLAlchemy's and the asyncpg adapter's wrappers."""
    seen = error
    while True:
        inner = getattr(seen, "orig", None) or seen.__cause__
        if inner is None or inner is seen:
            return seen
        seen = inner


def translate_error(error: BaseException, url: str) -> DatabaseError:
    """Turn a driver or SQLAlchemy exception into one line with a hint."""
    where = _redact(url)
    original = _root_cause(error)
    name = type(original).__name__
    text = str(original).strip().splitlines()[0] if str(original).strip() else name
    if name in {"InvalidPasswordError", "InvalidAuthorizationSpecificationError"}:
        return DatabaseError(
            f"the database refused the credentials for {where}: {text}",
            hint="check the user and password in database_url",
        )
    if name == "InvalidCatalogNameError":
        return DatabaseError(
            f"database does not exist at {where}: {text}",
            hint="check the database name in database_url",
        )
    sqlstate = str(getattr(original, "sqlstate", "") or "")
    if name in _CONNECTION_LOST or sqlstate.startswith("08"):
        return TransientDatabaseError(
            f"lost the connection to the database at {where}: {text}",
            hint="check that the database server is up, then run archiver again",
        )
    if name == "InternalClientError":  # asyncpg, on a session the server ended under it
        return TransientDatabaseError(
            f"the connection to the database at {where} broke mid-statement: {text}",
            hint="check that the database server is up, then run archiver again",
        )
    if sqlstate in _CONFLICTS:
        return TransientDatabaseError(
            f"the database stopped a statement that conflicted with other work: {text}",
            hint="run archiver again, or raise lock_timeout if Prefect holds long locks",
        )
    if isinstance(original, ConnectionRefusedError | socket.gaierror | TimeoutError | OSError):
        return DatabaseError(
            f"cannot connect to the database at {where}: {text}",
            hint="check host and port in database_url and that the server is running",
        )
    if "database is locked" in text:
        return DatabaseError(
            f"the SQLite database at {where} stayed locked: {text}",
            hint="raise busy_timeout or run archiver when Prefect is less busy",
        )
    return DatabaseError(f"database error on {where}: {name}: {text}")
