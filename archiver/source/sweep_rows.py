"""What each sweep takes, in SQL: its walk, and the rows that must leave with each row.

A sweep (``archiver.engine.sweeps``) pairs a :class:`~archiver.source.keyset.Walk`
defined here (the table, its time column, the parent links that must be missing,
and any further SQL condition) with a gatherer defined here, which reads, inside
the batch's transaction, whatever must be archived and deleted together with the
locked rows: a standalone task run's states, cache entries, logs and artifacts;
an event's resources; or, for a collection, whether it is archived or re-pointed.

On PostgreSQL the foreign keys of task runs, states and inputs are enforced, so
their orphans (``FOREIGN_KEY_ORPHANS``) exist only in SQLite files that were
written with ``foreign_keys`` off, and only there are they walked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.models import Repoint, TableRows
from archiver.source.collections import plan_stale
from archiver.source.dialect import TERMINAL_STATES_SQL
from archiver.source.keyset import Link, Walk
from archiver.source.reader import WITHOUT_FLOW_RUN, Reader, linked_ids
from archiver.source.schema import PrefectSchema

#: Reads, in the batch's transaction, the tables that leave with a sweep's locked rows
#: (the rows themselves included), and the collections to re-point.
Gatherer = Callable[
    [AsyncConnection, PrefectSchema, TableRows],
    Awaitable[tuple[dict[str, TableRows], list[Repoint]]],
]

_RUN_LINKS = (Link("flow_run_id", "flow_run"), Link("task_run_id", "task_run"))
_FLOW_RUN_LINK = (Link("flow_run_id", "flow_run"),)
_NO_SUBFLOW = (
    "NOT EXISTS (SELECT 1 FROM flow_run AS child WHERE child.parent_task_run_id = task_run.id)"
)
#: A subflow of a background task run would be detached (SET NULL) by deleting it: skip those.
_STANDALONE = (
    f"task_run.flow_run_id IS NULL AND task_run.state_type IN ({TERMINAL_STATES_SQL})"
    f" AND {_NO_SUBFLOW}"
)

#: Logs whose run (flow run, else task run) does not exist.
ORPHAN_LOGS = Walk("log", "timestamp", _RUN_LINKS)
#: Artifacts whose run does not exist, old by both their update and their creation.
ORPHAN_ARTIFACTS = Walk("artifact", "updated", _RUN_LINKS, "artifact.created < :cutoff")
#: Terminal task runs of no flow run (background tasks), without subflows.
STANDALONE_TASK_RUNS = Walk("task_run", "end_time", where=_STANDALONE)
#: Collections whose latest artifact is gone.
STALE_COLLECTIONS = Walk("artifact_collection", "updated", (Link("latest_id", "artifact"),))
#: Events, by when they occurred.
OLD_EVENTS = Walk("events", "occurred")
#: Event resources whose event is gone (resources have no foreign key).
ORPHAN_EVENT_RESOURCES = Walk("event_resources", "occurred", (Link("event_id", "events"),))


async def gather_alone(
    conn: AsyncConnection, schema: PrefectSchema, rows: TableRows
) -> tuple[dict[str, TableRows], list[Repoint]]:
    """The rows themselves, and nothing else."""
    return {rows.shape.name: rows}, []


async def gather_task_run_trees(
    conn: AsyncConnection, schema: PrefectSchema, task_runs: TableRows
) -> tuple[dict[str, TableRows], list[Repoint]]:
    """Task runs with their states, cache entries, and the logs and artifacts of no flow run."""
    reader = Reader(conn, schema)
    task_ids = task_runs.ids
    states = await reader.rows("task_run_state", "task_run_id", task_ids)
    results = linked_ids(states, "result_artifact_id")
    tables = {
        "task_run": task_runs,
        "task_run_state": states,
        "task_run_state_cache": await reader.rows(
            "task_run_state_cache", "task_run_state_id", states.ids
        ),
        "log": await reader.rows("log", "task_run_id", task_ids, extra=WITHOUT_FLOW_RUN),
        "artifact": await reader.rows_by_any(
            "artifact",
            [("task_run_id", task_ids, WITHOUT_FLOW_RUN), ("id", sorted(results), "")],
            lock=True,
        ),
    }
    return tables, []


async def gather_task_run_states(
    conn: AsyncConnection, schema: PrefectSchema, states: TableRows
) -> tuple[dict[str, TableRows], list[Repoint]]:
    """Task run states with their cache entries."""
    cache = await Reader(conn, schema).rows("task_run_state_cache", "task_run_state_id", states.ids)
    return {"task_run_state": states, "task_run_state_cache": cache}, []


async def gather_events(
    conn: AsyncConnection, schema: PrefectSchema, events: TableRows
) -> tuple[dict[str, TableRows], list[Repoint]]:
    """Events with their resources (no foreign key: resources are deleted first)."""
    resources = await Reader(conn, schema).rows(
        "event_resources", "event_id", events.ids, lock=True
    )
    return {"events": events, "event_resources": resources}, []


async def gather_collections(
    conn: AsyncConnection, schema: PrefectSchema, stale: TableRows
) -> tuple[dict[str, TableRows], list[Repoint]]:
    """Stale collections: archived when no artifact of their key is left, else re-pointed."""
    archived, repoints = await plan_stale(conn, stale)
    return {"artifact_collection": archived}, repoints


#: Rows whose enforced parent is gone, each with its gatherer: only where foreign keys
#: were off (SQLite). An orphaned task run takes its states, logs and artifacts along.
FOREIGN_KEY_ORPHANS: tuple[tuple[Walk, Gatherer], ...] = (
    (Walk("task_run", "updated", _FLOW_RUN_LINK, _NO_SUBFLOW), gather_task_run_trees),
    (Walk("flow_run_state", "updated", _FLOW_RUN_LINK), gather_alone),
    (Walk("flow_run_input", "updated", _FLOW_RUN_LINK), gather_alone),
    (Walk("task_run_state", "updated", (Link("task_run_id", "task_run"),)), gather_task_run_states),
)
