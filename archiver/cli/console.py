"""How `archiver run` talks to its operator (a companion of cli.py, and like it a user of rich).

On a terminal: a rich progress bar (runs, batches, rows, bytes, rate, and the
time left, estimated from the runs counted expired at the start), then a table
per run. Otherwise, or with ``--json``: one JSON object per line on stdout, a
``batch`` event per committed batch and a ``report`` (the run report,
:mod:`archiver.engine.report`) per run, with ``sleep`` and ``error`` events in loop
mode; the human lines go to stderr, so stdout stays machine-readable.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from archiver.engine.report import batch_event, run_report_document
from archiver.engine.results import BatchReport, RunReport
from archiver.errors import ArchiverError
from archiver.source.maintenance import MaintenanceReport
from archiver.source.retention import RuleCount


class Reporter(Protocol):
    def batch(self, report: RunReport, batch: BatchReport) -> None: ...
    def run_ended(self, report: RunReport) -> None: ...
    def failed(self, error: ArchiverError, transient: bool) -> None: ...
    def sleeping(self, until: datetime) -> None: ...


def summary_lines(report: RunReport) -> list[str]:
    """What a run did, in a few plain lines (no rich markup: values are user data)."""
    lines = [f"warning: {warning}" for warning in report.warnings]
    lines += [f"recovered: {message}" for message in report.recovered]
    span = ""
    if report.oldest_end_time and report.newest_end_time:
        span = f" (ended {report.oldest_end_time:%Y-%m-%d} .. {report.newest_end_time:%Y-%m-%d})"
    before = (
        "under the retention rules"
        if report.policies
        else f"before {report.cutoff:%Y-%m-%d %H:%M} UTC"
    )
    lines.append(f"{report.expired_roots} expired top-level runs {before}{span}")
    if report.dry_run:
        lines += [f"sweep {label}: {count:,} rows" for label, count in report.sweep_counts.items()]
        lines.append(
            "dry run: nothing archived or deleted; set enabled = true or pass --yes to act"
        )
        return lines
    skipped = len(report.skipped_roots)
    lines.append(
        f"archived {report.archived_roots} runs in {len(report.batches)} batches, "
        f"{report.bytes / 1e6:.2f} MB written, {report.seconds:.1f} s"
        + (f"; skipped {skipped} runs with live subflows" if skipped else "")
        + (f"; kept {len(report.held_roots)} runs under legal hold" if report.held_roots else "")
    )
    left = report.expired_roots - report.archived_roots - skipped - len(report.held_roots)
    if report.outcome in ("stopped", "max_batches", "max_runtime") and left > 0:
        why = {"stopped": "stop requested", "max_batches": "--max-batches reached",
               "max_runtime": "--max-runtime reached"}[report.outcome]  # fmt: skip
        lines.append(f"{why}: about {left} expired runs left for the next run")
    lines += _sweep_lines(report)
    if report.maintenance:
        lines += _maintenance_lines(report.maintenance)
    lines.append(f"run report: _reports/{report.run_id}.json")
    return lines


def _sweep_lines(report: RunReport) -> list[str]:
    lines = []
    for kind, rows in sorted(report.swept.items()):
        batches = sum(1 for batch in report.sweep_batches if batch.kind == kind)
        counts = ", ".join(f"{table} {count:,}" for table, count in sorted(rows.items()))
        lines.append(f"swept {kind}: {counts} in {batches} batches")
    if report.repointed_collections:
        lines.append(f"re-pointed {report.repointed_collections} artifact collections")
    if not lines:
        lines.append("sweeps: nothing to archive")
    return lines


def _maintenance_lines(report: MaintenanceReport) -> list[str]:
    lines = [f"warning: {warning}" for warning in report.warnings]
    if report.statements:
        sizes = ""
        if report.bytes_before is not None and report.bytes_after is not None:
            what = "database file" if report.dialect == "sqlite" else "touched tables"
            sizes = (
                f"; {what} {report.bytes_before / 1e6:.2f} MB -> {report.bytes_after / 1e6:.2f} MB"
            )
        lines.append(
            f"reclaimed space: {_statements(report.statements)} in {report.seconds:.1f} s{sizes}"
        )
    return lines


def _statements(statements: list[str]) -> str:
    """``VACUUM (...) a, VACUUM (...) b`` as ``VACUUM (...) a, b``."""
    prefix = "VACUUM (ANALYZE, SKIP_LOCKED) "
    tables = [s.removeprefix(prefix) for s in statements if s.startswith(prefix)]
    others = [s for s in statements if not s.startswith(prefix)]
    return ", ".join(others + ([prefix + ", ".join(tables)] if tables else []))


def rule_table(counts: list[RuleCount]) -> Table:
    """Per retention rule: what it matches, and how many runs it selects and keeps."""
    table = Table("rule", "matches", "does", "would archive", "keeps", "legal hold")
    for count in counts:
        table.add_row(
            Text(count.rule), Text(count.match), count.action,
            f"{count.selected:,}", f"{count.kept:,}", f"{count.held:,}",
        )  # fmt: skip
    return table


def _plain(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


class JsonLines:
    """Machine-readable events on ``stream``; human lines on ``log``."""

    def __init__(self, stream: TextIO, log: Console) -> None:
        self.stream = stream
        self.log = log

    def _emit(self, event: dict[str, Any]) -> None:
        self.stream.write(json.dumps(event) + "\n")
        self.stream.flush()

    def batch(self, report: RunReport, batch: BatchReport) -> None:
        self._emit(batch_event(report, batch))

    def run_ended(self, report: RunReport) -> None:
        self._emit(run_report_document(report))
        if report.rule_counts:
            self.log.print(rule_table(report.rule_counts))
        for line in summary_lines(report):
            _plain(self.log, line)

    def failed(self, error: ArchiverError, transient: bool) -> None:
        if isinstance(error.partial_report, RunReport):
            self._emit(run_report_document(error.partial_report))
        self._emit({"event": "error", "message": str(error), "transient": transient})
        if transient:
            _plain(self.log, f"error (the loop goes on): {error}")

    def sleeping(self, until: datetime) -> None:
        self._emit({"event": "sleep", "until": until.isoformat()})
        _plain(self.log, f"next run at {until:%Y-%m-%d %H:%M:%S} UTC")


class TerminalProgress:
    """A rich progress bar per run, then the run's table and summary."""

    def __init__(self, console: Console, log: Console) -> None:
        self.console = console
        self.log = log
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def _bar(self, report: RunReport) -> tuple[Progress, TaskID]:
        if self.progress is None or self.task is None:
            self.progress = Progress(
                TextColumn("archiving"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("runs  {task.fields[batches]} batches  {task.fields[rows]:,} rows"),
                TextColumn("{task.fields[mb]:.1f} MB  {task.fields[rate]:,.0f} rows/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "archiving", total=report.expired_roots, batches=0, rows=0, mb=0.0, rate=0.0
            )
        return self.progress, self.task

    def batch(self, report: RunReport, batch: BatchReport) -> None:
        progress, task = self._bar(report)
        rows = sum(report.rows.values())
        elapsed = (datetime.now(report.started_at.tzinfo) - report.started_at).total_seconds()
        progress.update(
            task,
            completed=report.archived_roots + len(report.skipped_roots),
            batches=len(report.batches),
            rows=rows,
            mb=report.bytes / 1e6,
            rate=rows / elapsed if elapsed > 0 else 0.0,
        )

    def _close_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.progress = self.task = None

    def run_ended(self, report: RunReport) -> None:
        self._close_bar()
        if report.rows:
            table = Table("table", "rows archived", "MB")
            document = run_report_document(report)
            for name, counts in document["tables"].items():
                if counts["rows"] or counts["bytes"]:
                    table.add_row(name, f"{counts['rows']:,}", f"{counts['bytes'] / 1e6:.2f}")
            self.console.print(table)
        if report.rule_counts:
            self.console.print(rule_table(report.rule_counts))
        for line in summary_lines(report):
            _plain(self.log if line.startswith("warning:") else self.console, line)

    def failed(self, error: ArchiverError, transient: bool) -> None:
        self._close_bar()
        if transient:
            _plain(self.log, f"error (the loop goes on): {error}")

    def sleeping(self, until: datetime) -> None:
        _plain(self.log, f"next run at {until:%Y-%m-%d %H:%M:%S} UTC")
