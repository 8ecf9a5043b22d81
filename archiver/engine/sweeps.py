"""Sweeps: rows that belong to no expired run tree, archived like the trees.

Each sweep is a :class:`~archiver.source.keyset.Walk` (which rows, found in one
keyset pass over an index) and a gatherer (what else must leave with them), both
defined with their SQL in :mod:`archiver.source.sweep_rows`. The
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

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.models import BatchContent, BatchKind
from archiver.source.keyset import Slice, Walk, count_rows, lock_rows, time_range
from archiver.source.schema import PrefectSchema
from archiver.source.sweep_rows import (
    FOREIGN_KEY_ORPHANS,
    OLD_EVENTS,
    ORPHAN_ARTIFACTS,
    ORPHAN_EVENT_RESOURCES,
    ORPHAN_LOGS,
    STALE_COLLECTIONS,
    STANDALONE_TASK_RUNS,
    Gatherer,
    gather_alone,
    gather_collections,
    gather_events,
    gather_task_run_trees,
)

SweepName = Literal["orphans", "collections", "events"]
DEFAULT_SWEEPS: tuple[SweepName, ...] = ("orphans", "collections")
DEFAULT_EVENTS_RETENTION = timedelta(days=7)


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
            Sweep("orphans", "orphans", ORPHAN_LOGS, cutoff, gather_alone),
            Sweep("orphans", "orphans", ORPHAN_ARTIFACTS, cutoff, gather_alone),
            Sweep(
                "orphans", "standalone_tasks", STANDALONE_TASK_RUNS, cutoff, gather_task_run_trees
            ),
        ]
        if schema.dialect == "sqlite":
            planned += [
                Sweep("orphans", "orphans", walk, cutoff, gather)
                for walk, gather in FOREIGN_KEY_ORPHANS
            ]
    if "collections" in options.sweeps:
        planned.append(
            Sweep("collections", "collections", STALE_COLLECTIONS, options.now, gather_collections)
        )
    if "events" in options.sweeps:
        planned += [
            Sweep("events", "events", OLD_EVENTS, events_cutoff, gather_events),
            Sweep("events", "events", ORPHAN_EVENT_RESOURCES, events_cutoff, gather_alone),
        ]
    return [sweep for sweep in planned if sweep.walk.table in schema.tables]


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
