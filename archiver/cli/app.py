"""The ``archiver`` command: parse, call one library function, render, map errors to exit codes.

Exit codes: 0 success (for `run`: also stopped by a signal or a limit you set,
with every batch begun committed or rolled back whole); 1 an archiver error (one
line on stderr, nothing was deleted by the failed step; batches committed before
it are archived and stay so), or `verify` found the archive not sound; 2 bad usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from archiver.archive.catalog import list_batches
from archiver.archive.show import RunView, show_run
from archiver.archive.storage import Storage
from archiver.archive.verify import VerifyScope, verify_archive
from archiver.cli.console import JsonLines, Reporter, TerminalProgress, rule_table
from archiver.cli.doctor import DoctorOptions, Status, doctor
from archiver.cli.plan import Plan, plan
from archiver.cli.schedule import Schedule, parse_duration
from archiver.cli.service import Service, database_options, run_options
from archiver.cli.settings import Settings, load_settings
from archiver.engine.commit import StepHook
from archiver.engine.compact import (
    DEFAULT_TARGET_SIZE,
    CompactOptions,
    CompactReport,
    compact,
    parse_size,
)
from archiver.engine.recovery import recover
from archiver.engine.restore import RestoreOptions, restore
from archiver.engine.results import RunReport
from archiver.errors import ArchiverError, ConfigError
from archiver.source.engine import create_engine

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


@app.command("run")
def run_command(
    ctx: typer.Context,
    config: ConfigOption = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Archive and delete even if `enabled` is false.")
    ] = False,
    max_batches: Annotated[
        int | None, typer.Option("--max-batches", min=1, help="Stop after this many batches.")
    ] = None,
    max_runtime: Annotated[
        str | None,
        typer.Option(help="Start no batch that would end later than this (e.g. 50m, 1h)."),
    ] = None,
    loop: Annotated[
        bool, typer.Option("--loop", help="Keep running: a whole run on every schedule tick.")
    ] = False,
    every: Annotated[
        str | None, typer.Option(help="With --loop: run now, then every 1h (30m, 1d, PT1H...).")
    ] = None,
    cron: Annotated[
        str | None, typer.Option(help='With --loop: run on a cron expression, "0 * * * *" (UTC).')
    ] = None,
    json_lines: Annotated[
        bool, typer.Option("--json", help="JSON lines on stdout even on a terminal.")
    ] = False,
    metrics_file: Annotated[
        Path | None, typer.Option(help="Write Prometheus metrics here (node_exporter textfile).")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="With --loop: serve Prometheus /metrics on this port."),
    ] = None,
    vacuum: Annotated[
        bool,
        typer.Option("--vacuum", help="Afterwards reclaim space (VACUUM/ANALYZE); see README."),
    ] = False,
) -> None:
    """Archive expired top-level flow runs (with their whole trees), verify, then delete."""
    try:
        runtime = parse_duration(max_runtime, "--max-runtime") if max_runtime else None
        schedule = _schedule(loop, every, cron, metrics_port)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None  # bad usage: exit code 2
    try:
        settings = load_settings(config, max_batches=max_batches, vacuum=vacuum or None)
        options = replace(
            run_options(settings, dry_run=not (settings.enabled or yes)), max_runtime=runtime
        )
        service = Service(
            options,
            _reporter(json_lines),
            schedule=schedule,
            metrics_file=metrics_file,
            metrics_port=metrics_port,
            on_signal=_stopping,
        )
        service.serve(hook=ctx.obj)  # main(hook=...): tests pause or fail a batch at a step
    except ArchiverError as exc:
        _fail(exc)


def _schedule(
    loop: bool, every: str | None, cron: str | None, metrics_port: int | None
) -> Schedule | None:
    if loop:
        return Schedule.parse(every, cron)
    if every or cron or metrics_port:
        raise ConfigError(
            "--every, --cron and --metrics-port need --loop",
            hint="add --loop, or use --metrics-file for a single run",
        )
    return None


def _reporter(json_lines: bool) -> Reporter:
    if json_lines or not out.is_terminal:
        return JsonLines(sys.stdout, err)
    return TerminalProgress(out, err)


def _stopping(signal_name: str) -> None:
    err.print(
        f"{signal_name}: stopping after the batch in hand, if any (again to stop at once)",
        markup=False, highlight=False,
    )  # fmt: skip


@app.command("plan")
def plan_command(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Show what `archiver run` would archive now: runs, rows and bytes; writes nothing."""
    try:
        settings = load_settings(config)
        result = asyncio.run(plan(run_options(settings, dry_run=True)))
    except ArchiverError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    _render_plan(result)


