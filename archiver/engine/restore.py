"""Putting archived rows back into a Prefect database.

Rows are read from the archive (manifests first, so only the batches that hold
the wanted runs are opened), converted back to the target dialect's storage
conventions, and inserted in foreign-key order (shared/prefect-schema.md §4.8)
by :mod:`archiver.source.restore_rows`: artifacts; flow runs without their
``state_id`` and ``parent_task_run_id``; task runs; states; then those two
links; then inputs, logs and cache entries. Rows that already exist are
skipped (``ON CONFLICT DO NOTHING``) or, with ``on_conflict="error"``, refused
before anything is written. One transaction: a failed restore writes nothing.

Sweep batches (orphans, standalone task runs, collections, events) are
restored whole, and only when named with ``--batch``. Artifact collections are
never copied back blindly: after the artifacts are in, each of their keys gets
its collection pointed at the newest artifact with that key (created, with the
archived row's id, if the key has none), as Prefect itself would.

Columns are matched by name against the target's reflected columns: a column
the target lacks is reported and left out; a column the archive lacks takes the
target's default. Restored runs can be archived again later; they get new batch
ids, so the archive never holds two copies under one name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.archive.catalog import list_batches
from archiver.archive.manifest import BatchManifest
from archiver.archive.storage import STORAGE_RETRY, Storage
from archiver.engine.commit import DatabaseSide, StepHook, commit_batches, no_hook
from archiver.engine.rewrite import Rewrite, plan_rewrite
from archiver.errors import ArchiverError, ConfigError
from archiver.models import RetryPolicy
from archiver.source import ledger
from archiver.source.collections import reconcile_keys
from archiver.source.engine import (
    DatabaseOptions,
    create_engine,
    translate_error,
    write_transaction_options,
)
from archiver.source.restore_rows import INSERT_ORDER, insert_restored
from archiver.source.schema import PrefectSchema, inspect_schema


@dataclass(frozen=True)
class RestoreOptions:
    database: DatabaseOptions
    storage_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    run_ids: tuple[str, ...] = ()  # top-level runs (their whole trees)
    batch_ids: tuple[str, ...] = ()
    ended_after: datetime | None = None
    ended_before: datetime | None = None
    on_conflict: Literal["skip", "error"] = "skip"
    dry_run: bool = False
    storage_retry: RetryPolicy = STORAGE_RETRY


@dataclass
class RestoreReport:
    dry_run: bool
    batches: list[str] = field(default_factory=list)
    runs: int = 0
    inserted: dict[str, int] = field(default_factory=dict)
    existing: dict[str, int] = field(default_factory=dict)
    dropped_columns: dict[str, list[str]] = field(default_factory=dict)
    #: batches rewritten without the restored rows (restores into their own database)
    rewritten: list[str] = field(default_factory=list)


async def restore(options: RestoreOptions, hook: StepHook | None = None) -> RestoreReport:
    """Restore the selected runs; raises ArchiverError, and then nothing was written.

    Into the database the rows came from, a restore *moves* them: the batches
    they were in are rewritten without them, in the same commit, so a run is
    never both in the database and in the archive and can be archived again.
    Into another database it copies, and the archive stays as it is.
    ``hook(step, batch_id)`` is called after each step of each rewrite
    (:data:`archiver.engine.commit.REWRITE_STEPS`); tests use it to inject faults.
    """
    _check_selection(options)
    storage = Storage(options.storage_url, options.storage_options, options.storage_retry)
    options = await asyncio.to_thread(_through_compactions, storage, options)
    manifests = await asyncio.to_thread(_select_batches, storage, options)
    batches = await asyncio.to_thread(_read_batches, storage, manifests)
    runs = [batches[m.batch_id] for m in manifests if m.kind == "runs"]
    swept = [batches[m.batch_id] for m in manifests if m.kind != "runs"]
    tables = _with_swept(_within_trees(_concat(runs), options) if runs else {}, _concat(swept))
    report = RestoreReport(options.dry_run, [m.batch_id for m in manifests])
    report.runs = sum(1 for run in tables["flow_run"].to_pylist() if not run["parent_task_run_id"])
    engine = create_engine(options.database)
    try:
        async with engine.connect() as conn:
            await write_transaction_options(conn)
            transaction = await conn.begin()
            await _restore(conn, await inspect_schema(conn), tables, options, report)
            if options.dry_run:
                await transaction.rollback()
                return report
            rewrites = await _plan_rewrites(conn, manifests, batches, tables)
            side = _RestoreSide(conn, transaction, options.database.url)
            new_batches = [rewrite.new_batch() for rewrite in rewrites]
            await commit_batches(storage, side, new_batches, hook or no_hook)
    except SQLAlchemyError as exc:
        raise translate_error(exc, options.database.url) from None
    finally:
        await engine.dispose()
    report.rewritten = [rewrite.old.batch_id for rewrite in rewrites]
    return report


async def _plan_rewrites(
    conn: AsyncConnection,
    manifests: Sequence[BatchManifest],
    batches: dict[str, dict[str, pa.Table]],
    restored: dict[str, pa.Table],
) -> list[Rewrite]:
    """This database's batches without the restored rows (another database's: a copy)."""
    source_id = await ledger.ensure_ledger(conn)
    removed = {name: {str(i) for i in t.column("id").to_pylist()} for name, t in restored.items()}
    return [
        plan_rewrite(manifest, batches[manifest.batch_id], removed, source_id)
        for manifest in manifests
        if manifest.source_id == source_id
    ]


class _RestoreSide(DatabaseSide):
    """The restore's transaction: open from the start, it holds the restored rows."""

    replacing = "restored from"
    again = "run the restore again"


