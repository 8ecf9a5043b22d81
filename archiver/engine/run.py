"""One batch end to end, and the loop of batches.

A batch is one database transaction around storage work (the commit protocol,
``docs/commit-protocol.md``)::

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
on a second connection while this one runs (read-ahead; nothing of it is
written before this batch commits). A failure *during* COMMIT leaves the files
and marker for recovery, which asks the ledger what happened.

Which roots are expired is decided by the retention policy (``archiver.policy``):
ordered rules, the global ``retention_period`` for the runs no rule matches, and
a legal-hold tag whose trees are never taken. The manifest names each root's rule.

After the run batches, the sweeps (``archiver.engine.sweeps``: orphans, artifact
collections, events) go through the very same path: a sweep proposes ids from
its keyset walk, and :meth:`_Batcher.run_selected` locks them in a batch
transaction and commits them under the protocol above. Any batch whose
artifacts were the latest of an ``artifact_collection`` re-points or archives
that collection in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from archiver.archive import codec
from archiver.archive.manifest import BatchManifest, FileRecord, PendingMarker
from archiver.archive.storage import Storage, data_key, manifest_key, pending_key
from archiver.archive.verify import check_written
from archiver.engine.recovery import ensure_source, recover
from archiver.engine.report import write_run_report
from archiver.engine.sweeps import (
    DEFAULT_EVENTS_RETENTION,
    DEFAULT_SWEEPS,
    Sweep,
    SweepName,
    SweepOptions,
    count_sweeps,
    plan_sweeps,
)
from archiver.errors import (
    ArchiverError,
    BatchError,
    ConfigError,
    DatabaseError,
    StorageError,
    TransientDatabaseError,
    VerificationError,
)
from archiver.models import BatchContent, Root, TableRows
from archiver.policy import DEFAULT_LEGAL_HOLD_TAG, RetentionPolicy, Rule
from archiver.source import ledger
from archiver.source.collections import apply_repoints, plan_collections
from archiver.source.deletion import delete_archived
from archiver.source.engine import (
    DatabaseOptions,
    create_engine,
    translate_error,
    write_transaction_options,
)
from archiver.source.keyset import Slice, Walker
from archiver.source.maintenance import MaintenanceReport, reclaim_space
from archiver.source.retention import RuleCount, Selection, count_by_rule, select_expired
from archiver.source.schema import PrefectSchema, inspect_schema
from archiver.source.trees import Gathered, count_expired, gather, lock_roots
from archiver.version import __version__

#: Called as ``hook(step, batch_id)`` after each step; tests use it to inject faults.
#: Also called as ``hook("selected", "")`` once a batch's roots are locked, before its
#: trees are (no batch id yet, nothing written: a fault there is a plain rollback).
StepHook = Callable[[str, str], None]
#: Called as ``on_batch(run_so_far, batch)`` after each committed batch (progress, metrics).
BatchListener = Callable[["RunReport", "BatchReport"], None]
#: Why a run ended: nothing expired left, or a limit or a stop request came first.
Outcome = Literal["dry_run", "done", "stopped", "max_batches", "max_runtime", "failed"]
#: Locks and reads one batch's rows inside the batch transaction; None if none are left.
Select = Callable[[AsyncConnection], Awaitable[BatchContent | None]]
T = TypeVar("T")
U = TypeVar("U")
Role = Literal["archived", "reference"]
STEPS = (
    "gathered", "marker", "file", "files", "verified", "deleted", "committed", "manifest", "done"
)  # fmt: skip


@dataclass(frozen=True)
class RunOptions:
    """Everything one run needs, as plain values (the CLI builds it from Settings)."""

    database: DatabaseOptions
    storage_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    retention_period: timedelta = timedelta(days=90)
    batch_size: int = 200
    batch_interval: float = 0.5
    max_batches: int | None = None
    compression: str = "zstd"
    batch_attempts: int = 3  # tries per batch when it fails for a transient reason
    dry_run: bool = True
    vacuum: bool = False  # after the batches, reclaim space (source/maintenance.py)
    now: datetime | None = None  # the clock, for tests; default: the current UTC time
    #: start no batch that would end after this much time (judged by the longest batch so far)
    max_runtime: timedelta | None = None
    write_report: bool = True  # put _reports/<run_id>.json in the archive after a run
    #: retention rules, first match wins; runs no rule matches use retention_period
    policies: tuple[Rule, ...] = ()
    #: trees with a flow run carrying this tag are never archived (None: no legal hold)
    legal_hold_tag: str | None = DEFAULT_LEGAL_HOLD_TAG

    sweeps: tuple[SweepName, ...] = DEFAULT_SWEEPS  # run after the run batches
    events_retention_period: timedelta = DEFAULT_EVENTS_RETENTION
    sweep_batch_size: int = 5000  # rows of the swept table per batch
    #: PostgreSQL: batches locked, read and encoded on their own connections while one
    #: is written and deleted (0: none; SQLite has one writer, so it never reads ahead)
    read_ahead: int = 1

    @property
    def cutoff(self) -> datetime:
        return (self.now or datetime.now(UTC)) - self.retention_period

    def policy(self) -> RetentionPolicy:
        """The retention policy; raises ConfigError for a rule that is invalid or never matches."""
        try:
            return RetentionPolicy(self.policies, self.retention_period, self.legal_hold_tag)
        except ValueError as exc:
            raise ConfigError(
                f"invalid retention policy: {exc}", hint="fix the policies in the config"
            ) from None

    def sweep_options(self) -> SweepOptions:
        now = self.now or datetime.now(UTC)
        return SweepOptions(
            sweeps=self.sweeps,
            cutoff=self.cutoff,
            events_cutoff=now - self.events_retention_period,
            now=now,
            batch_size=self.sweep_batch_size,
        )


@dataclass
class BatchReport:
    batch_id: str
    partition: str
    roots: int
    skipped_roots: list[str]
    rows: dict[str, int]
    bytes: int
    seconds: float
    stages: dict[str, float]
    #: bytes written per table, the snapshots (flow, deployment) included
    table_bytes: dict[str, int] = field(default_factory=dict)
    kind: str = "runs"


@dataclass
class RunReport:
    dry_run: bool
    cutoff: datetime
    expired_roots: int
    oldest_end_time: datetime | None
    newest_end_time: datetime | None
    batches: list[BatchReport] = field(default_factory=list)
    skipped_roots: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    run_id: str = field(default_factory=lambda: _time_sortable_id(datetime.now(UTC)))
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    outcome: Outcome = "done"
    error: str | None = None  # the one-line error of a failed run
    maintenance: MaintenanceReport | None = None
    #: roots left alone because their tree carries the legal-hold tag
    held_roots: list[str] = field(default_factory=list)
    #: per retention rule, what it selects and keeps (dry runs with policies only)
    rule_counts: list[RuleCount] = field(default_factory=list)
    #: whether retention rules beyond retention_period were in force
    policies: bool = False
    #: batches of the sweeps (orphans, standalone task runs, collections, events)
    sweep_batches: list[BatchReport] = field(default_factory=list)
    #: artifact collections re-pointed to a remaining artifact (by run or sweep batches)
    repointed_collections: int = 0
    #: dry run: rows each sweep would take (``kind:table``)
    sweep_counts: dict[str, int] = field(default_factory=dict)

    @property
    def swept(self) -> dict[str, dict[str, int]]:
        """Rows archived by the sweeps: batch kind -> table -> rows."""
        totals: dict[str, dict[str, int]] = {}
        for batch in self.sweep_batches:
            by_table = totals.setdefault(batch.kind, {})
            for table, count in batch.rows.items():
                by_table[table] = by_table.get(table, 0) + count
        return totals

    @property
    def archived_roots(self) -> int:
        return sum(batch.roots for batch in self.batches)

    @property
    def rows(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for batch in self.batches:
            for table, count in batch.rows.items():
                totals[table] = totals.get(table, 0) + count
        return totals

    @property
    def bytes(self) -> int:
        return sum(batch.bytes for batch in self.batches)


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
    """
    started = time.monotonic()
    options = replace(options, now=options.now or datetime.now(UTC))  # one cutoff per run
    storage = Storage(options.storage_url, options.storage_options)
    await asyncio.to_thread(storage.check_reachable)
    engine = create_engine(options.database)
    watch = _Watch(options, started, on_batch, stop or asyncio.Event())
    try:
        report = await _run(engine, storage, options, hook or _no_hook, watch)
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


