"""Log lines of task runs and flow runs, as Prefect's loggers write them."""

from __future__ import annotations

from datetime import datetime, timedelta

from tests.factory.build import Batch, Tree
from tests.factory.content import long_message, uuid7


def add_log(
    batch: Batch,
    tree: Tree,
    *,
    at: datetime,
    name: str,
    level: int,
    flow_run_id: str,
    task_run_id: str | None,
    message: str,
) -> None:
    """One ``log`` row stamped ``at`` (its id is a UUIDv7 of ``at``, as Prefect's)."""
    log_id = uuid7(at)
    batch.add(
        "log",
        {
            "id": log_id,
            "created": at + timedelta(milliseconds=40),
            "updated": at + timedelta(milliseconds=40),
            "name": name,
            "level": level,
            "flow_run_id": flow_run_id,
            "task_run_id": task_run_id,
            "message": message,
            "timestamp": at,
        },
    )
    tree.log_ids.append(log_id)


def add_task_logs(
    batch: Batch,
    tree: Tree,
    *,
    flow_run_id: str,
    task_run_id: str,
    number: int,
    final_time: datetime,
    count: int,
) -> None:
    """``count`` logs of task run ``number`` (both ids set), the first on a whole second."""
    for log_number in range(count):
        at = final_time - timedelta(microseconds=1_234 * (log_number + 1))
        if log_number == 0:
            at = at.replace(microsecond=0)
        add_log(
            batch,
            tree,
            at=at,
            name="prefect.task_runs",
            level=(20, 30, 40, 10)[log_number % 4],
            flow_run_id=flow_run_id,
            task_run_id=task_run_id,
            message=f"Task extract-{number}: step {log_number} ✓ ünïcode",
        )


def add_flow_logs(
    batch: Batch,
    tree: Tree,
    *,
    flow_run_id: str,
    run_name: str,
    final_time: datetime,
    count: int,
    is_root: bool,
) -> None:
    """``count`` flow-level logs (``task_run_id`` NULL); the root's first one is long."""
    for log_number in range(count):
        at = final_time - timedelta(microseconds=333_337 * (log_number + 1))
        if log_number == 1:
            at = at.replace(microsecond=0)
        message = (
            long_message(flow_run_id)
            if is_root and log_number == 0
            else f"Flow run {run_name!r}: step {log_number} — ünïcode ✓ 🦆"
        )
        add_log(
            batch,
            tree,
            at=at,
            name="prefect.flow_runs",
            level=(20, 40, 30, 10)[log_number % 4],
            flow_run_id=flow_run_id,
            task_run_id=None,
            message=message,
        )