def _check_selection(options: RestoreOptions) -> None:
    if not (options.run_ids or options.batch_ids or options.ended_after or options.ended_before):
        raise ConfigError(
            "say what to restore",
            hint="pass run ids, --batch, or --ended-after/--ended-before",
        )


def _through_compactions(storage: Storage, options: RestoreOptions) -> RestoreOptions:
    """``--batch`` of a batch that `archiver compact` merged: its runs, where they are now."""
    if not options.batch_ids:
        return options
    batches = list_batches(storage)
    holders: list[str] = []
    roots: set[str] = set()
    for wanted in options.batch_ids:
        for manifest in batches:
            if manifest.batch_id == wanted:
                holders.append(wanted)
                roots |= set(manifest.root_ids)
            elif wanted in manifest.compacted_from:
                holders.append(manifest.batch_id)
                # runs restored out of the compacted batch since are no longer in it
                roots |= set(manifest.compacted_from[wanted]) & set(manifest.root_ids)
    if set(holders) <= set(options.batch_ids):
        return options  # no compacted batch involved
    if not roots:
        raise ArchiverError(
            f"the runs of batch {options.batch_ids[0]} are no longer in the archive",
            hint="`archiver ls` lists the batches",
        )
    run_ids = options.run_ids or tuple(sorted(roots))
    return replace(options, batch_ids=tuple(dict.fromkeys(holders)), run_ids=run_ids)


def _select_batches(storage: Storage, options: RestoreOptions) -> list[BatchManifest]:
    wanted_runs = set(options.run_ids)
    chosen = []
    for manifest in list_batches(storage):
        if options.batch_ids and manifest.batch_id not in options.batch_ids:
            continue
        if options.ended_after and manifest.end_time_max < options.ended_after:
            continue
        if options.ended_before and manifest.end_time_min >= options.ended_before:
            continue
        if wanted_runs and not wanted_runs & set(manifest.root_ids):
            continue
        if manifest.kind != "runs" and manifest.batch_id not in options.batch_ids:
            continue  # sweep rows come back only when their batch is named
        chosen.append(manifest)
    missing = wanted_runs - {root for m in chosen for root in m.root_ids}
    if missing:
        raise ArchiverError(
            f"no archived top-level run with id {sorted(missing)[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            hint="give the id of a top-level run; `archiver ls` lists the batches",
        )
    return chosen


def _read_batches(
    storage: Storage, manifests: Sequence[BatchManifest]
) -> dict[str, dict[str, pa.Table]]:
    """Every file of the chosen batches: batch id -> table -> rows."""
    return {
        manifest.batch_id: {
            record.table: pq.read_table(pa.BufferReader(storage.get(record.key)))
            for record in manifest.files
        }
        for manifest in manifests
    }


def _concat(batches: Iterable[dict[str, pa.Table]]) -> dict[str, pa.Table]:
    by_table: dict[str, list[pa.Table]] = {}
    for tables in batches:
        for name, table in tables.items():
            by_table.setdefault(name, []).append(table)
    return {
        name: pa.concat_tables(parts, promote_options="permissive")
        for name, parts in by_table.items()
    }


def _within_trees(tables: dict[str, pa.Table], options: RestoreOptions) -> dict[str, pa.Table]:
    """Keep only the rows of the selected runs' trees (all rows when none are named)."""
    empty = pa.table({"id": pa.array([], pa.string())})
    collections = tables.get("artifact_collection")
    tables = {name: tables.get(name, empty) for name in (*INSERT_ORDER, "flow")}
    runs = tables["flow_run"].to_pylist()
    roots = {r["id"] for r in runs if not r["parent_task_run_id"]}
    if options.ended_after or options.ended_before:
        roots = {r["id"] for r in runs if r["id"] in roots and _ended_within(r, options)}
    if options.run_ids:
        roots &= set(options.run_ids)
    run_ids, task_ids = _tree_ids(runs, tables["task_run"].to_pylist(), roots)
    state_ids = set(_column(tables["task_run_state"], "id", "task_run_id", task_ids))
    keep = {
        "flow_run": ("id", run_ids),
        "task_run": ("flow_run_id", run_ids),
        "flow_run_state": ("flow_run_id", run_ids),
        "task_run_state": ("task_run_id", task_ids),
        "flow_run_input": ("flow_run_id", run_ids),
        "task_run_state_cache": ("task_run_state_id", state_ids),
    }
    for name, (column, ids) in keep.items():
        tables[name] = _filter(tables[name], column, ids)
    for name in ("log", "artifact"):
        tables[name] = _rows_of_runs(tables[name], run_ids, task_ids)
    if collections is not None and tables["artifact"].num_rows:
        artifact_ids = set(tables["artifact"].column("id").to_pylist())
        tables["artifact_collection"] = _filter(collections, "latest_id", artifact_ids)
    return tables


