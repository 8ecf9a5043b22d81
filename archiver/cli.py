"""The ``archiver`` command: parse, call one library function, render, map errors to exit codes.

Exit codes: 0 success; 1 an archiver error (one line on stderr, nothing was
deleted by the failed step), or `verify` found the archive not sound; 2 bad usage.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from archiver.errors import ArchiverError
from archiver.pipeline import RunOptions, RunReport, run
from archiver.recovery import recover
from archiver.restore import RestoreOptions, restore
from archiver.settings import Settings, load_settings
from archiver.show import RunView, show_run
from archiver.source.engine import DatabaseOptions, create_engine
from archiver.storage import Storage
from archiver.verify import VerifyScope, list_batches, verify_archive

app = typer.Typer(
    help="Archive expired Prefect runs to Parquet, verify them, then delete them.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file (see config.example.toml)."),
]


def _options(settings: Settings, *, dry_run: bool) -> RunOptions:
    return RunOptions(
        database=_database(settings),
        storage_url=settings.storage_url,
        storage_options=settings.storage_options,
        retention_period=settings.retention_period,
        batch_size=settings.batch_size,
        batch_interval=settings.batch_interval,
        max_batches=settings.max_batches,
        compression=settings.compression,
        dry_run=dry_run,
        sweeps=tuple(settings.sweeps),
        events_retention_period=settings.events_retention_period,
        sweep_batch_size=settings.sweep_batch_size,
    )


def _database(settings: Settings) -> DatabaseOptions:
    return DatabaseOptions(
        url=settings.database_url,
        lock_timeout=settings.lock_timeout,
        statement_timeout=settings.statement_timeout,
        busy_timeout=settings.busy_timeout,
    )


@app.command("run")
def run_command(
    config: ConfigOption = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Archive and delete even if `enabled` is false.")
    ] = False,
    max_batches: Annotated[
        int | None, typer.Option("--max-batches", min=1, help="Stop after this many batches.")
    ] = None,
) -> None:
    """Archive expired top-level flow runs (with their whole trees), verify, then delete."""
    try:
        settings = load_settings(config, max_batches=max_batches)
        report = asyncio.run(run(_options(settings, dry_run=not (settings.enabled or yes))))
    except ArchiverError as exc:
        _fail(exc)
    _render(report)


@app.command("recover")
def recover_command(config: ConfigOption = None) -> None:
    """Resolve batches left open by a crash (the start of every run does this too)."""
    try:
        settings = load_settings(config)
        messages = asyncio.run(_recover(settings))
    except ArchiverError as exc:
        _fail(exc)
    for message in messages:
        out.print(message)
    out.print(f"{len(messages)} open batches resolved")


@app.command("restore")
def restore_command(
    run_ids: Annotated[
        list[str] | None, typer.Argument(help="Top-level flow run ids (whole trees).")
    ] = None,
    config: ConfigOption = None,
    batch: Annotated[list[str] | None, typer.Option("--batch", help="A batch id.")] = None,
    ended_after: Annotated[
        datetime | None, typer.Option(help="Runs that ended at or after this (UTC).")
    ] = None,
    ended_before: Annotated[
        datetime | None, typer.Option(help="Runs that ended before this (UTC).")
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Target database URL (default: database_url).")
    ] = None,
    error_on_existing: Annotated[
        bool, typer.Option(help="Refuse, instead of skipping, rows that already exist.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Show what would be written.")] = False,
) -> None:
    """Put archived runs back into a Prefect database (PostgreSQL or SQLite)."""
    try:
        settings = load_settings(config)
        database = _database(settings)
        options = RestoreOptions(
            database=replace(database, url=to) if to else database,
            storage_url=settings.storage_url,
            storage_options=settings.storage_options,
            run_ids=tuple(run_ids or ()),
            batch_ids=tuple(batch or ()),
            ended_after=_utc(ended_after),
            ended_before=_utc(ended_before),
            on_conflict="error" if error_on_existing else "skip",
            dry_run=dry_run,
        )
        report = asyncio.run(restore(options))
    except ArchiverError as exc:
        _fail(exc)
    table = Table("table", "would insert" if dry_run else "inserted", "already there")
    for name, count in report.inserted.items():
        table.add_row(name, f"{count:,}", f"{report.existing.get(name, 0):,}")
    out.print(table)
    for name, columns in report.dropped_columns.items():
        err.print(f"warning: the target has no {name} column(s) {', '.join(columns)}; left out")
    verb = "would restore" if dry_run else "restored"
    out.print(f"{verb} {report.runs} runs from {len(report.batches)} batches")


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value and value.tzinfo is None else value


@app.command("show")
def show_command(run_id: str, config: ConfigOption = None) -> None:
    """Show an archived run's tree, states and logs, read from the archive alone."""
    try:
        settings = load_settings(config)
        view = show_run(Storage(settings.storage_url, settings.storage_options), run_id)
    except ArchiverError as exc:
        _fail(exc)
    out.print(_tree(view))


def _tree(view: RunView) -> Tree:
    """Plain Text labels: names and log messages are user data, never rich markup."""
    run = view.run
    tree = Tree(Text(
        f"{run['name']} {run['id']}  {run['state_name'] or run['state_type']}  "
        f"{run['start_time']} .. {run['end_time']}", style="bold",
    ))  # fmt: skip
    states = tree.add(Text("states"))
    for state in view.states:
        states.add(Text(f"{state['timestamp']}  {state['name']}  {state['message'] or ''}"))
    tasks = tree.add(Text(f"task runs ({len(view.task_runs)})"))
    for task in view.task_runs:
        tasks.add(Text(f"{task['name']}  {task['state_name'] or task['state_type']}"))
    for child in view.subflows:
        tree.add(_tree(child))
    logs = tree.add(Text(f"logs ({len(view.logs)})"))
    for log in view.logs:
        level = logging.getLevelName(log["level"])
        logs.add(Text(f"{log['timestamp']}  {level}  {log['message'][:200]}"))
    return tree


