"""Sweeps: rows that belong to no expired run tree, archived like the trees.

Each sweep is a :class:`~archiver.source.keyset.Walk` (which rows, found in one
keyset pass over an index) and a gatherer (what else must leave with them). The
pipeline proposes a slice of ids from the walk, then, inside one batch
transaction, locks and re-checks them here and hands the resulting
:class:`~archiver.models.BatchContent` to the same commit protocol as a run
batch: marker, files, read back, verified DELETE, ledger, COMMIT, manifest.

What "old" means, per table (rows at or after the cutoff are never taken):

=========================  ==========================  ======================
sweep (setting)            rows                        old by
=========================  ==========================  ======================
orphans                    log, artifact whose run     ``log.timestamp``,
                           (flow run, else task run)   ``artifact.updated`` and
                           does not exist              ``artifact.created``
orphans (standalone_tasks) terminal task runs with     ``task_run.end_time``
                           no flow run, with states,
                           logs and artifacts
orphans, SQLite only       task runs, states, inputs   ``updated``
                           whose parent is gone
                           (foreign keys were off)
collections                artifact_collection whose   never: taken at once
                           latest artifact is gone     (re-pointed or archived)
events (opt-in)            events, then                ``occurred``, against
                           event_resources             events_retention_period
=========================  ==========================  ======================

A log written a moment before its flow run row names a run that does not exist
*yet*; the age guard keeps it. On PostgreSQL the foreign keys of task runs,
states and inputs are enforced, so those orphans exist only in SQLite files
that were written with ``foreign_keys`` off, and only there are they walked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.models import BatchContent, BatchKind, Repoint, TableRows
from archiver.policy import TERMINAL_STATES
from archiver.source.collections import plan_stale
from archiver.source.keyset import Link, Slice, Walk, count_rows, lock_rows, time_range
from archiver.source.reader import Reader
from archiver.source.schema import PrefectSchema

SweepName = Literal["orphans", "collections", "events"]
DEFAULT_SWEEPS: tuple[SweepName, ...] = ("orphans", "collections")
DEFAULT_EVENTS_RETENTION = timedelta(days=7)

Gatherer = Callable[
    [AsyncConnection, PrefectSchema, TableRows],
    Awaitable[tuple[dict[str, TableRows], list[Repoint]]],
]

_RUN_LINKS = (Link("flow_run_id", "flow_run"), Link("task_run_id", "task_run"))
_TERMINAL = ", ".join(f"'{state}'" for state in TERMINAL_STATES)
_NO_SUBFLOW = (
    "NOT EXISTS (SELECT 1 FROM flow_run AS child WHERE child.parent_task_run_id = task_run.id)"
)
#: A subflow of a background task run would be detached (SET NULL) by deleting it: skip those.
_STANDALONE = (
    f"task_run.flow_run_id IS NULL AND task_run.state_type IN ({_TERMINAL}) AND {_NO_SUBFLOW}"
)
_NO_FLOW_RUN = " AND flow_run_id IS NULL"


@dataclass(frozen=True)
class SweepOptions:
    """Which sweeps to run and their cutoffs, as plain values."""

    sweeps: tuple[SweepName, ...]
    cutoff: datetime  # orphans: older than the run retention
    events_cutoff: datetime
    now: datetime
    batch_size: int  # rows of the walked table per batch


@dataclass(frozen=True)
class Sweep:
    """One walk, and how a batch of its rows is locked and completed."""

    name: SweepName
    kind: BatchKind
    walk: Walk
    cutoff: datetime
    gather: Gatherer

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.walk.table}"

    async def select(
        self, conn: AsyncConnection, schema: PrefectSchema, chosen: Slice
    ) -> BatchContent | None:
        """Lock the proposed rows that still qualify and gather the rest of the batch."""
        rows = await lock_rows(conn, schema, self.walk, chosen.ids, self.cutoff)
        if not rows.rows:
            return None
        tables, repoints = await self.gather(conn, schema, rows)
        return BatchContent(
            kind=self.kind,
            partition=chosen.partition,
            time_range=time_range(rows, self.walk.time_column),
            tables={name: table for name, table in tables.items() if len(table)},
            repoints=repoints,
        )


def plan_sweeps(options: SweepOptions, schema: PrefectSchema) -> list[Sweep]:
    """The sweeps ``options`` enable on this database, in the order they run."""
    cutoff, events_cutoff = options.cutoff, options.events_cutoff
    planned: list[Sweep] = []
    if "orphans" in options.sweeps:
        planned += [
            Sweep("orphans", "orphans", Walk("log", "timestamp", _RUN_LINKS), cutoff, _alone),
            Sweep(
                "orphans",
                "orphans",
                Walk("artifact", "updated", _RUN_LINKS, "artifact.created < :cutoff"),
                cutoff,
                _alone,
            ),
            Sweep(
                "orphans",
                "standalone_tasks",
                Walk("task_run", "end_time", where=_STANDALONE),
                cutoff,
                _task_run_trees,
            ),
        ]
        if schema.dialect == "sqlite":
            planned += _foreign_key_orphans(cutoff)
    if "collections" in options.sweeps:
        stale = Walk("artifact_collection", "updated", (Link("latest_id", "artifact"),))
        planned.append(Sweep("collections", "collections", stale, options.now, _collections))
    if "events" in options.sweeps:
        resources = Walk("event_resources", "occurred", (Link("event_id", "events"),))
        planned += [
            Sweep("events", "events", Walk("events", "occurred"), events_cutoff, _events),
            Sweep("events", "events", resources, events_cutoff, _alone),
        ]
    return [sweep for sweep in planned if sweep.walk.table in schema.tables]


def _foreign_key_orphans(cutoff: datetime) -> list[Sweep]:
    """Rows whose enforced parent is gone: only possible where foreign keys were off."""
    flow_run = (Link("flow_run_id", "flow_run"),)
    return [
        Sweep(
            "orphans",
            "orphans",
            Walk("task_run", "updated", flow_run, _NO_SUBFLOW),
            cutoff,
            _task_run_trees,
        ),
        Sweep("orphans", "orphans", Walk("flow_run_state", "updated", flow_run), cutoff, _alone),
        Sweep("orphans", "orphans", Walk("flow_run_input", "updated", flow_run), cutoff, _alone),
        Sweep(
            "orphans",
            "orphans",
            Walk("task_run_state", "updated", (Link("task_run_id", "task_run"),)),
            cutoff,
            _task_run_states,
        ),
    ]


async def count_sweeps(
    conn: AsyncConnection, schema: PrefectSchema, options: SweepOptions
) -> dict[str, int]:
    """Rows each enabled sweep would take now, keyed ``kind:table`` (for `archiver plan`).

    One counting statement per sweep; rows that leave with them (a task run's
    states, an event's resources) are not counted.
    """
    counts: dict[str, int] = {}
    for sweep in plan_sweeps(options, schema):
        counts[sweep.label] = counts.get(sweep.label, 0) + await count_rows(
            conn, sweep.walk, sweep.cutoff
        )
    return counts


async def _alone(
    conn: AsyncConnection, schema: PrefectSchema, rows: TableRows
) -> tuple[dict[str, TableRows], list[Repoint]]:
    return {rows.shape.name: rows}, []


async def _task_run_trees(
    conn: AsyncConnection, schema: PrefectSchema, task_runs: TableRows
) -> tuple[dict[str, TableRows], list[Repoint]]:
    """Task runs with their states, cache entries, and the logs and artifacts of no flow run."""
    reader = Reader(conn, schema)
    task_ids = task_runs.ids
    states = await reader.rows("task_run_state", "task_run_id", task_ids)
    results = _values(states, "result_artifact_id")
    tables = {
        "task_run": task_runs,
        "task_run_state": states,
        "task_run_state_cache": await reader.rows(
            "task_run_state_cache", "task_run_state_id", states.ids
        ),
        "log": await reader.rows("log", "task_run_id", task_ids, extra=_NO_FLOW_RUN),
        "artifact": await reader.rows_by_any(
            "artifact",
            [("task_run_id", task_ids, _NO_FLOW_RUN), ("id", sorted(results), "")],
            lock=True,
        ),
    }
    return tables, []


async def _task_run_states(
    conn: AsyncConnection, schema: PrefectSchema, states: TableRows
) -> tuple[dict[str, TableRows], list[Repoint]]:
    cache = await Reader(conn, schema).rows("task_run_state_cache", "task_run_state_id", states.ids)
    return {"task_run_state": states, "task_run_state_cache": cache}, []


async def _events(
    conn: AsyncConnection, schema: PrefectSchema, events: TableRows
) -> tuple[dict[str, TableRows], list[Repoint]]:
    """Events with their resources (no foreign key: resources are deleted first)."""
    resources = await Reader(conn, schema).rows(
        "event_resources", "event_id", events.ids, lock=True
    )
    return {"events": events, "event_resources": resources}, []


async def _collections(
    conn: AsyncConnection, schema: PrefectSchema, stale: TableRows
) -> tuple[dict[str, TableRows], list[Repoint]]:
    archived, repoints = await plan_stale(conn, stale)
    return {"artifact_collection": archived}, repoints


def _values(rows: TableRows, column: str) -> set[str]:
    index = rows.shape.column_names.index(column)
    return {str(row[index]) for row in rows.rows if row[index] is not None}
