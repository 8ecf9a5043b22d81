"""What the tests know of Prefect's schema (``/work/shared/prefect-schema.md``, sections 1-2).

Written out here rather than taken from ``archiver``, so a mistake there cannot hide itself.
"""

from __future__ import annotations

#: The tables that hold a run tree's rows: what one run batch archives and deletes, in the
#: order the factory inserts them (parents first).
RUN_TABLES: tuple[str, ...] = (
    "artifact",
    "flow_run",
    "task_run",
    "flow_run_state",
    "task_run_state",
    "flow_run_input",
    "log",
    "task_run_state_cache",
)

#: Every table a tree writes to: its run rows and the ``artifact_collection`` rows that its
#: keyed artifacts lead (see :meth:`tests.factory.Tree.rows_by_table`).
TREE_TABLES: tuple[str, ...] = (*RUN_TABLES, "artifact_collection")

TERMINAL_STATE_TYPES: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
STATE_TYPES: tuple[str, ...] = (
    "SCHEDULED",
    "PENDING",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "CRASHED",
    "PAUSED",
    "CANCELLING",
)
STATE_NAMES: dict[str, str] = {
    "SCHEDULED": "Scheduled",
    "PENDING": "Pending",
    "RUNNING": "Running",
    "COMPLETED": "Completed",
    "FAILED": "Failed",
    "CANCELLED": "Cancelled",
    "CRASHED": "Crashed",
    "PAUSED": "Paused",
    "CANCELLING": "Cancelling",
}

#: Columns whose SQLite declaration is DATETIME but which hold an interval.
INTERVAL_COLUMNS = frozenset({"total_run_time"})