@app.command("ls")
def ls_command(config: ConfigOption = None) -> None:
    """List archived batches: partition, end-time range, runs, rows and bytes."""
    try:
        settings = load_settings(config)
        storage = Storage(settings.storage_url, settings.storage_options)
        batches = list_batches(storage)
    except ArchiverError as exc:
        _fail(exc)
    table = Table("batch", "partition", "ended", "runs", "rows", "MB")
    for batch in batches:
        archived = [f for f in batch.files if f.role == "archived"]
        table.add_row(
            batch.batch_id,
            batch.partition,
            f"{batch.end_time_min:%Y-%m-%d} .. {batch.end_time_max:%Y-%m-%d}",
            str(len(batch.root_ids)) if batch.kind == "runs" else f"({batch.kind})",
            f"{sum(f.rows for f in archived):,}",
            f"{sum(f.bytes for f in batch.files) / 1e6:.2f}",
        )
    out.print(table)
    out.print(f"{len(batches)} batches in {storage.describe()}", markup=False, highlight=False)


@app.command("verify")
def verify_command(
    config: ConfigOption = None,
    sample: Annotated[
        int | None, typer.Option(min=1, help="Re-read this many random batches only.")
    ] = None,
    ended_after: Annotated[
        datetime | None, typer.Option(help="Only batches with runs ending at or after (UTC).")
    ] = None,
    ended_before: Annotated[
        datetime | None, typer.Option(help="Only batches with runs ending before (UTC).")
    ] = None,
) -> None:
    """Re-read manifests and files; exit 1 if anything is missing, extra or different."""
    try:
        settings = load_settings(config)
        scope = VerifyScope(_utc(ended_after), _utc(ended_before), sample)
        storage = Storage(settings.storage_url, settings.storage_options)
        report = asyncio.run(verify_archive(storage, scope))
    except ArchiverError as exc:
        _fail(exc)
    for problem in report.problems:
        err.print(f"problem: {problem}", markup=False, highlight=False, soft_wrap=True)
    for key in report.open_batches:
        out.print(f"open batch (run `archiver recover`): {key}", markup=False, highlight=False)
    verdict = "sound" if report.sound else f"NOT sound: {len(report.problems)} problems"
    out.print(
        f"{report.batches} batches, {report.files} files, {report.rows:,} rows checked: {verdict}",
        markup=False, highlight=False,
    )  # fmt: skip
    if not report.sound:
        raise typer.Exit(1)


async def _recover(settings: Settings) -> list[str]:
    storage = Storage(settings.storage_url, settings.storage_options)
    engine = create_engine(_database(settings))
    try:
        return await recover(engine, storage)
    finally:
        await engine.dispose()


def _fail(exc: ArchiverError) -> None:
    done = exc.partial_report
    if isinstance(done, RunReport) and done.batches:
        out.print(
            f"before the error, {len(done.batches)} batches ({done.archived_roots} runs) "
            "were archived, verified and committed",
            markup=False, highlight=False,
        )  # fmt: skip
    err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _render(report: RunReport) -> None:
    for warning in report.warnings:
        err.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    for message in report.recovered:
        out.print(f"recovered: {message}", markup=False, highlight=False)
    span = ""
    if report.oldest_end_time and report.newest_end_time:
        span = f" (ended {report.oldest_end_time:%Y-%m-%d} .. {report.newest_end_time:%Y-%m-%d})"
    out.print(
        f"{report.expired_roots} expired top-level runs before {report.cutoff:%Y-%m-%d %H:%M} UTC"
        + span, markup=False, highlight=False,
    )  # fmt: skip
    if report.dry_run:
        for label, count in report.sweep_counts.items():
            out.print(f"sweep {label}: {count:,} rows", markup=False, highlight=False)
        out.print("dry run: nothing archived or deleted; set enabled = true or pass --yes to act")
        return
    table = Table("table", "rows archived", title=None)
    for name, count in sorted(report.rows.items()):
        table.add_row(name, f"{count:,}")
    out.print(table)
    out.print(
        f"archived {report.archived_roots} runs in {len(report.batches)} batches, "
        f"{report.bytes / 1e6:.2f} MB written, {report.seconds:.1f} s"
        + (f"; skipped {len(report.skipped_roots)} runs with live subflows"
           if report.skipped_roots else ""),
        markup=False, highlight=False,
    )  # fmt: skip
    _render_sweeps(report)


def _render_sweeps(report: RunReport) -> None:
    swept = report.swept
    for kind, rows in sorted(swept.items()):
        batches = sum(1 for batch in report.sweep_batches if batch.kind == kind)
        counts = ", ".join(f"{table} {count:,}" for table, count in sorted(rows.items()))
        out.print(f"swept {kind}: {counts} in {batches} batches", markup=False, highlight=False)
    if report.repointed_collections:
        out.print(f"re-pointed {report.repointed_collections} artifact collections")
    if not swept and not report.repointed_collections:
        out.print("sweeps: nothing to archive", markup=False, highlight=False)


def main() -> None:
    app()
