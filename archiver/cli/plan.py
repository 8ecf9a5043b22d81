"""What a run would do, without writing or deleting anything: ``archiver plan``.

The plan walks the expired roots exactly as a run would (``lock_roots`` keyset,
one calendar month and ``batch_size`` roots at a time, stopping at
``max_batches``), but without locks, and counts each batch's trees with
:func:`~archiver.source.trees.count_trees`: the same tree walk and the same
index-backed lookups as ``gather``, reading only ids. So its rows per table are
what a run started now would archive, if nothing changes in between.

Bytes are *estimated*. The first batches (until ``batch_size`` runs and every
table with rows have been seen, at most SAMPLE_BATCHES) are read whole
(``gather`` without locks), and each table is encoded to Parquet with the
configured compression as a run writes it, and once more with its first row
only. The growth from one row to all of them, per row, is the cost of a row;
the one-row file less a row is the fixed cost of a file (schema, footer, column
statistics). A table's estimate is rows x cost per row + batches with its rows
x cost per file; flow and deployment snapshots count at their sampled size per
batch. A table with rows but none in the sample gets no estimate (None).

Read-only: on PostgreSQL one ``REPEATABLE READ, READ ONLY`` transaction (one
consistent snapshot; it takes only the ACCESS SHARE locks any SELECT takes, so
Prefect is never blocked). On SQLite the connection is ``query_only`` and each
batch is its own short read transaction, so even without WAL Prefect's writers
get in between batches.

The result has room for sections other features add: ``rules`` (counts per
retention rule) and ``sweeps`` (orphans per sweep) stay empty here.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.archive import codec
from archiver.engine.options import RunOptions, short_retention_warnings
from archiver.engine.sweeps import count_sweeps
from archiver.models import Root
from archiver.source.engine import create_engine, read_only_connection, translate_error
from archiver.source.health import sqlite_journal_warning
from archiver.source.retention import RuleCount, Selection, count_by_rule, select_expired
from archiver.source.schema import REFERENCE_TABLES, TREE_TABLES, PrefectSchema, inspect_schema
from archiver.source.trees import count_expired, count_trees, gather, lock_roots
from archiver.version import __version__


@dataclass
class Plan:
    """What ``archiver run`` would archive now. ``rows`` and ``estimated_bytes`` are per table."""

    dialect: str
    revision: str
    cutoff: datetime
    retention_period: timedelta
    expired_roots: int  # expired top-level runs, all of them
    oldest_end_time: datetime | None
    newest_end_time: datetime | None
    roots: int = 0  # of those, the ones a run would archive (within max_batches)
    skipped_roots: int = 0  # with a subflow that is not terminal: a run leaves them
    batches: int = 0
    limited_by_max_batches: bool = False
    rows: dict[str, int] = field(default_factory=dict)
    estimated_bytes: dict[str, int | None] = field(default_factory=dict)
    estimate_method: str = ""
    warnings: list[str] = field(default_factory=list)
    #: Per retention rule (when policies are configured): runs it selects and keeps.
    rules: list[RuleCount] = field(default_factory=list)
    #: Orphans per sweep; filled by the orphan-sweep feature when present.
    sweeps: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def total_estimated_bytes(self) -> int:
        return sum(value or 0 for value in self.estimated_bytes.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: datetimes as ISO 8601, the retention period in seconds."""
        data = asdict(self)
        for key in ("cutoff", "oldest_end_time", "newest_end_time"):
            data[key] = data[key].isoformat() if data[key] else None
        data["retention_period"] = self.retention_period.total_seconds()
        data["total_rows"] = self.total_rows
        data["total_estimated_bytes"] = self.total_estimated_bytes
        return data


async def plan(options: RunOptions) -> Plan:
    """Count what a run with these options would archive. Writes nothing, locks nothing.

    Raises ArchiverError subclasses (bad URL, unreachable database, not a Prefect
    database), like ``run``.
    """
    started = time.monotonic()
    engine = create_engine(options.database)
    try:
        async with read_only_connection(engine) as conn:
            result = await _plan(conn, options)
    except (SQLAlchemyError, OSError) as exc:
        raise translate_error(exc, options.database.url) from None
    finally:
        await engine.dispose()
    result.seconds = time.monotonic() - started
    return result


async def _plan(conn: AsyncConnection, options: RunOptions) -> Plan:
    now = options.now or datetime.now(UTC)
    schema = await inspect_schema(conn)
    policy = options.policy()
    selection = await select_expired(conn, policy, now)
    cutoff = selection.upper_cutoff
    expired, oldest, newest = await count_expired(conn, cutoff, selection)
    result = Plan(
        schema.dialect, schema.revision, cutoff, options.retention_period, expired, oldest, newest
    )
    if policy.rules:
        result.rules = await count_by_rule(conn, policy, now)
    result.warnings = [*schema.warnings, *short_retention_warnings(policy)]
    journal = await sqlite_journal_warning(conn)
    if journal:
        result.warnings.append(journal)
    await _walk(conn, schema, options, selection, result)
    result.sweeps = await count_sweeps(conn, schema, replace(options, now=now).sweep_options())
    return result


