"""One harness for hard kills: archiver in a child process that SIGKILLs itself at a step.

The parent describes a :class:`Job`: which operation (``run``, ``restore`` or ``compact``) on
which database and archive root. :func:`killed_at` runs it in a child that kills itself the
``occurrence``-th time the operation's step hook reports ``step``, and asserts that the child
died of that signal. No clean-up runs, no ``finally``: what is left is what a power cut leaves.
:func:`start` runs a job to its end in a child that first waits for a start file (to let
several archivers go at one moment) and prints the operation's report as JSON.

The child is this module::

    python -m tests.kill '{"job": {...}, "kill_at": "committed", "occurrence": 1}'
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from archiver import RunReport, run
from archiver.engine.compact import CompactOptions, CompactReport, compact
from archiver.engine.restore import RestoreOptions, RestoreReport, restore
from archiver.source.engine import DatabaseOptions
from tests.factory import TestDatabase, TestStorage
from tests.helpers import run_options

ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT = 120  # seconds
Operation = Literal["run", "restore", "compact"]
#: An operation's step hook: called as ``hook(step, batch_id)``.
Hook = Callable[[str, str], None]


@dataclass(frozen=True)
class Job:
    """One archiver operation for a child to run, in plain values (it travels as JSON)."""

    operation: Operation
    database_url: str
    storage_url: str
    storage_options: dict[str, Any]
    batch_size: int = 50  # run: top-level runs per batch
    run_ids: tuple[str, ...] = ()  # restore: the top-level runs to restore
    sweep_batch_size: int | None = None  # run: rows per sweep batch (None: the default)

    @classmethod
    def of(
        cls,
        operation: Operation,
        db: TestDatabase,
        storage: TestStorage,
        *,
        batch_size: int = 50,
        run_ids: Sequence[str] = (),
        sweep_batch_size: int | None = None,
    ) -> Job:
        return cls(
            operation,
            db.url,
            storage.url,
            storage.options,
            batch_size,
            tuple(run_ids),
            sweep_batch_size,
        )


def killed_at(job: Job, step: str, *, occurrence: int = 1) -> None:
    """Run ``job`` in a child that SIGKILLs itself the ``occurrence``-th time it reaches
    ``step``; fail unless the child died of exactly that."""
    sigkilled(_child_command(job, kill_at=step, occurrence=occurrence))


def start(job: Job, *, start_file: Path) -> subprocess.Popen[str]:
    """Start ``job`` in a child that touches ``<start_file>.<pid>.ready`` once its imports are
    done, waits until ``start_file`` exists, runs, and prints its report as one JSON line."""
    return subprocess.Popen(
        _child_command(job, start_file=str(start_file)),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sigkilled(command: list[str], cwd: Path = ROOT) -> None:
    """Run ``command`` to its end; fail (with its stderr) unless SIGKILL ended it."""
    child = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]


def kill_hook(step: str, occurrence: int = 1) -> Hook:
    """A step hook that SIGKILLs this process the ``occurrence``-th time ``step`` is reported."""
    seen = 0

    def hook(reported: str, _batch_id: str) -> None:
        nonlocal seen
        if reported == step:
            seen += 1
            if seen == occurrence:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _child_command(job: Job, **order: Any) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.kill",
        json.dumps({"job": dataclasses.asdict(job), **order}),
    ]


# -- the child ---------------------------------------------------------------------------------


async def _run(job: Job, hook: Hook | None) -> RunReport:
    sweeps = {} if job.sweep_batch_size is None else {"sweep_batch_size": job.sweep_batch_size}
    options = run_options(
        job.database_url, job.storage_url, job.storage_options, batch_size=job.batch_size, **sweeps
    )
    return await run(options, hook)


async def _restore(job: Job, hook: Hook | None) -> RestoreReport:
    options = RestoreOptions(
        DatabaseOptions(job.database_url),
        job.storage_url,
        job.storage_options,
        run_ids=job.run_ids,
    )
    return await restore(options, hook)


async def _compact(job: Job, hook: Hook | None) -> CompactReport:
    options = CompactOptions(
        DatabaseOptions(job.database_url), job.storage_url, job.storage_options
    )
    return await compact(options, hook)


Report = RunReport | RestoreReport | CompactReport
_OPERATIONS: dict[str, Callable[[Job, Hook | None], Coroutine[Any, Any, Report]]] = {
    "run": _run,
    "restore": _restore,
    "compact": _compact,
}


def main(argument: str) -> None:
    order = json.loads(argument)
    fields = order["job"]
    job = Job(**{**fields, "run_ids": tuple(fields["run_ids"])})
    hook = kill_hook(order["kill_at"], order["occurrence"]) if "kill_at" in order else None
    if "start_file" in order:  # line up with the other children, imports done
        start_file = Path(order["start_file"])
        Path(f"{start_file}.{os.getpid()}.ready").touch()
        while not start_file.exists():
            time.sleep(0.01)
    report = asyncio.run(_OPERATIONS[job.operation](job, hook))
    print(json.dumps(dataclasses.asdict(report), default=str))


if __name__ == "__main__":
    main(sys.argv[1])
