"""What ADBC's PostgreSQL driver does with one transaction, and which types it decodes how.

Run once by benchmarks.pg_paths on a copy of the template; each claim is checked, from a second
connection (psycopg, autocommit) where it is about visibility or locks.
"""

from __future__ import annotations

from typing import Any

import psycopg

from archiver.arrow_types import ARROW_TYPES
from archiver.models import TableShape
from benchmarks.pg_plans import expired_sql


def adbc_transaction_check(url: str) -> list[tuple[str, bool]]:
    """Can locks, reads, DELETE ... RETURNING, a ledger INSERT and COMMIT share one ADBC
    transaction, and does ROLLBACK restore the rows? Each claim, once ending in ROLLBACK and
    once in COMMIT."""
    checks: list[tuple[str, bool]] = []
    with adbc_connect(url) as conn, psycopg.connect(url, autocommit=True) as other:
        cur = conn.cursor()
        cur.execute("CREATE TABLE IF NOT EXISTS bench_ledger (batch_id text PRIMARY KEY)")
        conn.commit()
        for ending in ("rollback", "commit"):
            claims, logs, before = _one(cur, other, ending)
            getattr(conn, ending)()
            claims += _after(other, ending, logs, before)
            checks += [(f"[{ending}] {claim}", holds) for claim, holds in claims]
        cur.close()
    return checks


def adbc_connect(url: str) -> Any:
    """ADBC's DB-API connection (autocommit off), imported only when a check needs it."""
    import adbc_driver_postgresql.dbapi as adbc  # type: ignore[import-untyped]

    return adbc.connect(url)


def _one(
    cur: Any, other: psycopg.Connection[Any], ending: str
) -> tuple[list[tuple[str, bool]], str, int]:
    """Lock a root, delete its logs with RETURNING, write a ledger row; the transaction open.

    Returns the claims, which logs and how many there were."""

    def value(sql: str) -> Any:
        cur.execute(sql)
        return cur.fetchone()[0]

    root = str(value(f"SELECT id::text FROM flow_run WHERE {expired_sql()}"
                     " ORDER BY end_time LIMIT 1 FOR UPDATE"))  # fmt: skip
    txid = value("SELECT txid_current()")
    logs = f"FROM log WHERE flow_run_id = '{root}'"
    before, deleted = value(f"SELECT count(*) {logs}"), value(_DELETED)
    cur.execute(f"DELETE {logs} RETURNING id::text AS id, message")
    returned = cur.fetch_arrow_table().num_rows
    deleted = value(_DELETED) - deleted
    cur.execute(f"INSERT INTO bench_ledger VALUES ('{ending}')")
    claims = [
        ("the root stays locked FOR UPDATE until the transaction ends", _locked(other, root)),
        (f"DELETE RETURNING hands back Arrow: {returned} of {before} logs", returned == before > 0),
        (f"ADBC ran the DELETE once ({deleted} rows deleted, {returned} returned)",
         deleted == returned),
        ("lock, read, DELETE RETURNING and INSERT in one transaction (same txid)",
         value("SELECT txid_current()") == txid),
        ("another session still sees the rows", _count(other, f"SELECT count(*) {logs}") == before),
    ]  # fmt: skip
    return claims, logs, int(before)


#: The rows this transaction deleted from log so far (the statistics of the open transaction).
_DELETED = "SELECT n_tup_del FROM pg_stat_xact_user_tables WHERE relname = 'log'"


def _after(
    other: psycopg.Connection[Any], ending: str, logs: str, before: int
) -> list[tuple[str, bool]]:
    left = _count(other, f"SELECT count(*) {logs}")
    ledger = _count(other, f"SELECT count(*) FROM bench_ledger WHERE batch_id = '{ending}'")
    if ending == "rollback":
        return [
            ("ROLLBACK restores the rows and leaves no ledger row", (left, ledger) == (before, 0))
        ]
    return [("COMMIT removes the rows and keeps the ledger row", (left, ledger) == (0, 1))]


def _locked(other: psycopg.Connection[Any], root: str) -> bool:
    try:
        other.execute(f"SELECT 1 FROM flow_run WHERE id = '{root}' FOR UPDATE NOWAIT")
    except psycopg.errors.LockNotAvailable:
        return True
    return False


def _count(other: psycopg.Connection[Any], sql: str) -> int:
    row = other.execute(sql.encode()).fetchone()
    return int(str(row[0])) if row else -1


def adbc_types(url: str, shapes: dict[str, TableShape]) -> list[tuple[str, str, str, str]]:
    """(archive kind, PostgreSQL type, ADBC's Arrow type, archive Arrow type), one per kind and
    PostgreSQL type, read from the tree tables with no casts."""
    found: dict[tuple[str, str], tuple[str, str, str, str]] = {}
    with adbc_connect(url) as conn, conn.cursor() as cur:
        for table, shape in shapes.items():
            cur.execute(f"SELECT * FROM {table} LIMIT 0")
            schema = cur.fetch_arrow_table().schema
            for column in shape.columns:
                arrow = schema.field(column.name)
                pg_type = (arrow.metadata or {}).get(b"POSTGRESQL:type", b"?").decode()
                found.setdefault(
                    (column.kind, pg_type),
                    (column.kind, pg_type, str(arrow.type), str(ARROW_TYPES[column.kind])),
                )
    return sorted(found.values())
