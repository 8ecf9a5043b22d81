"""What reading ahead buys on PostgreSQL: ``archiver run`` with 0, 1, 2 ... batches read ahead.

    python -m benchmarks.read_ahead --runs 10000 --depths 0,1,2,3 --repeat 2

Uses the PostgreSQL template of ``benchmarks.run`` (made there if missing) and, for each
depth and repetition, archives a fresh copy of it to a temporary folder, in this process,
with the settings ``benchmarks.run`` uses. Prints per run the wall time, how busy the
machine's cores were meanwhile, archiver's own CPU time and its stage sums.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import tempfile
import time

from benchmarks import run as bench
from benchmarks.tables import ARCHIVER, STAGES


def _busy_ticks() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # all but idle and iowait


def measure(database_url: str, depth: int, batch_size: int) -> str:
    from archiver import run

    with tempfile.TemporaryDirectory() as folder:
        spec = bench.Spec("postgres", ARCHIVER, "local", database_url, batch_size, folder)
        options = bench.run_options(spec)
        busy, total = _busy_ticks()
        cpu, started = os.times(), time.monotonic()
        report = asyncio.run(run(dataclasses.replace(options, read_ahead=depth)))
        seconds = time.monotonic() - started
        busy_after, total_after = _busy_ticks()
        own = sum(os.times()[:2]) - sum(cpu[:2])
    stages = {s: round(sum(b.stages.get(s, 0.0) for b in report.batches), 2) for s in STAGES}
    share = (busy_after - busy) / max(total_after - total, 1)
    return (
        f"read_ahead {depth}: {seconds:.2f} s, cores {share:.0%} busy, "
        f"archiver CPU {own:.2f} s, {len(report.batches)} batches, stages {stages}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--depths", default="0,1,2,3")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    template = bench.postgres_template(args.postgres, args.runs, fresh=False)
    for _ in range(args.repeat):
        for depth in (int(d) for d in args.depths.split(",")):
            with bench.database_copy("postgres", template, args.postgres) as url:
                print(measure(url, depth, args.batch_size), flush=True)


if __name__ == "__main__":
    main()