def short_retention_warnings(policy: RetentionPolicy) -> list[str]:
    """A warning when any rule keeps runs less than a day (also for ``archiver plan``)."""
    short = [
        rule.name
        for rule in policy.effective_rules
        if rule.retention is not None and rule.retention < timedelta(days=1)
    ]
    if not short:
        return []
    what = "retention_period" if short == ["default"] else f"the retention of {short}"
    return [
        f"{what} is under a day: Prefect's cancellation clean-up may still be "
        "writing to cancelled runs archiver takes (a day or more is safe)"
    ]


def _no_hook(step: str, batch_id: str) -> None:
    return None


def _time_sortable_id(moment: datetime) -> str:
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}"


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
    batcher: _Batcher | None = None
    try:
        source_id = await ensure_source(engine)
        report.recovered = await recover(engine, storage, source_id)
        batcher = _Batcher(engine, storage, schema, options, hook, source_id, selection)
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


async def _loop(batcher: _Batcher, watch: _Watch, report: RunReport) -> None:
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


async def _sweep(batcher: _Batcher, sweeps: list[Sweep], watch: _Watch, report: RunReport) -> None:
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


class _Batcher:
    """Runs one batch at a time under the commit protocol."""

    def __init__(
        self,
        engine: AsyncEngine,
        storage: Storage,
        schema: PrefectSchema,
        options: RunOptions,
        hook: StepHook,
        source_id: str,
        selection: Selection,
    ) -> None:
        self.engine = engine
        self.storage = storage
        self.schema = schema
        self.options = options
        self.hook = hook
        self.source_id = source_id
        self.selection = selection
        self.held_roots: set[str] = set()
        self.repointed = 0  # artifact collections re-pointed by committed transactions
        # SQLite has one writer: a second batch's BEGIN IMMEDIATE would only wait.
        self.read_ahead = options.read_ahead if engine.dialect.name == "postgresql" else 0
        self._ahead: deque[tuple[Root, asyncio.Task[_Prepared | _Outcome]]] = deque()
        self._may_follow: int | None = None  # batches the batch limit still allows
        self._stalled: Root | None = None  # the last root of a batch whose successor waits
        self._generation = 0  # bumped when the batches read ahead are dropped

    async def run_one(
        self, after: Root | None, *, may_follow: int | None = 0
    ) -> tuple[Root, BatchReport | None] | None:
        """Archive the next batch after ``after``; None when nothing is left.

        A batch that failed for a transient reason (lost connection, rows changed
        under it) was rolled back whole, so it is simply tried again, a few times.
        On PostgreSQL up to ``read_ahead`` of the batches after it (and no more than
        ``may_follow``) are locked, read and encoded on their own connections meanwhile.
        """
        self._may_follow = may_follow
        return await self._retrying()(self._run_next, after)

    async def run_selected(self, select: Select) -> BatchReport | None:
        """One batch of whatever ``select`` locks and returns inside the transaction.

        None when it found nothing left to archive. Retried like :meth:`run_one`.
        """
        return await self._retrying()(self._attempt, partial(self._selected, select=select))

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(self.options.batch_attempts),
            wait=wait_exponential(multiplier=0.5, max=10),
            reraise=True,
        )

    def walker(self, sweep: Sweep) -> Walker:
        return Walker(sweep.walk, sweep.cutoff, self.options.sweep_batch_size)

    async def propose(self, walker: Walker, want: int) -> Slice | None:
        """The next ids of a sweep's walk, read outside any batch transaction."""
        try:
            async with self.engine.connect() as conn:
                return await walker.next_slice(conn, want)
        except (SQLAlchemyError, OSError) as exc:
            raise BatchError(
                "talking to the database", translate_error(exc, self.options.database.url)
            ) from None

    async def _attempt(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async def on_new_connection() -> T:
            async with self.engine.connect() as conn:
                await write_transaction_options(conn)
                return await work(conn)

        return await self._guarded(on_new_connection())

    async def _guarded(self, work: Awaitable[T]) -> T:
        """``work``, with a database error turned into a BatchError that names the URL."""
        try:
            return await work
        except ArchiverError:
            raise
        except (SQLAlchemyError, OSError) as exc:
            raise BatchError(
                "talking to the database", translate_error(exc, self.options.database.url)
            ) from None

    async def _selected(self, conn: AsyncConnection, select: Select) -> BatchReport | None:
        clock = _Stopwatch()
        transaction = await conn.begin()
        content = await select(conn)
        clock.lap("select")
        if content is None or not (content.row_count or content.repoints):
            await transaction.rollback()
            return None
        if not content.row_count:  # only collections to re-point: nothing to archive
            await apply_repoints(conn, content.repoints)
            await self._commit(transaction, "re-pointing artifact collections")
            self.repointed += len(content.repoints)
            return None
        await self._follow_collections(conn, content)
        prepared = _Prepared(conn, transaction, None, self._plan(content), clock)
        return await self._archive(prepared)

    async def _run_next(self, after: Root | None) -> tuple[Root, BatchReport | None] | None:
        read_ahead = await self._take_read_ahead(after)
        if read_ahead is None:
            prepared = await self._guarded(self._prepare(after, self._generation, encode=False))
        else:
            prepared = await read_ahead  # raises what reading it raised
        if not isinstance(prepared, _Prepared):
            return prepared
        try:
            prepared.clock.resume()  # a batch read ahead waited its turn: not its time
            report = await self._guarded(self._archive(prepared))
        except BaseException:
            await _release(prepared.conn, prepared.transaction)  # first: a batch read ahead
            await self.drop_read_ahead()  # may be waiting for one of this batch's locks
            raise
        await _release(prepared.conn, None)
        assert prepared.last is not None  # run batches know their keyset position
        return prepared.last, report

    async def _prepare(
        self, after: Root | None, generation: int, *, encode: bool = True
    ) -> _Prepared | _Outcome:
        """Open a transaction, lock and read the batch after ``after``, plan its
        artifact collections and (``encode``) encode its files.

        Once it holds every lock it will take, the batch after it may start
        (:meth:`_locked`). A batch read ahead runs while the batches before it are
        written and deleted on their own connections. Its roots come after theirs,
        so they share no run; a collection two batches touch was locked by the
        earlier one first, so the later one waits for that COMMIT and then plans on
        what it left. Nothing is written anywhere here: a crash leaves nothing to
        recover.
        """
        clock = _Stopwatch()
        conn = await self.engine.connect()
        transaction = None
        try:
            await write_transaction_options(conn)
            transaction = await conn.begin()
            selection = self.selection
            roots = await lock_roots(
                conn, selection.upper_cutoff, self.options.batch_size, after, selection
            )
            if not roots:
                await _release(conn, transaction)
                return None
            self.hook("selected", "")
            gathered = await gather(
                conn, self.schema, roots, legal_hold_tag=self.options.legal_hold_tag
            )
            self.held_roots.update(gathered.held_roots)
            if not gathered.roots:
                await _release(conn, transaction)
                self._locked(roots[-1], generation)
                return roots[-1], None
            content = _run_content(gathered)
            await self._follow_collections(conn, content)
            self._locked(roots[-1], generation)
            clock.lap("select")
            prepared = _Prepared(conn, transaction, roots[-1], self._plan(content), clock)
            if encode:
                await prepared.encode()
            return prepared
        except BaseException:
            await _release(conn, transaction)
            raise

    def _locked(self, last: Root, generation: int) -> None:
        """A batch ending at ``last`` holds all its locks: the next may start reading,
        unless enough are read ahead already (then it starts when one is taken)."""
        if generation != self._generation:
            return  # its pipeline was dropped
        room = (
            self.read_ahead if self._may_follow is None else min(self.read_ahead, self._may_follow)
        )
        if len(self._ahead) >= room:
            self._stalled = last
            return
        self._stalled = None
        task = asyncio.create_task(self._guarded(self._prepare(last, generation)))
        self._ahead.append((last, task))

    async def _take_read_ahead(
        self, after: Root | None
    ) -> asyncio.Task[_Prepared | _Outcome] | None:
        """The reading of the batch after ``after``, if it was started ahead."""
        if not self._ahead:
            return None
        if self._ahead[0][0] != after:  # a retried batch moved the keyset: start afresh
            await self.drop_read_ahead()
            return None
        _, task = self._ahead.popleft()
        if self._stalled is not None:
            self._locked(self._stalled, self._generation)
        return task

    async def drop_read_ahead(self) -> None:
        """Roll back the batches read ahead that will not be archived. Idempotent."""
        self._generation += 1  # their own successors are not started any more
        self._stalled = None
        while self._ahead:
            _, task = self._ahead.popleft()
            with contextlib.suppress(Exception):
                prepared = await task
                if isinstance(prepared, _Prepared):
                    await _release(prepared.conn, prepared.transaction)

    def _plan(self, content: BatchContent) -> _PlannedBatch:
        return _PlannedBatch(content, self.schema, self.options, self.source_id)

    async def _archive(self, prepared: _Prepared) -> BatchReport:
        """The commit protocol for one batch whose rows its connection has locked."""
        conn, transaction, batch, clock = (
            prepared.conn, prepared.transaction, prepared.batch, prepared.clock
        )  # fmt: skip
        content = batch.content
        await ledger.hold_batch_lock(conn, batch.batch_id)
        self.hook("gathered", batch.batch_id)
        try:
            # The DELETEs run while the files are written and verified: they stay
            # uncommitted, and COMMIT comes only once both have succeeded.
            records, _ = await _both(
                self._write_and_verify(prepared), self._delete(conn, batch, clock)
            )
            clock.lap("wait")  # for the slower of the two, already counted in its stages
            manifest = batch.manifest(records)
            await ledger.record_commit(conn, batch.batch_id, manifest.to_json())
            clock.lap("delete")
        except BaseException as exc:
            await self._abandon(transaction, batch)
            raise _batch_error(exc, self.options.database.url) from exc
        await self._commit(transaction, f"batch {batch.batch_id}")
        self.repointed += len(content.repoints)
        self.hook("committed", batch.batch_id)
        clock.lap("commit")
        await self._publish(manifest)
        clock.lap("manifest")
        self.hook("done", batch.batch_id)
        return batch.report(manifest, clock)

    async def _delete(self, conn: AsyncConnection, batch: _PlannedBatch, clock: _Stopwatch) -> None:
        started = time.monotonic()
        content = batch.content
        await delete_archived(conn, batch.ids_by_table(), cascade=content.kind == "runs")
        await apply_repoints(conn, content.repoints)
        self.hook("deleted", batch.batch_id)
        clock.record("delete", time.monotonic() - started)

    async def _follow_collections(self, conn: AsyncConnection, content: BatchContent) -> None:
        """Collections whose latest artifact leaves: archive them too, or re-point them."""
        artifacts = content.tables.get("artifact")
        if artifacts is None or "artifact_collection" not in self.schema.tables:
            return
        archived, repoints = await plan_collections(conn, self.schema, artifacts)
        if len(archived):
            content.tables["artifact_collection"] = archived
        content.repoints.extend(repoints)

    async def _write_and_verify(self, prepared: _Prepared) -> list[FileRecord]:
        batch, clock, encoded = prepared.batch, prepared.clock, await prepared.encode()
        marker = PendingMarker(
            batch_id=batch.batch_id,
            source_id=self.source_id,
            created_at=datetime.now(UTC),
            keys=list(encoded),
        )
        await asyncio.to_thread(
            self.storage.put, pending_key(batch.batch_id), marker.to_json().encode()
        )
        self.hook("marker", batch.batch_id)
        puts = [(self.storage.put, (key, file.data)) for key, (_, _, file) in encoded.items()]
        await _in_threads(puts, lambda _: self.hook("file", batch.batch_id))
        self.hook("files", batch.batch_id)
        clock.lap("upload")
        checks = []
        for key, (rows, role, file) in encoded.items():
            table = rows.shape.name
            checks.append(
                (check_written, (self.storage, key, table, role, batch.ids[table], file.sha256))
            )
        records: list[FileRecord] = await _in_threads(checks)
        self.hook("verified", batch.batch_id)
        clock.lap("verify")
        return records

    async def _abandon(self, transaction: Any, batch: _PlannedBatch) -> None:
        """Remove what the batch wrote, then roll back. If removal fails, recovery will.

        Files go first, while the batch still holds its locks: after the rollback
        another archiver may take the same runs at once.
        """
        try:
            for key in batch.data_keys():
                await asyncio.to_thread(self.storage.delete, key)
            await asyncio.to_thread(self.storage.delete, pending_key(batch.batch_id))
        except ArchiverError:
            pass  # the pending marker stays; the next run's recovery removes the files
        with contextlib.suppress(SQLAlchemyError, OSError):
            await transaction.rollback()  # a dead connection has rolled back already

    async def _commit(self, transaction: Any, what: str) -> None:
        try:
            await transaction.commit()
        except (SQLAlchemyError, OSError) as exc:
            raise DatabaseError(
                f"COMMIT of {what} failed and may or may not have happened "
                f"({translate_error(exc, self.options.database.url).message}); its files stay "
                "until recovery asks the ledger",
                hint="run `archiver recover` or `archiver run` again",
            ) from None

    async def _publish(self, manifest: BatchManifest) -> None:
        """Write the manifest of a committed batch; on failure, recovery writes it later."""
        data = manifest.to_json().encode()
        try:
            await asyncio.to_thread(self.storage.put, manifest_key(manifest.batch_id), data)
            self.hook("manifest", manifest.batch_id)
            await asyncio.to_thread(self.storage.delete, pending_key(manifest.batch_id))
        except StorageError as exc:
            raise StorageError(
                f"batch {manifest.batch_id} is archived and committed, but writing its manifest "
                f"failed ({exc.message}); the ledger holds it and the next run writes it",
                hint="run `archiver recover` once storage is reachable",
            ) from None


async def _both(first: Awaitable[T], second: Awaitable[U]) -> tuple[T, U]:
    """Run both at once; once both have ended, raise the first one's failure, if any.

    Neither is cancelled when the other fails: the caller cleans up only after
    every write and statement in flight has finished.
    """
    one, two = await asyncio.gather(first, second, return_exceptions=True)
    for outcome in (one, two):
        if isinstance(outcome, BaseException):
            raise outcome
    return one, two  # type: ignore[return-value]


async def _in_threads(
    calls: list[tuple[Callable[..., T], tuple[Any, ...]]],
    each: Callable[[T], None] | None = None,
) -> list[T]:
    """Run blocking calls in threads at once; results in call order.

    ``each`` runs in the event loop as every call completes. Whatever happens,
    every call has finished before this returns or raises, so a caller that
    cleans up after a failure never races a write still in flight.
    """
    tasks = [asyncio.ensure_future(asyncio.to_thread(call, *args)) for call, args in calls]
    try:
        for done in asyncio.as_completed(tasks):
            result = await done
            if each is not None:
                each(result)
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
    return [task.result() for task in tasks]


_Outcome = tuple[Root, "BatchReport | None"] | None
_Encoded = dict[str, tuple[TableRows, Role, codec.EncodedFile]]


@dataclass
class _Prepared:
    """A batch locked and read in its open transaction; nothing of it written yet."""

    conn: AsyncConnection
    transaction: Any
    last: Root | None  # the keyset position after it (run batches)
    batch: _PlannedBatch
    clock: _Stopwatch
    encoded: _Encoded | None = None

    async def encode(self) -> _Encoded:
        if self.encoded is None:
            self.encoded = await asyncio.to_thread(self.batch.encode)
            self.clock.lap("encode")
        return self.encoded


async def _release(conn: AsyncConnection, transaction: Any) -> None:
    """Roll back ``transaction`` if still open, and close ``conn``; never raises.

    A connection that cannot roll back (dropped, or stopped mid-COPY) is discarded
    rather than handed back to the pool.
    """
    try:
        if transaction is not None and transaction.is_active:
            await transaction.rollback()
    except (SQLAlchemyError, OSError):
        with contextlib.suppress(SQLAlchemyError, OSError):
            await conn.invalidate()
    with contextlib.suppress(SQLAlchemyError, OSError):
        await conn.close()


class _PlannedBatch:
    """The rows of one batch and the names they will be written under."""

    def __init__(
        self, content: BatchContent, schema: PrefectSchema, options: RunOptions, source_id: str
    ) -> None:
        self.content = content
        self.schema = schema
        self.options = options
        self.source_id = source_id
        self.created_at = datetime.now(UTC)
        # Sortable by time, and unique: two attempts at the same runs never share a name.
        self.batch_id = _time_sortable_id(self.created_at)
        self.partition = content.partition
        tables: list[tuple[TableRows, Role]] = [
            *((rows, "archived") for rows in content.tables.values()),
            *((rows, "reference") for rows in content.references.values()),
        ]
        self.files = {
            data_key(rows.shape.name, self.partition, self.batch_id): (rows, role)
            for rows, role in tables
            if len(rows)
        }
        # Once per batch: both the DELETEs and the read-back checks need them.
        self.ids = {rows.shape.name: rows.ids for rows, _ in tables}

    def data_keys(self) -> list[str]:
        return list(self.files)

    def ids_by_table(self) -> dict[str, list[str]]:
        """The archived tables' ids (references are not deleted)."""
        return {table: self.ids[table] for table in self.content.tables}

    def encode(self) -> _Encoded:
        encoded = {}
        for key, (rows, role) in self.files.items():
            metadata = {
                "archiver.table": rows.shape.name,
                "archiver.role": role,
                "archiver.kind": self.content.kind,
                "archiver.batch_id": self.batch_id,
                "archiver.partition": self.partition,
                "archiver.source_dialect": self.schema.dialect,
                "archiver.source_revision": self.schema.revision,
                "archiver.version": __version__,
                "archiver.source_id": self.source_id,
            }
            encoded[key] = (rows, role, codec.encode(rows, metadata, self.options.compression))
        return encoded

    def manifest(self, records: list[FileRecord]) -> BatchManifest:
        oldest, newest = self.content.time_range
        return BatchManifest(
            batch_id=self.batch_id,
            source_id=self.source_id,
            created_at=self.created_at,
            cutoff=self.options.cutoff,
            partition=self.partition,
            source_dialect=self.schema.dialect,
            source_revision=self.schema.revision,
            archiver_version=__version__,
            root_ids=sorted(root.id for root in self.content.roots),
            root_rules={root.id: root.rule for root in self.content.roots if root.rule},
            end_time_min=oldest,
            end_time_max=newest,
            files=records,
            kind=self.content.kind,
        )

    def report(self, manifest: BatchManifest, clock: _Stopwatch) -> BatchReport:
        return BatchReport(
            batch_id=self.batch_id,
            partition=self.partition,
            roots=len(self.content.roots),
            skipped_roots=self.content.skipped_roots,
            rows={table: len(rows) for table, rows in self.content.tables.items()},
            bytes=sum(f.bytes for f in manifest.files),
            seconds=clock.total(),
            stages=clock.laps,
            table_bytes={f.table: f.bytes for f in manifest.files},
            kind=self.content.kind,
        )


def _run_content(gathered: Gathered) -> BatchContent:
    """A batch of expired run trees: one month of roots (lock_roots guarantees it)."""
    months = {f"{root.end_time.astimezone(UTC):%Y-%m}" for root in gathered.roots}
    assert len(months) == 1, "lock_roots returns roots of one month"
    end_times = [root.end_time for root in gathered.roots]
    return BatchContent(
        kind="runs",
        partition=f"month={months.pop()}",
        time_range=(min(end_times), max(end_times)),
        tables=dict(gathered.tables),
        references=gathered.references,
        roots=gathered.roots,
        skipped_roots=gathered.skipped_roots,
    )


class _Stopwatch:
    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        self.laps[stage] = self.laps.get(stage, 0.0) + now - self.last
        self.last = now

    def record(self, stage: str, seconds: float) -> None:
        """Count time spent beside the laps (work running alongside them)."""
        self.laps[stage] = self.laps.get(stage, 0.0) + seconds

    def resume(self) -> None:
        """Leave out the time since the last lap (a batch read ahead waiting its turn)."""
        now = time.monotonic()
        self.start += now - self.last
        self.last = now

    def total(self) -> float:
        return time.monotonic() - self.start


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, BatchError) and isinstance(exc.cause, TransientDatabaseError)


def _batch_error(exc: BaseException, url: str) -> BaseException:
    if isinstance(exc, VerificationError):
        return BatchError("verifying the archive", exc)
    if isinstance(exc, DatabaseError):
        return BatchError("deleting archived rows", exc)
    if isinstance(exc, ArchiverError):
        return BatchError("writing the archive", exc)
    if isinstance(exc, SQLAlchemyError | OSError):
        return BatchError("talking to the database", translate_error(exc, url))
    return exc  # KeyboardInterrupt, CancelledError, bugs: propagate unchanged
