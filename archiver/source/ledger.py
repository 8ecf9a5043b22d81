"""archiver's own ledger table: the database side of the commit protocol.

A batch inserts its row (batch id and manifest) in the same transaction as its
DELETEs, so the ledger says "committed" exactly when the rows are gone. After a
crash, a batch id found in storage but not in the ledger never committed.

Each database also gets a random *source id*, written into every marker and
manifest, so that recovery never judges another database's batch by this
database's ledger when two databases share one archive root.

PostgreSQL: table ``archiver.batch`` in a schema of its own. SQLite: table
``archiver_batch`` in the Prefect file (an attached database would not commit
atomically with the deletes in WAL mode). In-flight batches on PostgreSQL hold a
transaction-scoped advisory lock on their batch id, so recovery can tell a
crashed batch from one that another archiver is still working on.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.source.dialect import from_db_time

_TABLE = {"postgresql": "archiver.batch", "sqlite": "archiver_batch"}
_SOURCE = {"postgresql": "archiver.source", "sqlite": "archiver_source"}
_CREATE = {
    "postgresql": [
        # IF NOT EXISTS is not safe against a concurrent CREATE (a unique violation in
        # pg_namespace); archivers starting together take turns on this lock.
        "SELECT pg_advisory_xact_lock(7351642991)",
        "CREATE SCHEMA IF NOT EXISTS archiver",
        "CREATE TABLE IF NOT EXISTS archiver.batch (batch_id text PRIMARY KEY,"
        " committed_at timestamptz NOT NULL DEFAULT now(), manifest text NOT NULL)",
        "CREATE TABLE IF NOT EXISTS archiver.source (source_id text PRIMARY KEY)",
    ],
    "sqlite": [
        "CREATE TABLE IF NOT EXISTS archiver_batch (batch_id TEXT PRIMARY KEY,"
        " committed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),"
        " manifest TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS archiver_source (source_id TEXT PRIMARY KEY)",
    ],
}


async def ensure_ledger(conn: AsyncConnection) -> str:
    """Create the ledger if it is missing and return this database's source id.

    Idempotent; run it in a write transaction, which the caller commits.
    """
    for statement in _CREATE[conn.dialect.name]:
        await conn.execute(text(statement))
    table = _SOURCE[conn.dialect.name]
    found = (await conn.execute(text(f"SELECT source_id FROM {table}"))).scalar()
    if found is not None:
        return str(found)
    source_id = str(uuid.uuid4())
    await conn.execute(text(f"INSERT INTO {table} (source_id) VALUES (:id)"), {"id": source_id})
    return source_id


async def record_commit(conn: AsyncConnection, batch_id: str, manifest_json: str) -> None:
    table = _TABLE[conn.dialect.name]
    await conn.execute(
        text(f"INSERT INTO {table} (batch_id, manifest) VALUES (:batch_id, :manifest)"),
        {"batch_id": batch_id, "manifest": manifest_json},
    )


async def forget_batch(conn: AsyncConnection, batch_id: str) -> bool:
    """Drop a batch that is being rewritten; False if it was not (or no longer) there."""
    table = _TABLE[conn.dialect.name]
    result = await conn.execute(
        text(f"DELETE FROM {table} WHERE batch_id = :batch_id"), {"batch_id": batch_id}
    )
    return bool(result.rowcount == 1)


async def committed_manifest(conn: AsyncConnection, batch_id: str) -> str | None:
    """The manifest a committed batch recorded, or None if it never committed."""
    table = _TABLE[conn.dialect.name]
    result = await conn.execute(
        text(f"SELECT manifest FROM {table} WHERE batch_id = :batch_id"), {"batch_id": batch_id}
    )
    value = result.scalar()
    return None if value is None else str(value)


def _lock_key(batch_id: str) -> int:
    return int.from_bytes(hashlib.sha256(batch_id.encode()).digest()[:8], "big", signed=True)


async def hold_batch_lock(conn: AsyncConnection, batch_id: str) -> None:
    """Mark ``batch_id`` as in flight until this transaction ends (PostgreSQL only)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(batch_id)})


async def batch_in_flight(conn: AsyncConnection, batch_id: str) -> bool:
    """True if another transaction still holds ``batch_id`` (PostgreSQL only).

    On SQLite a batch holds the write lock for its whole life, so a caller that
    itself holds the write lock knows no other batch is in flight.
    """
    if conn.dialect.name != "postgresql":
        return False
    got = await conn.execute(
        text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _lock_key(batch_id)}
    )
    return not bool(got.scalar())


@dataclass(frozen=True)
class LedgerStatus:
    source_id: str | None
    batches: int
    last_committed_at: datetime | None


async def ledger_status(conn: AsyncConnection) -> LedgerStatus | None:
    """What the ledger holds, read-only; None if archiver never ran on this database."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        exists = "SELECT to_regclass('archiver.batch') IS NOT NULL"
    else:
        exists = (
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'archiver_batch'"
        )
    if not (await conn.execute(text(exists))).scalar():
        return None
    source = (await conn.execute(text(f"SELECT min(source_id) FROM {_SOURCE[dialect]}"))).scalar()
    count, last = (
        await conn.execute(text(f"SELECT count(*), max(committed_at) FROM {_TABLE[dialect]}"))
    ).one()
    return LedgerStatus(
        None if source is None else str(source),
        int(count),
        None if last is None else from_db_time(last),
    )