def _render_plan(result: Plan) -> None:
    for warning in result.warnings:
        err.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    span = ""
    if result.oldest_end_time and result.newest_end_time:
        span = f", ended {result.oldest_end_time:%Y-%m-%d} .. {result.newest_end_time:%Y-%m-%d}"
    out.print(
        f"{result.expired_roots} expired top-level runs before {result.cutoff:%Y-%m-%d %H:%M} "
        f"UTC{span}; a run would archive {result.roots} in {result.batches} batches"
        + (" (stopping at max_batches; more remain)" if result.limited_by_max_batches else "")
        + (f" and skip {result.skipped_roots} with live subflows" if result.skipped_roots else ""),
        markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip
    table = Table("table", "rows", "est. MB")
    for name, count in result.rows.items():
        size = result.estimated_bytes.get(name)
        table.add_row(name, f"{count:,}", "?" if size is None else f"{size / 1e6:.2f}")
    for name, size in result.estimated_bytes.items():
        if name not in result.rows and size is not None:
            table.add_row(name, "", f"{size / 1e6:.2f}")
    table.add_row(
        "total", f"{result.total_rows:,}", f"{result.total_estimated_bytes / 1e6:.2f}", style="bold"
    )
    out.print(table)
    if result.rules:
        out.print(rule_table(result.rules))
    for label, count in result.sweeps.items():
        out.print(f"sweep {label}: {count:,} rows", markup=False, highlight=False)
    if result.estimate_method:
        out.print(
            f"estimate: {result.estimate_method}", markup=False, highlight=False, soft_wrap=True
        )


@app.command("doctor")
def doctor_command(
    config: ConfigOption = None,
    create_index: Annotated[
        bool,
        typer.Option("--create-index", help="Build missing indexes (CONCURRENTLY on PostgreSQL)."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Check database, schema, indexes, clock, storage and open batches; exit 1 on a FAIL."""
    try:
        settings = load_settings(config)
        options = DoctorOptions(
            database=database_options(settings),
            storage_url=settings.storage_url,
            storage_options=settings.storage_options,
            create_index=create_index,
        )
        report = asyncio.run(doctor(options))
    except ArchiverError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        styles = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}
        for check in report.checks:
            line = Text(f"{check.status:<4} ", style=styles[check.status])
            line.append(f"{check.name:<9} {check.detail}")
            out.print(line, soft_wrap=True)
            if check.hint and check.status is not Status.OK:
                out.print(Text(f"{'':<14} Try: {check.hint}"), soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)


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
        database = database_options(settings)
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
        merged = f" ({len(batch.compacted_from)} merged)" if batch.compacted_from else ""
        table.add_row(
            batch.batch_id + merged,
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


@app.command("compact")
def compact_command(
    config: ConfigOption = None,
    target_size: Annotated[
        str, typer.Option("--target-size", help="Largest file of a merged batch (MB = 2^20 B).")
    ] = f"{DEFAULT_TARGET_SIZE // 2**20}MB",
    dry_run: Annotated[bool, typer.Option(help="Show what would be merged.")] = False,
) -> None:
    """Merge small batches of each month into large files; verify, then drop the old ones."""
    try:
        settings = load_settings(config)
        options = CompactOptions(
            database=database_options(settings),
            storage_url=settings.storage_url,
            storage_options=settings.storage_options,
            target_size=parse_size(target_size),
            compression=settings.compression,
            dry_run=dry_run,
        )
        report = asyncio.run(compact(options))
    except ArchiverError as exc:
        _fail(exc)
    _render_compact(report)


def _render_compact(report: CompactReport) -> None:
    for message in report.recovered:
        out.print(f"recovered: {message}", markup=False, highlight=False)
    table = Table("batch", "partition", "merges", "files", "MB before", "MB after")
    for group in report.groups:
        after = "-" if report.dry_run else f"{group.bytes_after / 1e6:.2f}"
        table.add_row(
            group.batch_id or "(new)", group.partition, f"{len(group.batches)} batches",
            f"{group.files_before} -> {len(group.tables())}",
            f"{group.bytes_before / 1e6:.2f}", after,
        )  # fmt: skip
    out.print(table)
    if report.foreign_batches:
        out.print(f"{report.foreign_batches} batches of another database left alone")
    merged = sum(len(group.batches) for group in report.groups)
    verb = "would merge" if report.dry_run else "merged"
    out.print(
        f"{verb} {merged} batches into {len(report.groups)}, {report.seconds:.1f} s",
        markup=False, highlight=False,
    )  # fmt: skip


async def _recover(settings: Settings) -> list[str]:
    storage = Storage(settings.storage_url, settings.storage_options)
    engine = create_engine(database_options(settings))
    try:
        return await recover(engine, storage)
    finally:
        await engine.dispose()


def _fail(exc: ArchiverError) -> None:
    done = exc.partial_report
    if isinstance(done, RunReport) and done.batches:
        err.print(
            f"before the error, {len(done.batches)} batches ({done.archived_roots} runs) "
            "were archived, verified and committed",
            markup=False, highlight=False,
        )  # fmt: skip
    if isinstance(done, CompactReport) and done.groups:
        out.print(f"before the error, {len(done.groups)} groups were compacted and committed")
    err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def main(hook: StepHook | None = None) -> None:
    """The ``archiver`` command line, as the installed script runs it.

    ``hook(step, batch_id)`` is called after each step of every batch ``archiver
    run`` writes (:data:`archiver.engine.commit.STEPS`), so a test can pause or
    fail a real process at a known point; it does nothing for other commands.
    """
    app(obj=hook)
