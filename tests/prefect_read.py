"""Read flow runs back through Prefect's own client and API, as the UI would.

    PREFECT_HOME=... PREFECT_SERVER_DATABASE_CONNECTION_URL=... python -m tests.prefect_read

Prints, as JSON, every top-level flow run Prefect's API returns with its state,
parameters, subflows, task runs (with states) and log messages.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId


async def describe() -> dict[str, Any]:
    async with get_client() as client:
        runs = await client.read_flow_runs()
        tasks = await client.read_task_runs()
        described = {}
        for run in runs:
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            )
            states = await client.read_flow_run_states(run.id)
            described[str(run.id)] = {
                "name": run.name,
                "state": [run.state_type.value if run.state_type else None, run.state_name],
                "parameters": run.parameters,
                "parent_task_run_id": str(run.parent_task_run_id),
                "states": [(s.type.value, s.name, s.timestamp.isoformat()) for s in states],
                "tasks": sorted(
                    (t.name, t.state_name or "") for t in tasks if t.flow_run_id == run.id
                ),
                "logs": sorted(log.message for log in logs),
            }
        return described


if __name__ == "__main__":
    print(json.dumps(asyncio.run(describe()), sort_keys=True))
