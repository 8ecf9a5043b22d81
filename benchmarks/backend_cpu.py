"""PostgreSQL's CPU for one piece of work: the server backends that served it, from /proc.

``pg_stat_statements`` would need a server restart (it must be preloaded), which would break
everyone else's tests on the shared server; the statement log times statements, not CPU. So
this reads what the kernel counts: ``utime + stime`` in ``/proc/<pid>/stat`` of each backend.

Two ways, for two situations:

* :func:`backend_ticks` / :func:`cpu_seconds`: the caller knows its backend's pid
  (``SELECT pg_backend_pid()`` on a connection it keeps open) and reads it before and after.
  Exact to a clock tick (10 ms).
* :class:`BackendSampler`: the work opens its own connections (archiver's pool, Prefect's
  engine) and closes them before it returns, so a separate process
  (``python -m benchmarks.backend_cpu <url>``) watches the database while the work runs: every
  50 ms it asks ``pg_stat_activity`` for the client backends and parallel workers connected
  to that database that started after the sampler did (so the benchmark's own row-counting
  connection, opened earlier, is not counted), and every 10 ms it reads their ``/proc`` ticks.
  A backend's CPU from its start to the last reading before it exits is counted, so up to
  about 10 ms per connection is lost at its end, and a parallel worker that lives less than
  50 ms may be missed. The database must be one the work alone uses (a fresh copy), and the
  server must run on this machine.

The sampler is a process of its own, not a thread, so it neither takes the GIL from the work
nor adds to the work's process CPU; it reports its own CPU so that its share of the two cores
is visible.
"""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.generate import Target

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: how often the backends' /proc ticks are read, and how often new backends are looked for
READ_EVERY = 0.01
DISCOVER_EVERY = 5  # readings


def backend_ticks(pid: int) -> int | None:
    """user + system clock ticks of process ``pid`` so far; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def cpu_seconds(ticks: int) -> float:
    return ticks / CLOCK_TICKS


@dataclass(frozen=True)
class BackendCpu:
    """What the sampler saw: PostgreSQL CPU of the work, and the sampler's own."""

    seconds: float  # utime + stime summed over the backends that served the work
    backends: int  # how many there were
    sampler_seconds: float  # the sampler process's own CPU while it watched


class BackendSampler:
    """Watches the backends connected to one database from start() to stop().

    Use as a context manager around the work; ``result`` is set when it exits.
    """

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.process: subprocess.Popen[str] | None = None
        self.result: BackendCpu | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> BackendSampler:
        command = [sys.executable, "-m", "benchmarks.backend_cpu", self.database_url]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the backend CPU sampler did not start")
        return self

    def __exit__(self, *_: object) -> None:
        process = self.process
        assert process is not None and process.stdin is not None
        assert process.stdout is not None
        process.stdin.write("stop\n")
        process.stdin.flush()
        line = process.stdout.readline()
        process.wait(timeout=30)
        if line.strip():
            self.result = BackendCpu(**json.loads(line))


_DISCOVER = """
    SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND backend_type IN ('client backend', 'parallel worker')
      AND backend_start >= %(since)s
"""


def _watch(database_url: str) -> BackendCpu:
    """The sampler's side: watch until a line arrives on stdin, then report."""
    with Target.parse(database_url).connect_postgres() as conn:
        conn.autocommit = True
        row = conn.execute("SELECT clock_timestamp()").fetchone()
        assert row is not None
        since, ticks = row[0], dict[int, int]()
        own = _own_cpu()
        print("ready", flush=True)
        reading, stopping = 0, False
        while not stopping:
            stopping = bool(select.select([sys.stdin], [], [], READ_EVERY)[0])
            if stopping or reading % DISCOVER_EVERY == 0:
                for (pid,) in conn.execute(_DISCOVER, {"since": since}):
                    ticks.setdefault(int(str(pid)), 0)
            for pid in ticks:
                now = backend_ticks(pid)
                if now is not None:
                    ticks[pid] = now
            reading += 1
        own = _own_cpu() - own
    return BackendCpu(cpu_seconds(sum(ticks.values())), len(ticks), own)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    print(json.dumps(asdict(_watch(sys.argv[1]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
