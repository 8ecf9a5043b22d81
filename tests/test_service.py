"""`archiver run` in production: JSON lines, the run report, metrics, limits, the loop, signals.

In process through the CLI where a flag is what is tested; in a child process where
a real signal or a real HTTP scrape is (tests/service_runner.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from typer.testing import CliRunner, Result

from archiver import RunReport
from archiver.cli.app import app
from archiver.cli.console import JsonLines, TerminalProgress
from archiver.cli.schedule import LoopListeners, Schedule, parse_duration, run_on_schedule
from archiver.cli.service import Service
from archiver.errors import ArchiverError, TransientDatabaseError, VerificationError
from tests import factory
from tests.factory import TestDatabase, TestStorage
from tests.helpers import EXPIRED, archive, options, write_config
from tests.oracle import assert_archive_consistent, assert_nothing_lost

ROOT = Path(__file__).resolve().parent.parent


def make_expired(db: TestDatabase, count: int) -> dict[str, set[str]]:
    for i in range(count):
        factory.make_tree(db, end_time=EXPIRED - timedelta(minutes=i), subflow_depth=i % 2)
    return factory.snapshot_ids(db)


def config(tmp_path: Path, db: TestDatabase, storage: TestStorage, **extra: Any) -> str:
    values = {"database_url": db.url, "retention_period": "P30D", "batch_interval": 0,
              "batch_size": 1, **extra}  # fmt: skip
    return str(write_config(tmp_path / "archiver.toml", storage, **values))


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_json_lines_report_and_metrics_match_the_database(
    tmp_path: Path, database: TestDatabase, local_storage: TestStorage
) -> None:
    before = make_expired(database, 3)
    metrics_file = tmp_path / "archiver.prom"
    cfg = config(tmp_path, database, local_storage)

    result = invoke("run", "--yes", "--json", "--metrics-file", str(metrics_file), "-c", cfg)

    assert result.exit_code == 0, result.output
    lines = events(result.stdout)  # every stdout line is JSON
    batches = [e for e in lines if e["event"] == "batch"]
    [report] = [e for e in lines if e["event"] == "report"]
    assert lines[-1] is report and len(batches) == 3
    assert [b["done_roots"] for b in batches] == [1, 2, 3]
    removed = {table: len(ids) for table, ids in before.items() if ids}
    assert report["outcome"] == "done" and report["archived_roots"] == 3
    assert {t: c["rows"] for t, c in report["tables"].items() if c["rows"]} == removed
    summed: dict[str, int] = {}
    for batch in batches:
        for table, count in batch["rows"].items():
            summed[table] = summed.get(table, 0) + count
    assert {t: c for t, c in summed.items() if c} == removed
    assert database.count("flow_run") == 0
    assert set(report["stage_seconds"]) >= {"select", "encode", "upload", "verify", "delete",
                                            "commit", "manifest"}  # fmt: skip
    assert report["rows_per_second"] > 0 and report["bytes"] == sum(b["bytes"] for b in batches)
    assert sum(c["bytes"] for c in report["tables"].values()) == report["bytes"]
    # the report beside the archive is the same document
    stored = json.loads(local_storage.read_bytes(f"_reports/{report['run_id']}.json"))
    assert stored == report
    # the metrics file counts the same rows
    values = metric_values(metrics_file.read_text())
    assert values[("archiver_batches_total", ())] == 3
    for table, count in removed.items():
        assert values[("archiver_rows_archived_total", (("table", table),))] == count
    assert values[("archiver_bytes_written_total", ())] == report["bytes"]
    assert values[("archiver_batch_duration_seconds_count", ())] == 3
    assert values[("archiver_last_success_timestamp_seconds", ())] > time.time() - 60
    assert values[("archiver_runs_total", (("outcome", "done"),))] == 1
    # ls, verify and recovery see batches only, not _reports/
    assert "3 batches in" in invoke("ls", "-c", cfg).stdout
    verified = invoke("verify", "-c", cfg)
    assert verified.exit_code == 0 and ": sound" in verified.stdout, verified.output
    assert invoke("recover", "-c", cfg).stdout.strip().endswith("0 open batches resolved")


def test_max_batches_stops_with_work_left_and_exit_0(
    tmp_path: Path, sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    make_expired(sqlite_database, 3)
    cfg = config(tmp_path, sqlite_database, local_storage)

    result = invoke("run", "--yes", "--max-batches", "2", "--max-runtime", "1h", "-c", cfg)

    assert result.exit_code == 0, result.output
    report = events(result.stdout)[-1]
    assert (report["outcome"], report["batches"]) == ("max_batches", 2)
    assert "--max-batches reached: about 1 expired runs left" in result.stderr
    assert sqlite_database.count("flow_run", "parent_task_run_id IS NULL") == 1


def test_max_runtime_starts_no_batch_that_would_overrun(
    sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    before = make_expired(sqlite_database, 3)

    def slow(step: str, batch_id: str) -> None:
        if step == "gathered":
            time.sleep(1.1)

    # the first batch starts at once; after it, 1.1 s + another 1.1 s would pass 2 s
    report = archive(sqlite_database, local_storage, hook=slow, batch_size=1,
                     max_runtime=timedelta(seconds=2))  # fmt: skip
    assert (report.outcome, len(report.batches)) == ("max_runtime", 1)

    none = archive(sqlite_database, local_storage, max_runtime=timedelta(microseconds=1))
    assert (none.outcome, none.batches) == ("max_runtime", [])
    assert_nothing_lost(sqlite_database, local_storage, before)
    assert_archive_consistent(sqlite_database, local_storage)


def test_a_failed_run_exits_1_and_reports_what_it_committed(
    tmp_path: Path, sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    before = make_expired(sqlite_database, 2)
    seen: list[str] = []

    def fail_second(step: str, batch_id: str) -> None:
        if step == "verified":
            seen.append(batch_id)
            if len(seen) == 2:
                raise VerificationError("injected: read back differs")

    service = Service(options(sqlite_database, local_storage, batch_size=1),
                      _json_reporter(buffer := io.StringIO()))  # fmt: skip
    with pytest.raises(ArchiverError, match="injected"):
        service.serve(fail_second)

    lines = events(buffer.getvalue())
    report = next(e for e in lines if e["event"] == "report")
    assert (report["outcome"], report["batches"]) == ("failed", 1)
    assert "injected" in report["error"] and lines[-1]["event"] == "error"
    stored = json.loads(local_storage.read_bytes(f"_reports/{report['run_id']}.json"))
    assert stored["outcome"] == "failed"
    assert_nothing_lost(sqlite_database, local_storage, before)
    assert_archive_consistent(sqlite_database, local_storage)


def _json_reporter(buffer: io.StringIO) -> JsonLines:
    return JsonLines(buffer, Console(file=io.StringIO()))


def test_progress_bar_on_a_terminal(
    sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    make_expired(sqlite_database, 2)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160, color_system=None)

    Service(options(sqlite_database, local_storage, batch_size=1),
            TerminalProgress(console, console)).serve()  # fmt: skip

    shown = screen.getvalue()
    assert "archiving" in shown and "2/2" in shown and "rows/s" in shown
    assert "rows archived" in shown and "archived 2 runs in 2 batches" in shown


def test_loop_goes_on_after_a_transient_failure_and_stops_on_request(
    sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    before = make_expired(sqlite_database, 2)
    heard: dict[str, list[Any]] = {"errors": [], "runs": []}
    attempts = 0

    def flaky(step: str, batch_id: str) -> None:
        nonlocal attempts
        if step == "gathered":
            attempts += 1
            if attempts == 1:
                raise TransientDatabaseError("injected: connection lost")

    async def loop() -> int:
        stop = asyncio.Event()

        def ran(report: RunReport) -> None:
            heard["runs"].append(report)
            stop.set()

        listeners = LoopListeners(on_run=ran, on_error=heard["errors"].append)
        schedule = Schedule(every=timedelta(seconds=0.05))
        return await run_on_schedule(options(sqlite_database, local_storage, batch_attempts=1),
                                     schedule, stop, listeners, flaky)  # fmt: skip

    assert asyncio.run(loop()) == 2
    assert len(heard["errors"]) == 1 and "connection lost" in str(heard["errors"][0])
    assert heard["runs"][0].archived_roots == 2
    assert sqlite_database.count("flow_run") == 0
    assert_nothing_lost(sqlite_database, local_storage, before)


def test_loop_stops_on_a_non_transient_failure(
    sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    make_expired(sqlite_database, 1)

    def broken(step: str, batch_id: str) -> None:
        if step == "verified":
            raise VerificationError("injected: checksum differs")

    async def loop() -> int:
        schedule = Schedule(every=timedelta(seconds=0.05))
        return await run_on_schedule(options(sqlite_database, local_storage), schedule,
                                     asyncio.Event(), hook=broken)  # fmt: skip

    with pytest.raises(ArchiverError, match="checksum differs"):
        asyncio.run(loop())
    assert sqlite_database.count("flow_run") > 0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("3600", 3600),
     ("PT1H", 3600), ("P1D", 86400)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "--every") == timedelta(seconds=seconds)


def test_schedules() -> None:
    now = datetime(2026, 1, 1, 12, 34, 56, tzinfo=UTC)
    hourly = Schedule.parse(None, "0 * * * *")
    assert hourly.first_run(now) == hourly.next_run(now, now) == now.replace(hour=13, minute=0,
                                                                              second=0)  # fmt: skip
    every = Schedule.parse("1h", None)
    assert every.first_run(now) == now
    assert every.next_run(now, now + timedelta(minutes=5)) == now + timedelta(hours=1)
    late = now + timedelta(hours=2)  # a run that overran its slot: the next one starts at once
    assert every.next_run(now, late) == late


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--every", "1h"], "need --loop"),
        (["--metrics-port", "9100"], "need --loop"),
        (["--loop"], "exactly one of --every and --cron"),
        (["--loop", "--every", "1h", "--cron", "0 * * * *"], "exactly one"),
        (["--loop", "--cron", "61 * * * *"], "not a cron expression"),
        (["--loop", "--every", "soon"], "not a duration"),
        (["--max-runtime", "-5m"], "not a duration"),
        (["--max-runtime", "0s"], "must be positive"),
    ],
)
def test_bad_usage_exits_2(args: list[str], message: str) -> None:
    result = invoke("run", *args)
    assert result.exit_code == 2 and message in " ".join(result.stderr.split()), result.output


# --- a real process, real signals, a real HTTP scrape ---------------------------------------


def start_child(*args: str, hook_ready: Path | None = None) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tests.service_runner"]
    if hook_ready is not None:
        command += ["--pause-at-files", str(hook_ready)]
    return subprocess.Popen([*command, "--", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for(
    predicate: Callable[[], bool], what: str, child: subprocess.Popen[str], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if child.poll() is not None:
            stderr = child.stderr.read() if child.stderr else ""
            pytest.fail(f"child exited {child.returncode} before {what}: {stderr}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigterm_during_a_batch_finishes_it_and_exits_0(
    tmp_path: Path, database: TestDatabase, local_storage: TestStorage
) -> None:
    before = make_expired(database, 3)
    in_batch = tmp_path / "in-batch"
    child = start_child("run", "--yes", "-c", config(tmp_path, database, local_storage),
                        hook_ready=in_batch)  # fmt: skip
    wait_for(in_batch.exists, "the first batch to write its files", child)

    child.send_signal(signal.SIGTERM)  # its files are written, nothing verified or deleted yet
    stdout, stderr = child.communicate(timeout=60)

    assert child.returncode == 0, stderr[-3000:]
    assert "SIGTERM: stopping after the batch in hand" in stderr
    lines = events(stdout)
    assert [e["event"] for e in lines] == ["batch", "report"]
    assert (lines[-1]["outcome"], lines[-1]["archived_roots"]) == ("stopped", 1)
    assert database.count("flow_run", "parent_task_run_id IS NULL") == 2
    assert_nothing_lost(database, local_storage, before)
    assert_archive_consistent(database, local_storage)  # no open batch, no stray file


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_loop_serves_metrics_and_exits_0_on_sigterm_while_sleeping(
    tmp_path: Path, sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    make_expired(sqlite_database, 2)
    port = free_port()
    metrics_file = tmp_path / "archiver.prom"
    child = start_child("run", "--yes", "--loop", "--every", "1h", "--metrics-port", str(port),
                        "--metrics-file", str(metrics_file),
                        "-c", config(tmp_path, sqlite_database, local_storage))  # fmt: skip
    assert child.stdout is not None
    lines: list[dict[str, Any]] = []
    while not lines or lines[-1]["event"] != "sleep":  # the first run, then the sleep
        line = child.stdout.readline()
        if not line:
            pytest.fail(f"child ended: {child.wait()} {child.stderr.read()}")  # type: ignore[union-attr]
        lines.append(json.loads(line))

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        scraped = metric_values(response.read().decode())
    started = time.monotonic()
    child.send_signal(signal.SIGTERM)
    child.communicate(timeout=30)

    assert child.returncode == 0 and time.monotonic() - started < 10
    [report] = [e for e in lines if e["event"] == "report"]
    assert report["archived_roots"] == 2
    assert scraped[("archiver_batches_total", ())] == 2
    assert (
        scraped[("archiver_rows_archived_total", (("table", "flow_run"),))]
        == (report["tables"]["flow_run"]["rows"])
    )
    assert scraped[("archiver_expired_runs_remaining", ())] == 0
    assert scraped[("archiver_failures_total", ())] == 0
    assert metric_values(metrics_file.read_text())[("archiver_batches_total", ())] == 2
    assert sqlite_database.count("flow_run") == 0


def test_an_unwritable_metrics_file_fails_before_any_batch(
    tmp_path: Path, sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    make_expired(sqlite_database, 1)
    cfg = config(tmp_path, sqlite_database, local_storage)
    bad = tmp_path / "no-such-folder" / "archiver.prom"

    result = invoke("run", "--yes", "--metrics-file", str(bad), "-c", cfg)

    assert result.exit_code == 1 and "cannot write the metrics file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sqlite_database.count("flow_run") > 0
