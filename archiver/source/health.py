"""Read-only facts about a Prefect database that ``archiver doctor`` and ``archiver plan``
report: the server's version and clock, and SQLite's journal mode.

Each is one small statement that changes nothing, safe on a read-only connection
(``archiver.source.engine.read_only_connection``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.source.dialect import from_db_time


async def server_version(conn: AsyncConnection) -> str:
    """The database and its version, e.g. ``PostgreSQL 16.4`` or ``SQLite 3.45.1 (<path>)``."""
    if conn.dialect.name == "postgresql":
        version = (await conn.execute(text("SHOW server_version"))).scalar_one()
        return f"PostgreSQL {version}"
    version = (await conn.execute(text("SELECT sqlite_version()"))).scalar_one()
    return f"SQLite {version} ({conn.engine.url.database})"


async def sqlite_journal_warning(conn: AsyncConnection) -> str | None:
    """A warning if a SQLite database is not in WAL mode (None on PostgreSQL)."""
    if conn.dialect.name != "sqlite":
        return None
    mode = str((await conn.execute(text("PRAGMA journal_mode"))).scalar_one()).lower()
    if mode == "wal":
        return None
    return (
        f"SQLite journal_mode is {mode}, not wal: while archiver reads or writes, Prefect "
        "cannot write (Prefect's own setup enables WAL; run PRAGMA journal_mode=WAL)"
    )


async def database_now(conn: AsyncConnection) -> datetime:
    """The database server's clock (for SQLite, this host's: SQLite has no server)."""
    if conn.dialect.name == "postgresql":
        sql = "SELECT clock_timestamp()"
    else:
        sql = "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"
    return from_db_time((await conn.execute(text(sql))).scalar_one())