async def _walk(
    conn: AsyncConnection,
    schema: PrefectSchema,
    options: RunOptions,
    selection: Selection,
    result: Plan,
) -> None:
    """Count batch by batch, as a run would take them; measure the first few whole."""
    cutoff, hold = result.cutoff, options.legal_hold_tag
    result.rows = dict.fromkeys(TREE_TABLES, 0)
    files = dict.fromkeys(TREE_TABLES, 0)  # batches with rows of a table: one file each
    sample = _Sample()
    after: Root | None = None
    while True:
        if options.max_batches is not None and result.batches >= options.max_batches:
            result.limited_by_max_batches = await _more_left(conn, cutoff, after, selection)
            break
        roots = await lock_roots(conn, cutoff, options.batch_size, after, selection, lock=False)
        if not roots:
            break
        after = roots[-1]
        kept, counts = await count_trees(conn, schema, roots, legal_hold_tag=hold)
        if kept and sample.wants_more(options.batch_size, counts):
            await _measure(conn, schema, roots, options, sample)
        await _end_read(conn)
        result.roots += kept
        result.skipped_roots += len(roots) - kept
        result.batches += 1 if kept else 0
        for table, count in counts.items():
            result.rows[table] += count
            files[table] += 1 if count else 0
    result.estimated_bytes = sample.estimate(result.rows, files, result.batches)
    if sample.batches:
        result.estimate_method = (
            f"each table's Parquet size ({options.compression}) measured on the first "
            f"{sample.batches} batches ({sample.runs} runs), as bytes per row plus bytes per "
            "file, applied to its rows and batches"
        )


async def _end_read(conn: AsyncConnection) -> None:
    """On SQLite, end the read transaction between batches so Prefect's writers get in."""
    if conn.dialect.name == "sqlite":
        await conn.rollback()


async def _more_left(
    conn: AsyncConnection, cutoff: datetime, after: Root | None, selection: Selection
) -> bool:
    return bool(await lock_roots(conn, cutoff, 1, after, selection, lock=False))


#: Batches read whole to measure Parquet sizes, at most (plan reads only ids otherwise).
SAMPLE_BATCHES = 5


@dataclass
class _Sample:
    """Parquet sizes measured on whole batches, per table: files, rows, bytes of the
    files, and bytes of the same files with their first row only."""

    batches: int = 0
    runs: int = 0
    files: Counter[str] = field(default_factory=Counter)
    rows: Counter[str] = field(default_factory=Counter)
    full: Counter[str] = field(default_factory=Counter)
    single: Counter[str] = field(default_factory=Counter)

    def wants_more(self, batch_size: int, counts: dict[str, int]) -> bool:
        """Measure this batch too? Until a batch_size of runs, and every table seen."""
        if self.batches >= SAMPLE_BATCHES:
            return False
        unseen = any(count and table not in self.rows for table, count in counts.items())
        return self.runs < batch_size or unseen

    def per_row(self, table: str) -> float:
        # The growth from one row to all of them, per row.
        return max(self.full[table] - self.single[table], 0) / max(
            self.rows[table] - self.files[table], 1
        )

    def per_file(self, table: str) -> float:
        # A one-row file less its row: schema, footer, column statistics.
        return max(self.single[table] / self.files[table] - self.per_row(table), 0)

    def estimate(
        self, rows: dict[str, int], files: dict[str, int], batches: int
    ) -> dict[str, int | None]:
        estimates: dict[str, int | None] = {}
        for table, count in rows.items():
            if not count:
                estimates[table] = 0
            elif self.rows[table]:
                size = count * self.per_row(table) + files[table] * self.per_file(table)
                estimates[table] = round(size)
            else:
                estimates[table] = None  # rows, but none in the sample to measure
        snapshots = sum(self.full[name] for name in REFERENCE_TABLES)
        if snapshots:
            estimates["flow, deployment (snapshots)"] = round(snapshots / self.batches * batches)
        return estimates


async def _measure(
    conn: AsyncConnection,
    schema: PrefectSchema,
    roots: list[Root],
    options: RunOptions,
    sample: _Sample,
) -> None:
    """Read one batch whole (no locks) and encode each table as a run would."""
    compression = options.compression
    gathered = await gather(conn, schema, roots, legal_hold_tag=options.legal_hold_tag, lock=False)
    tables = [rows for rows in (*gathered.tables.values(), *gathered.references.values()) if rows]

    def measure() -> None:
        for rows in tables:
            name = rows.shape.name
            metadata = _file_metadata(name, schema)
            first = rows.take([0])
            sample.files[name] += 1
            sample.rows[name] += len(rows)
            sample.full[name] += len(codec.encode(rows, metadata, compression).data)
            sample.single[name] += len(codec.encode(first, metadata, compression).data)

    await asyncio.to_thread(measure)
    sample.batches += 1
    sample.runs += len(gathered.roots)


def _file_metadata(table: str, schema: PrefectSchema) -> dict[str, str]:
    """The schema metadata a run writes into each file (pipeline), with values of the
    same length: it is stored twice in every footer, so it counts."""
    return {
        "archiver.table": table,
        "archiver.role": "reference" if table in REFERENCE_TABLES else "archived",
        "archiver.batch_id": "20260101T000000Z-000000000000",
        "archiver.partition": "month=2026-01",
        "archiver.source_dialect": schema.dialect,
        "archiver.source_revision": schema.revision,
        "archiver.version": __version__,
        "archiver.source_id": "00000000-0000-0000-0000-000000000000",
    }
