"""Orphan sweep time at N and 10N log rows on PostgreSQL: linear, not quadratic.

Usage::

    python -m benchmarks.sweep                      # 100k and 1M log rows
    python -m benchmarks.sweep --rows 20000 --factor 10 --server postgresql://postgres@127.0.0.1:5432

For each size, a fresh database with Prefect's schema (Prefect's own migrations,
built once as a template) gets ``rows`` log rows, all older than the 90-day
retention: half name a flow run that does not exist (orphans), half name one of
``rows / 100`` existing RUNNING flow runs (kept). Then ``archiver run`` with only
the orphan sweep archives and deletes every orphan to a local folder, and the
script prints the wall time, the rows swept, the batches, the mean and the
slowest batch, and the ratio of the larger size's time to the smaller's.

Prefect's older vacuum re-ran an anti-join over the whole table per batch, so
its time grew with the square of the table (10x rows, ~100x time); a keyset
walk grows linearly (10x rows, ~10x time) with a flat per-batch time.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psycopg
from psycopg import sql as pgsql

from archiver import RunOptions, run
from archiver.source.engine import DatabaseOptions
from benchmarks.generate import create_schema

SERVER = "postgresql://postgres@127.0.0.1:5432"
TEMPLATE = "bench_sweep_tpl"

_FILL = """
WITH runs AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM flow_run)
INSERT INTO log (id, created, updated, name, level, flow_run_id, task_run_id, message, timestamp)
SELECT gen_random_uuid(), at, at, 'prefect.flow_runs', 20,
       CASE WHEN g %% 2 = 0 THEN gen_random_uuid() ELSE runs.id END, NULL,
       'log line ' || g || ' ' || repeat('x', 100), at
FROM generate_series(1, %(rows)s) AS g
CROSS JOIN LATERAL (SELECT now() - interval '100 days' - g * interval '3 seconds' AS at) AS t
JOIN runs ON runs.n = g %% %(runs)s + 1
"""
_RUNS = """
INSERT INTO flow_run (id, name, flow_id, state_type, state_name)
SELECT gen_random_uuid(), 'bench-' || g, %(flow)s, 'RUNNING', 'Running'
FROM generate_series(1, %(runs)s) AS g
"""


@dataclass
class Measurement:
    rows: int
    swept: int
    seconds: float
    batches: int
    batch_mean: float
    batch_max: float

    @property
    def outside_batches(self) -> float:
        """Walking the table (and the run's start-up): the time not spent in batches."""
        return self.seconds - self.batch_mean * self.batches


def _admin(server: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(f"{server}/postgres", autocommit=True)


def _drop(name: str) -> pgsql.Composed:
    return pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name))


def make_template(server: str) -> None:
    with _admin(server) as admin:
        admin.execute(_drop(TEMPLATE))
    create_schema(f"{server}/{TEMPLATE}")


@contextmanager
def filled_database(server: str, rows: int) -> Iterator[str]:
    """A copy of the template with ``rows`` old logs, half of them orphans; yields its name."""
    name = f"bench_sweep_{rows}_{uuid.uuid4().hex[:6]}"
    with _admin(server) as admin:
        create = pgsql.SQL("CREATE DATABASE {} TEMPLATE {}")
        admin.execute(create.format(pgsql.Identifier(name), pgsql.Identifier(TEMPLATE)))
    try:
        with psycopg.connect(f"{server}/{name}") as conn:
            flow = conn.execute(
                "INSERT INTO flow (id, name) VALUES (gen_random_uuid(), 'bench') RETURNING id"
            ).fetchone()
            assert flow is not None
            conn.execute(_RUNS, {"flow": flow[0], "runs": max(rows // 100, 1)})
            conn.execute(_FILL, {"rows": rows, "runs": max(rows // 100, 1)})
        with psycopg.connect(f"{server}/{name}", autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE) log")
            conn.execute("VACUUM (ANALYZE) flow_run")
        yield name
    finally:
        with _admin(server) as admin:
            admin.execute(_drop(name))


def sweep(server: str, name: str, rows: int, batch_size: int) -> Measurement:
    archive = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        options = RunOptions(
            database=DatabaseOptions(
                f"{server.replace('postgresql', 'postgresql+asyncpg')}/{name}"
            ),
            storage_url=str(archive),
            retention_period=timedelta(days=90),
            batch_interval=0,
            dry_run=False,
            sweeps=("orphans",),
            sweep_batch_size=batch_size,
        )
        started = time.perf_counter()
        report = asyncio.run(run(options))
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(archive, ignore_errors=True)
    times = [batch.seconds for batch in report.sweep_batches]
    swept = sum(sum(batch.rows.values()) for batch in report.sweep_batches)
    return Measurement(rows, swept, seconds, len(times), statistics.mean(times), max(times))


def measure(server: str, sizes: Sequence[int], batch_size: int) -> list[Measurement]:
    make_template(server)
    results = []
    try:
        for rows in sizes:
            print(f"filling {rows:,} log rows ...", flush=True)
            with filled_database(server, rows) as name:
                result = sweep(server, name, rows, batch_size)
                expected = rows // 2
                if result.swept != expected:
                    raise SystemExit(f"swept {result.swept} rows, expected {expected}")
                results.append(result)
                print(f"  swept {result.swept:,} orphans in {result.seconds:.1f} s", flush=True)
    finally:
        with _admin(server) as admin:
            admin.execute(_drop(TEMPLATE))
    return results


def table(results: Sequence[Measurement]) -> str:
    lines = [
        "| log rows | orphans swept | seconds | ratio | batches | mean s/batch | max s/batch"
        " | s outside batches |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = results[0]
    for r in results:
        lines.append(
            f"| {r.rows:,} | {r.swept:,} | {r.seconds:.1f} | {r.seconds / base.seconds:.1f}x"
            f" | {r.batches} | {r.batch_mean:.3f} | {r.batch_max:.3f} | {r.outside_batches:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--server", default=SERVER, help="PostgreSQL server URL (no database)")
    parser.add_argument("--rows", type=int, default=100_000, help="the smaller size N")
    parser.add_argument("--factor", type=int, default=10, help="the larger size is N x factor")
    parser.add_argument("--batch-size", type=int, default=5000, help="sweep_batch_size")
    args = parser.parse_args(argv)
    results = measure(args.server, [args.rows, args.rows * args.factor], args.batch_size)
    print(table(results))


if __name__ == "__main__":
    main()
