"""Run archiver in a child process, optionally SIGKILLing it at a given step.

    python -m tests.crash_runner '<json>'

The JSON names the database and storage, the retention and batch size, and
optionally ``kill_at``: a step name from ``archiver.engine.run.STEPS`` and which
``occurrence`` of it. Without ``kill_at`` the child archives the whole backlog and
prints its report as JSON (used to run several archivers at once).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

from archiver import RunOptions, run
from archiver.source.engine import DatabaseOptions


def main() -> None:
    spec = json.loads(sys.argv[1])
    seen = 0

    def hook(step: str, batch_id: str) -> None:
        nonlocal seen
        if step == spec.get("kill_at"):
            seen += 1
            if seen == spec.get("occurrence", 1):
                os.kill(os.getpid(), signal.SIGKILL)

    options = RunOptions(
        database=DatabaseOptions(spec["database_url"]),
        storage_url=spec["storage_url"],
        storage_options=spec["storage_options"],
        retention_period=timedelta(seconds=spec["retention_seconds"]),
        batch_size=spec["batch_size"],
        batch_interval=0,
        dry_run=False,
    )
    if "start_file" in spec:  # line up with the other archivers, imports done
        Path(f"{spec['start_file']}.{os.getpid()}.ready").touch()
        while not Path(spec["start_file"]).exists():
            time.sleep(0.01)
    report = asyncio.run(run(options, hook))
    batches = [{"batch_id": b.batch_id, "roots": b.roots} for b in report.batches]
    print(json.dumps({"batches": batches, "recovered": report.recovered}))


if __name__ == "__main__":
    main()
