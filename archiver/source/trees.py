"""Selecting expired top-level runs and gathering everything that belongs to them.

One batch works inside one transaction on one connection:

1. :func:`lock_roots` takes the oldest expired top-level runs of one calendar
   month (so a batch fills exactly one Hive partition), by keyset on
   ``(end_time, id)`` through ``ix_flow_run__end_time_desc``. On PostgreSQL the
   rows are locked ``FOR NO KEY UPDATE SKIP LOCKED``, so concurrent archivers take
   disjoint runs; on SQLite the batch holds the write lock (``BEGIN IMMEDIATE``).
2. :func:`gather` walks subflows at any depth, locks every flow run and task run
   of the trees ``FOR UPDATE`` (PostgreSQL), which stops Prefect from adding
   states, task runs or inputs under them until we commit (their foreign-key
   checks need a KEY SHARE lock), then reads every row that belongs to them.
   A root whose tree holds a non-terminal run is skipped whole, and so is one
   whose tree holds a flow run with the legal-hold tag (checked before the lock,
   and again on the locked rows, so a tag added meanwhile still protects it).

Retention policies (``archiver.source.retention``) reach :func:`lock_roots` and
:func:`count_expired` as a :class:`~archiver.source.retention.Selection`: extra
SQL conditions on the same keyset walk, which also name each root's rule.

:func:`count_trees` is the same walk and lookups, reading only ids and counting,
without locks: what ``archiver plan`` reports. Every lookup goes through one
:class:`~archiver.source.reader.Reader` per batch.

Logs and artifacts have no foreign keys and can still arrive; they are deleted
by the ids read here, so a late row stays in the database for a later sweep.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.models import Root, TableRows
from archiver.policy import TERMINAL_STATES
from archiver.source.dialect import EPOCH, from_db_time, next_month, row_lock, to_db_time
from archiver.source.reader import WITHOUT_FLOW_RUN, Reader, linked_ids
from archiver.source.retention import Selection, finished_root
from archiver.source.schema import REFERENCE_TABLES, TREE_TABLES, PrefectSchema

#: SQLite's planner (with or without ANALYZE) took ix_flow_run__parent_task_run_id for
#: ``parent_task_run_id IS NULL`` (or the state_type index) and sorted every top-level
#: run per batch; a unary + keeps those terms off indexes, so the walk uses the end_time
#: index (measured 52 ms -> 1 ms per batch at 10k runs) and still runs without it.
_EXPIRED_BY_DIALECT = {
    dialect: f"{finished_root('flow_run', off_indexes=dialect == 'sqlite')}"
    " AND flow_run.end_time < :cutoff"
    for dialect in ("postgresql", "sqlite")
}
#: The first term only bounds the index range (the OR alone is no index condition, so
#: each batch re-read every run before the keyset position that is still present).
_AFTER = (
    " AND end_time >= :after_time"
    " AND (end_time > :after_time OR (end_time = :after_time AND id > :after_id))"
)


@dataclass
class Gathered:
    """Everything one batch read: rows to archive and delete, and reference snapshots."""

    roots: list[Root]
    skipped_roots: list[str]
    tables: dict[str, TableRows]
    references: dict[str, TableRows] = field(default_factory=dict)
    #: roots whose tree carries the legal-hold tag: left alone
    held_roots: list[str] = field(default_factory=list)

    @property
    def row_count(self) -> int:
        return sum(len(rows) for rows in self.tables.values())


async def count_expired(
    conn: AsyncConnection, cutoff: datetime, selection: Selection | None = None
) -> tuple[int, datetime | None, datetime | None]:
    """How many top-level runs are expired, with the oldest and newest end_time.

    ``cutoff``: no run that ended at or after it counts; ``selection``: retention
    rules and legal hold that narrow the runs before it further.
    """
    where, params, statement = _narrowed(conn, selection)
    sql = (
        f"SELECT count(*), min(end_time), max(end_time)"
        f" FROM flow_run WHERE {_EXPIRED_BY_DIALECT[conn.dialect.name]}{where}"
    )
    params["cutoff"] = to_db_time(conn.dialect.name, cutoff)
    count, oldest, newest = (await conn.execute(statement(sql), params)).one()
    return (
        int(count),
        from_db_time(oldest) if oldest else None,
        from_db_time(newest) if newest else None,
    )


def _narrowed(
    conn: AsyncConnection, selection: Selection | None
) -> tuple[str, dict[str, Any], Any]:
    """The extra WHERE, its parameters, and how to build the statement."""
    if selection is None:
        return "", {}, text
    assert selection.dialect == conn.dialect.name, "a selection compiled for another dialect"
    where = f" AND {selection.where}" if selection.where else ""
    return where, dict(selection.params), selection.statement


async def lock_roots(
    conn: AsyncConnection,
    cutoff: datetime,
    limit: int,
    after: Root | None = None,
    selection: Selection | None = None,
    *,
    lock: bool = True,
) -> list[Root]:
    """Lock up to ``limit`` expired top-level runs after ``after``, oldest first, in one month.

    ``selection`` narrows them by retention rules and legal hold, and names each
    root's rule. A month whose remaining runs are all locked by other archivers is
    passed over. ``lock=False`` reads the same runs without locking them (for
    ``archiver plan``).
    """
    dialect = conn.dialect.name
    narrowed, params, statement = _narrowed(conn, selection)
    params |= {"limit": limit, "lower": to_db_time(dialect, EPOCH)}
    keyset = " AND end_time >= :lower"
    if after is not None:
        keyset += _AFTER
        params |= {"after_time": to_db_time(dialect, after.end_time), "after_id": after.id}
    # NO KEY UPDATE: enough to keep other archivers (and Prefect's UPDATEs) off these
    # runs, while Prefect may still add rows under a root that turns out to be live.
    # gather() upgrades the roots it keeps to FOR UPDATE.
    suffix = row_lock(dialect, "FOR NO KEY UPDATE SKIP LOCKED") if lock else ""
    rule = selection.rule_index if selection else "NULL"
    where = f"{_EXPIRED_BY_DIALECT[dialect]}{keyset}{narrowed}"
    first_sql = f"SELECT end_time FROM flow_run WHERE {where} ORDER BY end_time LIMIT 1"
    sql = (
        f"SELECT id, end_time, {rule} FROM flow_run WHERE {where}"
        f" ORDER BY end_time, id LIMIT :limit{suffix}"
    )
    while True:
        params["cutoff"] = to_db_time(dialect, cutoff)
        first = (await conn.execute(statement(first_sql), params)).scalar()
        if first is None:
            return []
        upper = min(cutoff, next_month(from_db_time(first)))
        params["cutoff"] = to_db_time(dialect, upper)
        rows = (await conn.execute(statement(sql), params)).all()
        if rows:
            return [
                Root(
                    str(row[0]),
                    from_db_time(row[1]),
                    selection.rule_name(int(row[2])) if selection else None,
                )
                for row in rows
            ]
        params["lower"] = params["cutoff"]


async def gather(
    conn: AsyncConnection,
    schema: PrefectSchema,
    roots: Sequence[Root],
    *,
    legal_hold_tag: str | None = None,
    lock: bool = True,
) -> Gathered:
    """Read the whole tree of every root; skip roots whose tree is not all terminal,
    and leave alone those whose tree has a flow run tagged ``legal_hold_tag``.

    ``lock=False`` reads without row locks (a read-only sample for ``archiver plan``).
    """
    reader = Reader(conn, schema)
    tree, skipped, held, kept = await _walk(reader, roots, legal_hold_tag)
    flow_runs = await reader.rows("flow_run", "id", kept, lock=lock)
    held |= _roots_on_hold(flow_runs, tree, legal_hold_tag)
    changed = _roots_with_live_runs(flow_runs, tree) - held
    if changed or held:
        skipped |= changed
        flow_runs = flow_runs.take(
            [i for i, run_id in enumerate(flow_runs.ids) if tree[run_id] not in skipped | held]
        )
    run_ids = flow_runs.ids
    task_runs = await reader.rows("task_run", "flow_run_id", run_ids, lock=lock)
    task_ids = task_runs.ids
    await reader.refuse_new_subflows(task_ids, set(tree))
    flow_states = await reader.rows("flow_run_state", "flow_run_id", run_ids)
    task_states = await reader.rows("task_run_state", "task_run_id", task_ids)
    result_artifacts = linked_ids(flow_states, "result_artifact_id") | linked_ids(
        task_states, "result_artifact_id"
    )
    tables = {
        "flow_run": flow_runs,
        "task_run": task_runs,
        "flow_run_state": flow_states,
        "task_run_state": task_states,
        "flow_run_input": await reader.rows("flow_run_input", "flow_run_id", run_ids),
        # A task run's logs and artifacts normally carry its flow run id too, so the
        # task-run lookup only takes those without one (it would read most logs twice).
        # One that names a flow run outside the tree is left in the database, not lost.
        "log": await reader.rows_by_any(
            "log", [("flow_run_id", run_ids, ""), ("task_run_id", task_ids, WITHOUT_FLOW_RUN)]
        ),
        "artifact": await reader.rows_by_any(  # locked: users may edit artifacts
            "artifact",
            [
                ("flow_run_id", run_ids, ""),
                ("task_run_id", task_ids, WITHOUT_FLOW_RUN),
                ("id", sorted(result_artifacts), ""),
            ],
            lock=lock,
        ),
        "task_run_state_cache": await reader.rows(
            "task_run_state_cache", "task_run_state_id", task_states.ids
        ),
    }
    references = {
        "flow": await reader.rows("flow", "id", sorted(linked_ids(flow_runs, "flow_id"))),
        "deployment": await reader.rows(
            "deployment", "id", sorted(linked_ids(flow_runs, "deployment_id"))
        ),
    }
    assert set(tables) == set(TREE_TABLES) and set(references) == set(REFERENCE_TABLES)
    kept_roots = [root for root in roots if root.id not in skipped | held]
    return Gathered(kept_roots, sorted(skipped), tables, references, sorted(held))


async def _walk(
    reader: Reader, roots: Sequence[Root], legal_hold_tag: str | None
) -> tuple[dict[str, str], set[str], set[str], list[str]]:
    """Walk the trees: (run id -> root id, roots with a live run, roots on legal hold,
    the runs of the other trees).

    Which trees are live or held is decided without locks, so that Prefect can go
    on working on their runs; gather() locks only the trees it keeps, then checks
    them again.
    """
    tree = await reader.tree_of([root.id for root in roots])
    statuses = await reader.statuses(list(tree), legal_hold_tag)
    held = {tree[run] for run, (_, on_hold) in statuses.items() if on_hold}
    skipped = {tree[run] for run, (state, _) in statuses.items() if state not in TERMINAL_STATES}
    skipped -= held
    kept = [run for run, root in tree.items() if root not in skipped | held]
    return tree, skipped, held, kept


async def count_trees(
    conn: AsyncConnection,
    schema: PrefectSchema,
    roots: Sequence[Root],
    *,
    legal_hold_tag: str | None = None,
) -> tuple[int, dict[str, int]]:
    """What gather() would take for these roots, as (roots kept, rows per tree table).

    The same walk and the same lookups as gather(), through the same indexes, but
    reading only ids and link columns (and counting logs, the largest table, in
    SQL), and locking nothing.
    """
    reader = Reader(conn, schema)
    _, skipped, held, run_ids = await _walk(reader, roots, legal_hold_tag)
    task_ids = await reader.ids("task_run", "flow_run_id", run_ids)
    flow_states = await reader.pairs("flow_run_state", "result_artifact_id", "flow_run_id", run_ids)
    task_states = await reader.pairs(
        "task_run_state", "result_artifact_id", "task_run_id", task_ids
    )
    results = sorted({value for _, value in flow_states + task_states if value is not None})
    artifacts = {
        *await reader.ids("artifact", "flow_run_id", run_ids),
        *await reader.ids("artifact", "task_run_id", task_ids, WITHOUT_FLOW_RUN),
        *await reader.ids("artifact", "id", results),
    }
    state_ids = [state_id for state_id, _ in task_states]
    counts = {
        "flow_run": len(run_ids),
        "task_run": len(task_ids),
        "flow_run_state": len(flow_states),
        "task_run_state": len(task_states),
        "flow_run_input": await reader.count("flow_run_input", "flow_run_id", run_ids),
        "log": await reader.count("log", "flow_run_id", run_ids)
        + await reader.count("log", "task_run_id", task_ids, WITHOUT_FLOW_RUN),
        "artifact": len(artifacts),
        "task_run_state_cache": await reader.count(
            "task_run_state_cache", "task_run_state_id", state_ids
        ),
    }
    assert set(counts) == set(TREE_TABLES)
    return len({root.id for root in roots} - skipped - held), counts


def _roots_with_live_runs(flow_runs: TableRows, tree: dict[str, str]) -> set[str]:
    states = flow_runs.column("state_type")
    return {
        tree[run_id]
        for run_id, state in zip(flow_runs.ids, states, strict=True)
        if state not in TERMINAL_STATES
    }


def _roots_on_hold(flow_runs: TableRows, tree: dict[str, str], tag: str | None) -> set[str]:
    if not tag:
        return set()
    tags = flow_runs.column("tags")  # rows or column-wise (COPY): JSON text or decoded
    return {
        tree[run_id]
        for run_id, value in zip(flow_runs.ids, tags, strict=True)
        if tag in _tags(value)
    }


def _tags(value: Any) -> list[Any]:
    tags = json.loads(value) if isinstance(value, str | bytes) else value
    return tags if isinstance(tags, list) else []
