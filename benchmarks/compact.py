"""What `archiver compact` buys readers: files, and the time to read the archive, before and after.

Usage::

    python -m benchmarks.compact --runs 4000 --batch-size 20

Makes a Prefect-shaped SQLite database (:mod:`benchmarks.generate`) in a temporary folder,
archives it with small batches to a local folder, then measures, before and after compaction,
the number of Parquet files (on S3, the GET requests a full read makes) and the median of
three reads: DuckDB counting and summing every log message over the folder glob, and
:func:`archiver.open_archive` reading every table. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from benchmarks.generate import Target, create_schema, generate

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def median_seconds(work: Callable[[], object], times: int = 3) -> float:
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return round(statistics.median(seconds), 3)


def read_figures(archive: Path) -> dict[str, Any]:
    from archiver import open_archive

    def duckdb_logs() -> object:
        return duckdb.execute(
            f"SELECT count(*), sum(length(message)) FROM read_parquet('{archive}/log/*/*.parquet',"
            " hive_partitioning = true)"
        ).fetchall()

    def every_table() -> object:
        return {name: t.to_table().num_rows for name, t in open_archive(str(archive)).items()}

    files = list(archive.rglob("*.parquet"))
    return {
        "parquet_files": len(files),
        "megabytes": round(sum(f.stat().st_size for f in files) / 1e6, 2),
        "duckdb_log_scan_s": median_seconds(duckdb_logs),
        "open_archive_all_tables_s": median_seconds(every_table),
        "rows": every_table(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    from archiver import RunOptions, run
    from archiver.engine.compact import CompactOptions, compact
    from archiver.source.engine import DatabaseOptions

    parser = argparse.ArgumentParser(prog="python -m benchmarks.compact")
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        url, archive = f"sqlite:///{folder}/bench.db", Path(folder) / "archive"
        create_schema(url)
        generate(url, args.runs, now=NOW)
        database = DatabaseOptions(Target.parse(url).async_url)
        options = RunOptions(
            database, str(archive), retention_period=timedelta(days=90),
            batch_size=args.batch_size, batch_interval=0, dry_run=False, now=NOW,
        )  # fmt: skip
        archived = asyncio.run(run(options))
        before = read_figures(archive)
        started = time.perf_counter()
        report = asyncio.run(compact(CompactOptions(database, str(archive))))
        compact_seconds = round(time.perf_counter() - started, 2)
        after = read_figures(archive)
    # flow and deployment snapshots repeat in every batch; a compacted batch keeps one per id
    rows_before, rows_after = before.pop("rows"), after.pop("rows")
    snapshots = ("flow", "deployment")
    for table in rows_before:
        if table not in snapshots:
            assert rows_before[table] == rows_after[table], f"compaction changed {table}"
    print(json.dumps({
        "runs": args.runs, "batch_size": args.batch_size,
        "batches_before": len(archived.batches),
        "batches_after": len(archived.batches) - sum(len(g.batches) - 1 for g in report.groups),
        "compact_seconds": compact_seconds, "before": before, "after": after,
        "rows": rows_after,
        "snapshot_rows_before": {t: rows_before.get(t) for t in snapshots},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
