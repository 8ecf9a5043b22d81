"""A run: recovery, then batches of expired run trees until none are left, then the sweeps.

Each batch goes through the commit protocol (``docs/commit-protocol.md``,
:mod:`archiver.engine.commit`), one at a time (:mod:`archiver.engine.batcher`)::

    BEGIN (SQLite: IMMEDIATE)
      lock expired roots (SKIP LOCKED), gather their trees, lock them
      advisory lock on the batch id (PostgreSQL)
      at the same time, both to the end:
        PUT _pending/<batch>.json           intent: the keys about to be written
        PUT <table>/month=.../<batch>.parquet   for every table with rows
        GET every file back, fresh: checksum, row count, exact primary keys
      and
        DELETE exactly those keys; each count must match
      INSERT the manifest into the ledger (only if both succeeded)
    COMMIT
    PUT _manifests/<batch>.json; DELETE _pending/<batch>.json

Any failure before COMMIT rolls back and removes what the batch wrote, so the
database is unchanged. On PostgreSQL the next batch is locked, read and encoded
on a second connection while this one runs (:mod:`archiver.engine.read_ahead`;
nothing of it is written before this batch commits). A failure *during* COMMIT
leaves the files and marker for recovery, which asks the ledger what happened.

Which roots are expired is decided by the retention policy (``archiver.policy``):
ordered rules, the global ``retention_period`` for the runs no rule matches, and
a legal-hold tag whose trees are never taken. The manifest names each root's rule.

After the run batches, the sweeps (:mod:`archiver.engine.sweeps`: orphans, artifact
collections, events) go through the very same path: a sweep proposes ids from
its keyset walk, and :meth:`Batcher.run_selected` locks them in a batch
transaction and commits them under the protocol above. Any batch whose
artifacts were the latest of an ``artifact_collection`` re-points or archives
that collection in the same transaction. This module owns the run around the
batches: its clock and limits (:class:`_Watch`), recovery first, vacuum last.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from archiver.archive.storage import Storage
from archiver.engine.batcher import Batcher
from archiver.engine.commit import StepHook, no_hook
from archiver.engine.options import RunOptions, short_retention_warnings
from archiver.engine.recovery import ensure_source, recover
from archiver.engine.report import write_run_report
from archiver.engine.results import BatchListener, BatchReport, RunReport
from archiver.engine.sweeps import Sweep, count_sweeps, plan_sweeps
from archiver.errors import ArchiverError, StorageError
from archiver.models import Root
from archiver.source.engine import create_engine, translate_error
from archiver.source.maintenance import reclaim_space
from archiver.source.retention import RuleCount, count_by_rule, select_expired
from archiver.source.schema import inspect_schema
from archiver.source.trees import count_expired


async def run(
    options: RunOptions,
    hook: StepHook | None = None,
    *,
    on_batch: BatchListener | None = None,
    stop: asyncio.Event | None = None,
) -> RunReport:
    """Archive expired run trees batch by batch until none remain.

    With ``options.dry_run`` it only counts what it would archive. Raises
    ArchiverError subclasses; a failed batch is rolled back before raising.
    Setting ``stop`` (SIGTERM, for example) ends the run after the batch in
    hand, which commits or rolls back whole; ``report.outcome`` says why the
    run ended. Unless dry, the run's report is written to ``_reports/``.
    ``hook(step, batch_id)`` is called after each step of every batch
    (:data:`archiver.engine.commit.STEPS`); tests use it to inject faults.
    """
    started = time.monotonic()
    options = replace(options, now=options.now or datetime.now(UTC))  # one cutoff per run
    storage = Storage(options.storage_url, options.storage_options, options.storage_retry)
    await asyncio.to_thread(storage.check_reachable)
    engine = create_engine(options.database)
    watch = _Watch(options, started, on_batch, stop or asyncio.Event())
    try:
        report = await _run(engine, storage, options, hook or no_hook, watch)
    except ArchiverError as exc:
        if isinstance(exc.partial_report, RunReport):
            exc.partial_report.outcome, exc.partial_report.error = "failed", str(exc)
            await _finish(exc.partial_report, storage, options, started)
        raise
    finally:
        await engine.dispose()
    await _finish(report, storage, options, started)
    return report


async def _finish(report: RunReport, storage: Storage, options: RunOptions, started: float) -> None:
    report.seconds = time.monotonic() - started
    if options.dry_run or not options.write_report:
        return
    try:
        await asyncio.to_thread(write_run_report, storage, report)
    except StorageError as exc:  # the batches are committed; only the summary is missing
        report.warnings.append(f"the run report was not written: {exc.message}")


async def _run(
    engine: AsyncEngine, storage: Storage, options: RunOptions, hook: StepHook, watch: _Watch
) -> RunReport:
    url = options.database.url
    cutoff = options.cutoff
    policy = options.policy()
    rule_counts: list[RuleCount] = []
    try:
        async with engine.connect() as conn:
            schema = await inspect_schema(conn)
            assert options.now is not None  # run() fixes the clock: one cutoff per rule per run
            selection = await select_expired(conn, policy, options.now)
            expired, oldest, newest = await count_expired(conn, selection.upper_cutoff, selection)
            if options.dry_run and policy.rules:
                rule_counts = await count_by_rule(conn, policy, options.now)
            counts = {}
            if options.dry_run:  # a full run walks the tables instead of counting first
                counts = await count_sweeps(conn, schema, options.sweep_options())
    except (SQLAlchemyError, OSError) as exc:
        raise translate_error(exc, url) from None
    report = RunReport(
        options.dry_run, cutoff, expired, oldest, newest, warnings=list(schema.warnings)
    )
    report.sweep_counts = counts
    report.rule_counts, report.policies = rule_counts, bool(policy.rules)
    report.warnings += short_retention_warnings(policy)
    if options.dry_run:
        report.outcome = "dry_run"
        return report
    batcher: Batcher | None = None
    try:
        source_id = await ensure_source(engine)
        report.recovered = await recover(engine, storage, source_id)
        batcher = Batcher(engine, storage, schema, options, hook, source_id, selection)
        await _loop(batcher, watch, report)
        await _sweep(batcher, plan_sweeps(options.sweep_options(), schema), watch, report)
    except ArchiverError as exc:
        exc.partial_report = report
        raise
    finally:
        if batcher is not None:
            await batcher.drop_read_ahead()
            report.held_roots = sorted(batcher.held_roots)
            report.repointed_collections = batcher.repointed
    if options.vacuum and (report.batches or report.sweep_batches):
        touched = [table for table, count in report.rows.items() if count]
        touched += [t for tables in report.swept.values() for t, c in tables.items() if c]
        report.maintenance = await reclaim_space(engine, sorted(set(touched)))
    return report


async def _loop(batcher: Batcher, watch: _Watch, report: RunReport) -> None:
    after: Root | None = None
    try:
        while not watch.should_stop(report):
            outcome = await batcher.run_one(after, may_follow=watch.may_follow(report))
            if outcome is None:
                report.outcome = "done"
                return
            after, batch = outcome
            if batch is None:
                continue  # every root of this slice had a live subflow; move on
            report.batches.append(batch)
            report.skipped_roots.extend(batch.skipped_roots)
            watch.batch_done(report, batch)
            await watch.pause()
    finally:
        await batcher.drop_read_ahead()  # a limit or a stop came first: release its locks


@dataclass
class _Watch:
    """The limits of one run (batches, time, a stop request) and who hears of its batches."""

    options: RunOptions
    started: float
    on_batch: BatchListener | None
    stop: asyncio.Event
    longest_batch: float = 0.0

    def should_stop(self, report: RunReport) -> bool:
        """Decide before each batch, so a batch is never cut short by a limit."""
        limit = self.options.max_runtime
        elapsed = time.monotonic() - self.started
        if self.stop.is_set():
            report.outcome = "stopped"
        elif self.options.max_batches is not None and (
            len(report.batches) + len(report.sweep_batches) >= self.options.max_batches
        ):
            report.outcome = "max_batches"
        elif limit is not None and elapsed + self.longest_batch > limit.total_seconds():
            report.outcome = "max_runtime"
        else:
            return False
        return True

    def may_follow(self, report: RunReport) -> int | None:
        """How many batches the batch limit lets follow the next one (None: no limit).

        Batches read ahead beyond a stop or the runtime limit are rolled back unused.
        """
        limit = self.options.max_batches
        if limit is None:
            return None
        return max(limit - len(report.batches) - len(report.sweep_batches) - 1, 0)

    def batch_done(self, report: RunReport, batch: BatchReport) -> None:
        self.longest_batch = max(self.longest_batch, batch.seconds)
        if self.on_batch is not None:
            self.on_batch(report, batch)

    async def pause(self) -> None:
        """Sleep batch_interval, waking at once on a stop request."""
        if self.options.batch_interval:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.options.batch_interval)


async def _sweep(batcher: Batcher, sweeps: list[Sweep], watch: _Watch, report: RunReport) -> None:
    """Each sweep walks its table once; every slice it proposes becomes one batch."""
    for sweep in sweeps:
        walker = batcher.walker(sweep)
        while not watch.should_stop(report):
            chosen = await batcher.propose(walker, batcher.options.sweep_batch_size)
            if chosen is None:
                break
            batch = await batcher.run_selected(
                partial(sweep.select, schema=batcher.schema, chosen=chosen)
            )
            if batch is None:
                continue  # everything proposed was taken or changed meanwhile
            report.sweep_batches.append(batch)
            watch.batch_done(report, batch)
            await watch.pause()
