"""One batch end to end, and the loop of batches.

A batch is one database transaction around storage work (the commit protocol,
``docs/commit-protocol.md``)::

    BEGIN (SQLite: IMMEDIATE)
      lock expired roots (SKIP LOCKED), gather their trees, lock them
      advisory lock on the batch id (PostgreSQL)
      PUT _pending/<batch>.json           intent: the keys about to be written
      PUT <table>/month=.../<batch>.parquet   for every table with rows
      GET every file back, fresh: checksum, row count, exact primary keys
      DELETE exactly those keys; each count must match (source/deletion.py)
      INSERT the manifest into the ledger
    COMMIT
    PUT _manifests/<batch>.json; DELETE _pending/<batch>.json

Any failure before COMMIT rolls back and removes what the batch wrote, so the
database is unchanged. A failure *during* COMMIT leaves the files and marker
for recovery, which asks the ledger what happened.

On PostgreSQL two batches are in flight: :meth:`_Batcher._prepare` (BEGIN to
encode) of batch N+1 runs on its own connection while :meth:`_Batcher._finish`
(marker to manifest) of batch N runs; N+1 writes nothing until N is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from archiver import codec
from archiver.errors import (
    ArchiverError,
    BatchError,
    DatabaseError,
    StorageError,
    TransientDatabaseError,
    VerificationError,
)
from archiver.manifest import BatchManifest, FileRecord, PendingMarker
from archiver.models import Root, TableRows
from archiver.recovery import ensure_source, recover
from archiver.source import ledger
from archiver.source.deletion import delete_archived
from archiver.source.engine import (
    DatabaseOptions,
    create_engine,
    translate_error,
    write_transaction_options,
)
from archiver.source.schema import PrefectSchema, inspect_schema
from archiver.source.selection import Gathered, count_expired, gather, lock_roots
from archiver.storage import Storage, data_key, manifest_key, pending_key
from archiver.verify import check_written
from archiver.version import __version__

#: Called as ``hook(step, batch_id)`` after each step; tests use it to inject faults.
StepHook = Callable[[str, str], None]
T = TypeVar("T")
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
    now: datetime | None = None  # the clock, for tests; default: the current UTC time
    overlap: bool = True  # PostgreSQL: read the next batch while this one writes and deletes

    @property
    def cutoff(self) -> datetime:
        return (self.now or datetime.now(UTC)) - self.retention_period


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


async def run(options: RunOptions, hook: StepHook | None = None) -> RunReport:
    """Archive expired run trees batch by batch until none remain.

    With ``options.dry_run`` it only counts what it would archive. Raises
    ArchiverError subclasses; a failed batch is rolled back before raising.
    """
    started = time.monotonic()
    options = replace(options, now=options.now or datetime.now(UTC))  # one cutoff per run
    storage = Storage(options.storage_url, options.storage_options)
    await asyncio.to_thread(storage.check_reachable)
    engine = create_engine(options.database)
    try:
        report = await _run(engine, storage, options, hook or _no_hook)
    finally:
        await engine.dispose()
    report.seconds = time.monotonic() - started
    return report


def _no_hook(step: str, batch_id: str) -> None:
    return None


async def _run(
    engine: AsyncEngine, storage: Storage, options: RunOptions, hook: StepHook
) -> RunReport:
    url = options.database.url
    cutoff = options.cutoff
    try:
        async with engine.connect() as conn:
            schema = await inspect_schema(conn)
            expired, oldest, newest = await count_expired(conn, cutoff)
    except (SQLAlchemyError, OSError) as exc:
        raise translate_error(exc, url) from None
    report = RunReport(
        options.dry_run, cutoff, expired, oldest, newest, warnings=list(schema.warnings)
    )
    if options.retention_period < timedelta(days=1):
        report.warnings.append(
            "retention_period is under a day: Prefect's cancellation clean-up may still be "
            "writing to cancelled runs archiver takes (a day or more is safe)"
        )
    if options.dry_run:
        return report
    source_id = await ensure_source(engine)
    report.recovered = await recover(engine, storage, source_id)
    batcher = _Batcher(engine, storage, schema, options, hook, source_id)
    try:
        await _loop(batcher, options, report)
    except ArchiverError as exc:
        exc.partial_report = report
        raise
    finally:
        await batcher.close()
    return report


async def _loop(batcher: _Batcher, options: RunOptions, report: RunReport) -> None:
    after: Root | None = None
    while options.max_batches is None or len(report.batches) < options.max_batches:
        outcome = await batcher.run_one(after)
        if outcome is None:
            return
        after, batch = outcome
        if batch is None:
            continue  # every root of this slice had a live subflow; move on
        report.batches.append(batch)
        report.skipped_roots.extend(batch.skipped_roots)
        if options.batch_interval:
            await asyncio.sleep(options.batch_interval)


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
    ) -> None:
        self.engine = engine
        self.storage = storage
        self.schema = schema
        self.options = options
        self.hook = hook
        self.source_id = source_id
        # PostgreSQL only: SQLite has one writer, so a second batch's BEGIN IMMEDIATE would wait.
        self.overlap = options.overlap and engine.dialect.name == "postgresql"
        self._next: tuple[Root | None, asyncio.Task[_Prepared | _Outcome]] | None = None

    async def run_one(self, after: Root | None) -> tuple[Root, BatchReport | None] | None:
        """Archive the next batch after ``after``; None when nothing is left.

        A batch that failed for a transient reason (lost connection, rows changed
        under it) was rolled back whole, so it is simply tried again, a few times.
        """
        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(self.options.batch_attempts),
            wait=wait_exponential(multiplier=0.5, max=10),
            reraise=True,
        )
        return await retrying(self._attempt, after)

    async def _attempt(self, after: Root | None) -> tuple[Root, BatchReport | None] | None:
        try:
            prepared = await self._prefetched(after)
            if prepared is False:
                prepared = await self._prepare(after)
            if isinstance(prepared, _Prepared):
                if self.overlap:
                    self._next = (prepared.last, asyncio.create_task(self._prepare(prepared.last)))
                return await self._finish(prepared)
            return prepared
        except ArchiverError:
            raise
        except (SQLAlchemyError, OSError) as exc:
            raise BatchError(
                "talking to the database", translate_error(exc, self.options.database.url)
            ) from None

    async def close(self) -> None:
        """Roll back a batch read ahead that will not be finished. Idempotent."""
        if self._next is not None:
            task = self._next[1]
            self._next = None
            with contextlib.suppress(Exception):
                prepared = await task
                if isinstance(prepared, _Prepared):
                    await prepared.release()

    async def _prefetched(self, after: Root | None) -> _Prepared | _Outcome | Literal[False]:
        """The batch read ahead for ``after``, if any (False if none). Raises what it raised."""
        if self._next is None:
            return False
        if self._next[0] != after:  # a retried batch moved the keyset: start afresh
            await self.close()
            return False
        task = self._next[1]
        self._next = None
        return await task

    async def _prepare(self, after: Root | None) -> _Prepared | _Outcome:
        """Open a transaction, lock and read the batch after ``after`` and encode it.

        On PostgreSQL this runs for the next batch while the current one uploads,
        verifies and deletes on its own connection (its roots come after the
        current batch's last root, so the two never share a row). Nothing is
        written to storage here, so a crash leaves nothing to recover.
        """
        clock = _Stopwatch()
        conn = await self.engine.connect()
        transaction = None
        try:
            await write_transaction_options(conn)
            transaction = await conn.begin()
            roots = await lock_roots(conn, self.options.cutoff, self.options.batch_size, after)
            if not roots:
                await _release(conn, transaction)
                return None
            gathered = await gather(conn, self.schema, roots)
            clock.lap("select")
            if not gathered.roots:
                await _release(conn, transaction)
                return roots[-1], None
            batch = _PlannedBatch(gathered, self.schema, self.options, self.source_id)
            await ledger.hold_batch_lock(conn, batch.batch_id)
        except BaseException:
            await _release(conn, transaction)
            raise
        prepared = _Prepared(conn, transaction, roots[-1], batch, clock)
        try:
            self.hook("gathered", batch.batch_id)
            prepared.encoded = await asyncio.to_thread(batch.encode)
            clock.lap("encode")
        except BaseException as exc:
            await prepared.release()
            raise _batch_error(exc, self.options.database.url) from exc
        return prepared

    async def _finish(self, prepared: _Prepared) -> tuple[Root, BatchReport | None]:
        """Write, verify, delete and commit a prepared batch, then release its connection."""
        try:
            return await self._in_transaction(prepared)
        finally:
            await _release(prepared.conn, None)

    async def _in_transaction(self, prepared: _Prepared) -> tuple[Root, BatchReport | None]:
        conn, transaction, batch, clock = (
            prepared.conn, prepared.transaction, prepared.batch, prepared.clock
        )  # fmt: skip
        clock.resume()  # time spent waiting for the previous batch is not this batch's
        try:
            records = await self._write_and_verify(batch, prepared.encoded, clock)
            await delete_archived(conn, batch.ids_by_table())
            self.hook("deleted", batch.batch_id)
            manifest = batch.manifest(records)
            await ledger.record_commit(conn, batch.batch_id, manifest.to_json())
            clock.lap("delete")
        except BaseException as exc:
            await self._abandon(transaction, batch)
            raise _batch_error(exc, self.options.database.url) from exc
        await self._commit(transaction, batch)
        clock.lap("commit")
        await self._publish(manifest)
        clock.lap("manifest")
        self.hook("done", batch.batch_id)
        return prepared.last, batch.report(manifest, clock)

    async def _write_and_verify(
        self, batch: _PlannedBatch, encoded: _Encoded, clock: _Stopwatch
    ) -> list[FileRecord]:
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
        checks = [
            (check_written, (self.storage, key, rows.shape.name, role, rows.ids, file.sha256))
            for key, (rows, role, file) in encoded.items()
        ]
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

    async def _commit(self, transaction: Any, batch: _PlannedBatch) -> None:
        try:
            await transaction.commit()
        except (SQLAlchemyError, OSError) as exc:
            raise DatabaseError(
                f"COMMIT of batch {batch.batch_id} failed and may or may not have happened "
                f"({translate_error(exc, self.options.database.url).message}); its files stay "
                "until recovery asks the ledger",
                hint="run `archiver recover` or `archiver run` again",
            ) from None
        self.hook("committed", batch.batch_id)

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


_Outcome = tuple[Root, "BatchReport | None"] | None
_Encoded = dict[str, tuple[TableRows, Role, codec.EncodedFile]]


@dataclass
class _Prepared:
    """A batch read and encoded inside its open transaction, not yet written anywhere."""

    conn: AsyncConnection
    transaction: Any
    last: Root
    batch: _PlannedBatch
    clock: _Stopwatch
    encoded: _Encoded = field(default_factory=dict)

    async def release(self) -> None:
        await _release(self.conn, self.transaction)


async def _release(conn: AsyncConnection, transaction: Any) -> None:
    """Roll back (if a transaction is given and still open) and close; never raises."""
    with contextlib.suppress(SQLAlchemyError, OSError):
        if transaction is not None and transaction.is_active:
            await transaction.rollback()
    with contextlib.suppress(SQLAlchemyError, OSError):
        await conn.close()


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


class _PlannedBatch:
    """The rows of one batch and the names they will be written under."""

    def __init__(
        self, gathered: Gathered, schema: PrefectSchema, options: RunOptions, source_id: str
    ) -> None:
        self.gathered = gathered
        self.schema = schema
        self.options = options
        self.source_id = source_id
        self.created_at = datetime.now(UTC)
        # Sortable by time, and unique: two attempts at the same runs never share a name.
        self.batch_id = f"{self.created_at:%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}"
        months = {f"{root.end_time.astimezone(UTC):%Y-%m}" for root in gathered.roots}
        assert len(months) == 1, "lock_roots returns roots of one month"
        self.partition = f"month={months.pop()}"
        tables: list[tuple[TableRows, Role]] = [
            *((rows, "archived") for rows in gathered.tables.values()),
            *((rows, "reference") for rows in gathered.references.values()),
        ]
        self.files = {
            data_key(rows.shape.name, self.partition, self.batch_id): (rows, role)
            for rows, role in tables
            if len(rows)
        }

    def data_keys(self) -> list[str]:
        return list(self.files)

    def ids_by_table(self) -> dict[str, list[str]]:
        return {table: rows.ids for table, rows in self.gathered.tables.items()}

    def encode(self) -> _Encoded:
        encoded = {}
        for key, (rows, role) in self.files.items():
            metadata = {
                "archiver.table": rows.shape.name,
                "archiver.role": role,
                "archiver.batch_id": self.batch_id,
                "archiver.partition": self.partition,
                "archiver.source_dialect": self.schema.dialect,
                "archiver.source_revision": self.schema.revision,
                "archiver.version": __version__,
                "archiver.source_id": self.source_id,
            }
            encoded[key] = (rows, role, codec.encode(rows, metadata, self.options.compression))
            rows.keep_only_ids()  # bounds memory: two batches are in flight on PostgreSQL
        return encoded

    def manifest(self, records: list[FileRecord]) -> BatchManifest:
        end_times = [root.end_time for root in self.gathered.roots]
        return BatchManifest(
            batch_id=self.batch_id,
            source_id=self.source_id,
            created_at=self.created_at,
            cutoff=self.options.cutoff,
            partition=self.partition,
            source_dialect=self.schema.dialect,
            source_revision=self.schema.revision,
            archiver_version=__version__,
            root_ids=sorted(root.id for root in self.gathered.roots),
            end_time_min=min(end_times),
            end_time_max=max(end_times),
            files=records,
        )

    def report(self, manifest: BatchManifest, clock: _Stopwatch) -> BatchReport:
        return BatchReport(
            batch_id=self.batch_id,
            partition=self.partition,
            roots=len(self.gathered.roots),
            skipped_roots=self.gathered.skipped_roots,
            rows={table: len(rows) for table, rows in self.gathered.tables.items()},
            bytes=sum(f.bytes for f in manifest.files),
            seconds=clock.total(),
            stages=clock.laps,
        )


class _Stopwatch:
    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.laps: dict[str, float] = {}
        self.waited = 0.0

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        self.laps[stage] = self.laps.get(stage, 0.0) + now - self.last
        self.last = now

    def resume(self) -> None:
        """Leave out the time since the last lap (a read-ahead batch waiting its turn)."""
        now = time.monotonic()
        self.waited += now - self.last
        self.last = now

    def total(self) -> float:
        return time.monotonic() - self.start - self.waited


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
