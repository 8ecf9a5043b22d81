"""One flow run row with its states, and the inputs a paused run received."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from tests.factory.build import Batch, Tree
from tests.factory.content import dumps, empirical_policy_flow, parameters, uuid4
from tests.factory.states import Timeline, add_run_states


def add_flow_run(
    batch: Batch,
    tree: Tree,
    *,
    flow_run_id: str,
    run_name: str,
    index: int,
    timeline: Timeline,
    end_time: datetime | None,
    flow_id: str,
    deployment_id: str | None,
    parent_task_run_id: str | None,
    result_artifact_id: str | None,
) -> None:
    """The flow run's states, then its row; ``state_id`` and ``parent_task_run_id`` are set by
    an UPDATE after every row of the batch exists (``batch.links``), as the FKs need.

    ``index`` (the tree's place in its batch) goes into the run's parameters.
    """
    add_run_states(
        batch,
        tree,
        "flow_run_state",
        "flow_run_id",
        flow_run_id,
        timeline,
        flow_run_id=flow_run_id,
        final_result_artifact_id=result_artifact_id,
    )
    state_id = tree.flow_run_state_ids[-1]
    expected_start = (
        timeline.first_time
        if timeline.states[0][0] == "SCHEDULED"
        else timeline.first_time.replace(microsecond=0)
    )
    labels: dict[str, Any] = {"prefect.flow.id": flow_id}
    if deployment_id:
        labels["prefect.deployment.id"] = deployment_id
    batch.add(
        "flow_run",
        {
            "id": flow_run_id,
            "created": timeline.first_time - timedelta(microseconds=250_000),
            "updated": timeline.final_time + timedelta(microseconds=3_003),
            "name": run_name,
            "state_type": timeline.final_type,
            "run_count": timeline.run_count,
            "expected_start_time": expected_start,
            "next_scheduled_start_time": (
                expected_start if timeline.final_type == "SCHEDULED" else None
            ),
            "start_time": timeline.start_time,
            "end_time": end_time,
            "total_run_time": timeline.total_run_time,
            "flow_version": "0f3a9c1e5b7d",
            "parameters": parameters(index),
            "idempotency_key": (
                f"scheduled {deployment_id} {flow_run_id}" if deployment_id else None
            ),
            "context": dumps({}),
            "empirical_policy": empirical_policy_flow(),
            "tags": dumps(["nightly", "ünïcode"]),
            "auto_scheduled": bool(deployment_id),
            "flow_id": flow_id,
            "deployment_id": deployment_id,
            "parent_task_run_id": None,  # linked after the task runs exist
            "state_id": None,  # linked after the states exist
            "state_name": timeline.final_name,
            "infrastructure_document_id": None,
            "work_queue_name": "default" if deployment_id else None,
            "state_timestamp": timeline.final_time,
            "created_by": (
                dumps({"id": deployment_id, "type": "DEPLOYMENT", "display_value": "nightly"})
                if deployment_id
                else None
            ),
            "infrastructure_pid": f"{flow_run_id[:8]}:4242" if deployment_id else None,
            "work_queue_id": None,
            "job_variables": dumps({"env": {"LANG": "C.UTF-8"}}),
            "deployment_version": None,
            "labels": dumps(labels),
        },
    )
    batch.links.append(
        {"id": flow_run_id, "state_id": state_id, "parent_task_run_id": parent_task_run_id}
    )


def add_inputs(
    batch: Batch, tree: Tree, *, flow_run_id: str, final_time: datetime, count: int
) -> None:
    """``count`` ``flow_run_input`` rows, as ``pause_flow_run``/``send_input`` leave them."""
    for number in range(count):
        input_id = uuid4()
        at = final_time - timedelta(milliseconds=100 * (number + 1))
        batch.add(
            "flow_run_input",
            {
                "id": input_id,
                "created": at,
                "updated": at,
                "key": f"paused-{number + 1}-response",
                "value": dumps({"approved": True, "comment": "Looks good ✓", "n": number}),
                "flow_run_id": flow_run_id,
                "sender": f"prefect.flow-run.{uuid4()}" if number % 2 else None,
            },
        )
        tree.flow_run_input_ids.append(input_id)
