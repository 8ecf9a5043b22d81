"""Database upkeep around archiving: reclaiming space and building missing indexes.

Deleting rows does not shrink a database:

* PostgreSQL leaves dead tuples until a VACUUM marks their space reusable, and
  the planner keeps the old row counts until an ANALYZE. :func:`reclaim_space`
  runs ``VACUUM (ANALYZE, SKIP_LOCKED)`` on the tables a run deleted from. Plain
  VACUUM takes a SHARE UPDATE EXCLUSIVE lock, which Prefect's reads and writes
  do not conflict with, so it is safe while Prefect runs; it makes the space
  reusable at once (the files stop growing) rather than when autovacuum gets
  there, and returns empty pages at the end of a table to the OS. It does not
  shrink files otherwise: that takes ``VACUUM FULL``, whose ACCESS EXCLUSIVE
  lock would stop Prefect, so archiver never runs it. SKIP_LOCKED passes over a
  table autovacuum is already working on instead of waiting for it.
* SQLite keeps freed pages in the file. With ``auto_vacuum = INCREMENTAL``,
  ``PRAGMA incremental_vacuum`` returns them cheaply; otherwise only ``VACUUM``
  does, which rewrites the whole file under an exclusive lock (Prefect waits)
  and needs free disk about the size of the file. Without that much free space
  archiver skips it and says so.

Maintenance runs after the batches have committed, so a failure here loses
nothing: it is reported as a warning, never raised.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from archiver.source.engine import translate_error
from archiver.source.schema import TREE_TABLES, IndexSpec

#: PRAGMA auto_vacuum values
_SQLITE_INCREMENTAL = 2


@dataclass
class MaintenanceReport:
    """What reclaiming space did. Sizes: the SQLite file (with its WAL), or on
    PostgreSQL the touched tables with their indexes and TOAST."""

    dialect: str
    statements: list[str] = field(default_factory=list)
    bytes_before: int | None = None
    bytes_after: int | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


async def reclaim_space(engine: AsyncEngine, tables: Sequence[str]) -> MaintenanceReport:
    """Make the space of deleted rows reusable (PostgreSQL) or give it back (SQLite).

    ``tables`` are the tables rows were deleted from; others are left alone.
    Never raises for a database error: it becomes a warning in the report.
    """
    started = time.monotonic()
    report = MaintenanceReport(engine.dialect.name)
    touched = [table for table in TREE_TABLES if table in set(tables)]
    try:
        if report.dialect == "postgresql":
            await _vacuum_postgres(engine, touched, report)
        else:
            await _vacuum_sqlite(engine, report)
    except (SQLAlchemyError, OSError) as exc:
        message = translate_error(exc, str(engine.url)).message
        report.warnings.append(f"reclaiming space failed (nothing archived is affected): {message}")
    report.seconds = time.monotonic() - started
    return report


async def _vacuum_postgres(
    engine: AsyncEngine, tables: list[str], report: MaintenanceReport
) -> None:
    if not tables:
        return
    sizes = "SELECT sum(pg_total_relation_size(c)) FROM unnest(CAST(:t AS regclass[])) AS c"
    # VACUUM cannot run inside a transaction block.
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        # Like Prefect's db_vacuum: maintenance may outlast any statement timeout.
        await conn.execute(text("SET statement_timeout = 0"))
        report.bytes_before = int((await conn.execute(text(sizes), {"t": tables})).scalar_one())
        for table in tables:
            statement = f"VACUUM (ANALYZE, SKIP_LOCKED) {table}"
            await conn.execute(text(statement))
            report.statements.append(statement)
        report.bytes_after = int((await conn.execute(text(sizes), {"t": tables})).scalar_one())


async def _vacuum_sqlite(engine: AsyncEngine, report: MaintenanceReport) -> None:
    path = Path(engine.url.database or "")
    report.bytes_before = sqlite_file_bytes(path)
    async with engine.connect() as conn:
        # The driver's own connection, in autocommit: VACUUM refuses to run inside
        # a transaction, and each PRAGMA must be stepped to its end to finish.
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None

        async def execute(statement: str) -> list[tuple[object, ...]]:
            cursor = await driver.execute(statement)
            rows = list(await cursor.fetchall())
            await cursor.close()
            return rows

        mode = (await execute("PRAGMA auto_vacuum"))[0][0]
        if mode == _SQLITE_INCREMENTAL:
            statements = ["PRAGMA incremental_vacuum"]
        else:
            free = shutil.disk_usage(path.parent).free
            if free < report.bytes_before:
                report.warnings.append(
                    f"VACUUM skipped: it needs about {report.bytes_before / 1e6:.0f} MB of free "
                    f"disk beside {path} and only {free / 1e6:.0f} MB are free"
                )
                return
            statements = ["VACUUM"]
        # Fold the WAL back into the file, or the file keeps its old size until Prefect
        # checkpoints (and a reader of the old pages would keep the WAL at full length).
        statements.append("PRAGMA wal_checkpoint(TRUNCATE)")
        for statement in statements:
            rows = await execute(statement)
            report.statements.append(statement)
        if rows and rows[0][0] == 1:  # wal_checkpoint: busy
            report.warnings.append(
                "the WAL could not be truncated while another connection reads; the file "
                "shrinks at the next checkpoint"
            )
    report.bytes_after = sqlite_file_bytes(path)


def sqlite_file_bytes(path: Path) -> int:
    """The size of a SQLite database on disk: the file and its write-ahead log."""
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


async def create_index(engine: AsyncEngine, spec: IndexSpec) -> str:
    """Build a missing index; return the statement. Raises SQLAlchemyError on failure.

    PostgreSQL builds it CONCURRENTLY, outside a transaction, so Prefect keeps
    writing meanwhile; a build that fails leaves an INVALID index behind, which
    is dropped again. SQLite builds it under its write lock (Prefect waits).
    """
    statement = spec.create_sql(engine.dialect.name)
    async with engine.connect() as conn:
        if engine.dialect.name != "postgresql":
            async with conn.begin():
                await conn.execute(text(statement))
            return statement
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("SET statement_timeout = 0"))
        try:
            await conn.execute(text(statement))
        except SQLAlchemyError:
            await conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {spec.name}"))
            raise
    return statement
