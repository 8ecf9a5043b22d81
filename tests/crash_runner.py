"""Run archiver in a child process and SIGKILL it at a given step (fault injection).

    python -m tests.crash_runner '<json>'

The JSON names the database and storage, the retention and batch size, and
``kill_at``: a step name from ``archiver.pipeline.STEPS`` and which occurrence.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import timedelta

from archiver import RunOptions, run
from archiver.source.engine import DatabaseOptions


def main() -> None:
    spec = json.loads(sys.argv[1])
    seen = 0

    def hook(step: str, batch_id: str) -> None:
        nonlocal seen
        if step == spec["kill_at"]:
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
    asyncio.run(run(options, hook))


if __name__ == "__main__":
    main()
