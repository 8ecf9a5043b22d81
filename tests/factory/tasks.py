"""Task runs of a flow run: ordinary ones with states and logs, the cache rows that point at
their final states, and the parent task run that mirrors a subflow."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import NamedTuple

from tests.factory.artifacts import add_result_artifact
from tests.factory.build import Batch, Tree
from tests.factory.content import dumps, empirical_policy_task, result_reference, uuid4, uuid7
from tests.factory.logs import add_task_logs
from tests.factory.schema import TERMINAL_STATE_TYPES
from tests.factory.states import Timeline, add_run_states, build_timeline

TASK_STEP = timedelta(seconds=1, microseconds=250_003)


class TaskRun(NamedTuple):
    """A task run written into a batch: its id, its state ids (oldest first), its cache key."""

    id: str
    state_ids: list[str]
    cache_key: str | None


def task_final_types(count: int, flow_type: str) -> list[str]:
    """The final state of each of ``count`` task runs of a flow run that ended ``flow_type``."""
    finals = ["COMPLETED"] * count
    if count:
        if flow_type in ("FAILED", "CANCELLED", "CRASHED"):
            finals[-1] = flow_type
        elif flow_type not in TERMINAL_STATE_TYPES:
            finals[-1] = "RUNNING"
    return finals


def add_task_run(
    batch: Batch,
    tree: Tree,
    *,
    flow_run_id: str,
    name: str,
    task_key: str,
    dynamic_key: str,
    timeline: Timeline,
    task_inputs: str,
    child_flow_run_id: str | None = None,
    final_data: str | None = None,
    final_result_artifact_id: str | None = None,
    cache: bool = False,
) -> TaskRun:
    """One task run of ``flow_run_id`` whose states follow ``timeline``; with ``cache`` it has
    a cache key that its final state carries too."""
    task_run_id = uuid7(timeline.first_time)
    cache_key = f"cache-{task_key}-{uuid.uuid4().hex[:12]}" if cache else None
    cache_expiration = timeline.final_time + timedelta(days=1) if cache else None
    state_ids = add_run_states(
        batch,
        tree,
        "task_run_state",
        "task_run_id",
        task_run_id,
        timeline,
        flow_run_id=flow_run_id,
        task_run_id=task_run_id,
        child_flow_run_id=child_flow_run_id,
        final_data=final_data,
        final_result_artifact_id=final_result_artifact_id,
        cache_key=cache_key,
        cache_expiration=cache_expiration,
    )
    batch.add(
        "task_run",
        {
            "id": task_run_id,
            "created": timeline.first_time - timedelta(microseconds=1_001),
            "updated": timeline.final_time + timedelta(microseconds=2_002),
            "name": name,
            "state_type": timeline.final_type,
            "run_count": timeline.run_count,
            "expected_start_time": timeline.first_time,
            "next_scheduled_start_time": None,
            "start_time": timeline.start_time,
            "end_time": timeline.final_time if timeline.terminal else None,
            "total_run_time": timeline.total_run_time,
            "task_key": task_key,
            "dynamic_key": dynamic_key,
            "cache_key": cache_key,
            "cache_expiration": cache_expiration,
            "task_version": "1.2.3",
            "empirical_policy": empirical_policy_task(),
            "task_inputs": task_inputs,
            "tags": dumps(["etl", "ünïcode"]),
            "flow_run_id": flow_run_id,
            "state_id": state_ids[-1],
            "state_name": timeline.final_name,
            "state_timestamp": timeline.final_time,
            "flow_run_run_count": 1,
            "labels": dumps({"prefect.flow-run.id": flow_run_id}),
        },
    )
    tree.task_run_ids.append(task_run_id)
    return TaskRun(task_run_id, state_ids, cache_key)


def add_task_runs(
    batch: Batch,
    tree: Tree,
    *,
    flow_run_id: str,
    flow_timeline: Timeline,
    count: int,
    states_per_run: int,
    logs_per_run: int,
    cache: bool,
) -> list[TaskRun]:
    """``count`` task runs of a flow run, each waiting for the one before, with their logs."""
    task_runs: list[TaskRun] = []
    previous: str | None = None
    for number, final in enumerate(task_final_types(count, flow_timeline.final_type)):
        anchor = flow_timeline.final_time - timedelta(microseconds=500_011 * (number + 1))
        task_timeline = build_timeline(states_per_run, final, anchor, TASK_STEP)
        inputs_json = dumps(
            {
                "x": [],
                "__parents__": [],
                "wait_for": [{"input_type": "task_run", "id": previous}] if previous else [],
            }
        )
        task = add_task_run(
            batch,
            tree,
            flow_run_id=flow_run_id,
            name=f"extract-{number}",
            task_key=f"extract-{number:04d}-7c1e",
            dynamic_key=str(number),
            timeline=task_timeline,
            task_inputs=inputs_json,
            final_data=result_reference() if final == "COMPLETED" else None,
            cache=cache,
        )
        task_runs.append(task)
        previous = task.id
        add_task_logs(
            batch,
            tree,
            flow_run_id=flow_run_id,
            task_run_id=task.id,
            number=number,
            final_time=task_timeline.final_time,
            count=logs_per_run,
        )
    return task_runs


def add_cache_rows(
    batch: Batch, tree: Tree, *, task_runs: list[TaskRun], final_at: datetime
) -> None:
    """The legacy server-side cache: one row per task run, pointing at its final state."""
    for task in task_runs:
        cache_id = uuid4()
        batch.add(
            "task_run_state_cache",
            {
                "id": cache_id,
                "created": final_at,
                "updated": final_at,
                "cache_key": task.cache_key,
                "cache_expiration": final_at + timedelta(days=1),
                "task_run_state_id": task.state_ids[-1],
            },
        )
        tree.task_run_state_cache_ids.append(cache_id)


def add_parent_task_run(
    batch: Batch,
    tree: Tree,
    *,
    flow_run_id: str,
    level: int,
    child_flow_run_id: str,
    child_timeline: Timeline,
    with_result: bool,
) -> str:
    """The task run of ``flow_run_id`` that runs subflow ``child_flow_run_id`` (level + 1).

    It mirrors the subflow's states (``state_details.child_flow_run_id``); when the subflow is
    terminal and ``with_result``, its final state points at one more result artifact of the
    parent flow run, which the task run created.
    """
    copy_artifact = None
    if child_timeline.terminal and with_result:
        copy_artifact = add_result_artifact(
            batch, tree, flow_run_id=flow_run_id, at=child_timeline.final_time
        )
    parent_task_id = add_task_run(
        batch,
        tree,
        flow_run_id=flow_run_id,
        name=f"subflow-{level + 1}",
        task_key=f"subflow-{level + 1}-0a9b",
        dynamic_key="0",
        timeline=child_timeline,
        task_inputs=dumps({"__parents__": [], "wait_for": []}),
        child_flow_run_id=child_flow_run_id,
        final_result_artifact_id=copy_artifact,
    ).id
    if copy_artifact is not None:
        batch.update("artifact", copy_artifact, task_run_id=parent_task_id)
    tree.parent_task_run_ids.append(parent_task_id)
    return parent_task_id
