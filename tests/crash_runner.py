"""Run a writer of batches in a child process, optionally SIGKILLing it at a given step.

    python -m tests.crash_runner '<json>'

The JSON names the database and storage, the retention and batch size, the
``writer`` (``run``, the default: run and sweep batches; ``compact``; ``restore``
of ``run_ids``), and optionally ``kill_at``: a step name from
``archiver.engine.commit.STEPS`` and which ``occurrence`` of it. Without ``kill_at``
the child finishes and prints what it did as JSON (used to run several archivers
at once).
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
from typing import Any

from archiver import RunOptions, run
from archiver.engine.compact import CompactOptions, compact
from archiver.engine.restore import RestoreOptions, restore
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

    if "start_file" in spec:  # line up with the other archivers, imports done
        Path(f"{spec['start_file']}.{os.getpid()}.ready").touch()
        while not Path(spec["start_file"]).exists():
            time.sleep(0.01)
    print(json.dumps(asyncio.run(write(spec, hook))))


async def write(spec: dict[str, Any], hook: Any) -> dict[str, Any]:
    database = DatabaseOptions(spec["database_url"])
    where = (spec["storage_url"], spec["storage_options"])
    writer = spec.get("writer", "run")
    if writer == "compact":
        compacted = await compact(CompactOptions(database, *where), hook)
        return {"groups": [group.batch_id for group in compacted.groups]}
    if writer == "restore":
        restored = await restore(RestoreOptions(database, *where, run_ids=tuple(spec["run_ids"])),
                                 hook)  # fmt: skip
        return {"rewritten": restored.rewritten}
    options = RunOptions(
        database=database,
        storage_url=spec["storage_url"],
        storage_options=spec["storage_options"],
        retention_period=timedelta(seconds=spec["retention_seconds"]),
        batch_size=spec["batch_size"],
        sweep_batch_size=spec.get("sweep_batch_size", RunOptions.sweep_batch_size),
        batch_interval=0,
        dry_run=False,
    )
    report = await run(options, hook)
    batches = [{"batch_id": b.batch_id, "roots": b.roots} for b in report.batches]
    return {"batches": batches, "recovered": report.recovered}


if __name__ == "__main__":
    main()