def _with_swept(tables: dict[str, pa.Table], swept: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Add the rows of sweep batches (restored whole) to the rows of run trees."""
    empty = pa.table({"id": pa.array([], pa.string())})
    merged = {name: tables.get(name, empty) for name in (*INSERT_ORDER, "flow")} | tables
    for name, rows in swept.items():
        if name in merged and merged[name].num_rows:
            merged[name] = pa.concat_tables([merged[name], rows], promote_options="permissive")
        else:
            merged[name] = rows
    return merged


def _ended_within(run: dict[str, Any], options: RestoreOptions) -> bool:
    end = run["end_time"]
    after_ok = options.ended_after is None or end >= options.ended_after
    return after_ok and (options.ended_before is None or end < options.ended_before)


def _tree_ids(
    runs: list[dict[str, Any]], task_runs: list[dict[str, Any]], roots: set[str]
) -> tuple[set[str], set[str]]:
    run_of_task = {t["id"]: t["flow_run_id"] for t in task_runs}
    parent_run = {r["id"]: run_of_task.get(r["parent_task_run_id"]) for r in runs}

    def root_of(run_id: str | None) -> str | None:
        seen = 0
        while run_id is not None and parent_run.get(run_id) and seen < 1000:
            run_id, seen = parent_run[run_id], seen + 1
        return run_id

    run_ids = {r["id"] for r in runs if root_of(r["id"]) in roots}
    task_ids = {t["id"] for t in task_runs if t["flow_run_id"] in run_ids}
    return run_ids, task_ids


def _column(table: pa.Table, wanted: str, by: str, ids: set[str]) -> Iterable[str]:
    for row in table.select([wanted, by]).to_pylist():
        if row[by] in ids:
            yield row[wanted]


def _filter(table: pa.Table, column: str, ids: set[str]) -> pa.Table:
    if table.num_rows == 0:
        return table
    mask = pa.array([value in ids for value in table.column(column).to_pylist()])
    return table.filter(mask)


def _rows_of_runs(table: pa.Table, run_ids: set[str], task_ids: set[str]) -> pa.Table:
    if table.num_rows == 0:
        return table
    rows = table.select(["flow_run_id", "task_run_id"]).to_pylist()
    mask = [r["flow_run_id"] in run_ids or r["task_run_id"] in task_ids for r in rows]
    return table.filter(pa.array(mask))


async def _restore(
    conn: AsyncConnection,
    schema: PrefectSchema,
    tables: dict[str, pa.Table],
    options: RestoreOptions,
    report: RestoreReport,
) -> None:
    flows = _latest_by_id(tables["flow"]) if tables["flow"].num_rows else tables["flow"]
    written = await insert_restored(conn, schema, tables, flows, options.on_conflict)
    report.inserted.update(written.inserted)
    report.existing.update(written.existing)
    report.dropped_columns.update(written.dropped_columns)
    if "artifact_collection" in schema.tables:
        tables["artifact_collection"] = await _reconcile_collections(conn, tables, report)


async def _reconcile_collections(
    conn: AsyncConnection, tables: dict[str, pa.Table], report: RestoreReport
) -> pa.Table:
    """Point the restored artifacts' collections at the newest artifact of each key.

    Returns the archived collection rows that are accounted for (their key has a
    collection again), which leave the archive with the restore.
    """
    archived = tables.get("artifact_collection")
    wanted: dict[str, str | None] = {}
    if archived is not None and archived.num_rows:
        wanted = {r["key"]: r["id"] for r in archived.select(["key", "id"]).to_pylist()}
    artifacts = tables["artifact"]
    if artifacts.num_rows and "key" in artifacts.column_names:
        for key in artifacts.column("key").to_pylist():
            if key is not None:
                wanted.setdefault(key, None)
    changed, settled = await reconcile_keys(conn, wanted)
    report.inserted["artifact_collection"] = changed
    if archived is None or not archived.num_rows:
        return pa.table({"id": pa.array([], pa.string())})
    return archived.filter(pc.is_in(archived["key"], value_set=pa.array(sorted(settled))))


def _latest_by_id(table: pa.Table) -> pa.Table:
    """One row per id: reference snapshots repeat across batches."""
    seen: dict[str, int] = {}
    for index, row_id in enumerate(table.column("id").to_pylist()):
        seen[row_id] = index
    return table.take(pa.array(sorted(seen.values())))
