"""Batches one at a time: lock and read one, then hand it to the commit protocol.

A run batch (:meth:`Batcher.run_one`) is read in its own transaction::

    BEGIN (SQLite: IMMEDIATE)
      lock expired roots (SKIP LOCKED)                        hook "selected"
      gather their trees, lock them; plan artifact collections
      encode the files (a batch read ahead: meanwhile)         hook "gathered"
      the commit protocol (archiver.engine.commit), with the DELETEs beside the writes

A sweep batch (:meth:`Batcher.run_selected`) locks the ids a sweep proposed and
takes the same path from "selected" on. A batch that failed for a transient reason
(lost connection, deadlock, rows changed under it) was rolled back whole and is
tried again, ``batch_attempts`` times in all. On PostgreSQL the batches after it are
read ahead meanwhile (:mod:`archiver.engine.read_ahead`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from archiver.archive.storage import Storage
from archiver.engine.batch import PlannedBatch, PreparedBatch, Stopwatch, release, run_content
from archiver.engine.commit import (
    DatabaseSide,
    NewBatch,
    StepHook,
    commit_batches,
    commit_or_uncertain,
)
from archiver.engine.options import RunOptions
from archiver.engine.read_ahead import Read, ReadAhead
from archiver.engine.results import BatchReport
from archiver.engine.sweeps import Sweep
from archiver.errors import (
    ArchiverError,
    BatchError,
    DatabaseError,
    TransientDatabaseError,
    VerificationError,
)
from archiver.models import BatchContent, Root
from archiver.source.collections import apply_repoints, plan_collections
from archiver.source.deletion import delete_archived
from archiver.source.engine import translate_error, write_transaction_options
from archiver.source.keyset import Slice, Walker
from archiver.source.retention import Selection
from archiver.source.schema import PrefectSchema
from archiver.source.trees import gather, lock_roots

#: Locks and reads one batch's rows inside the batch transaction; None if none are left.
Select = Callable[[AsyncConnection], Awaitable[BatchContent | None]]
T = TypeVar("T")


class Batcher:
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
        depth = options.read_ahead if engine.dialect.name == "postgresql" else 0
        self.read_ahead = ReadAhead(depth, self._read_ahead)

    async def run_one(
        self, after: Root | None, *, may_follow: int | None = 0
    ) -> tuple[Root, BatchReport | None] | None:
        """Archive the next batch after ``after``; None when nothing is left.

        The second value is None when every root of the slice was held back (a live
        subflow). On PostgreSQL up to ``read_ahead`` of the batches after it (and no
        more than ``may_follow``) are locked, read and encoded meanwhile.
        """
        self.read_ahead.may_follow = may_follow
        outcome: tuple[Root, BatchReport | None] | None = await self._retrying()(
            self._run_next, after
        )
        return outcome

    async def run_selected(self, select: Select) -> BatchReport | None:
        """One batch of whatever ``select`` locks and returns inside the transaction.

        None when it found nothing left to archive. Retried like :meth:`run_one`.
        """
        report: BatchReport | None = await self._retrying()(
            self._attempt, partial(self._selected, select=select)
        )
        return report

    def walker(self, sweep: Sweep) -> Walker:
        return Walker(sweep.walk, sweep.cutoff, self.options.sweep_batch_size)

    async def propose(self, walker: Walker, want: int) -> Slice | None:
        """The next ids of a sweep's walk, read outside any batch transaction."""
        return await self._guarded(self._next_slice(walker, want))

    async def drop_read_ahead(self) -> None:
        """Roll back the batches read ahead that will not be archived. Idempotent."""
        await self.read_ahead.drop()

    def _retrying(self) -> AsyncRetrying:
        backoff = self.options.batch_backoff
        return AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(self.options.batch_attempts),
            wait=wait_exponential(multiplier=backoff.first, max=backoff.longest),
            reraise=True,
        )

    async def _next_slice(self, walker: Walker, want: int) -> Slice | None:
        async with self.engine.connect() as conn:
            return await walker.next_slice(conn, want)

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

    async def _run_next(self, after: Root | None) -> tuple[Root, BatchReport | None] | None:
        reading = await self.read_ahead.take(after)
        if reading is None:
            generation = self.read_ahead.generation
            prepared = await self._guarded(self._read(after, generation, encode=False))
        else:
            prepared = await reading  # raises what reading it raised
        if not isinstance(prepared, PreparedBatch):
            return prepared
        try:
            prepared.clock.resume()  # a batch read ahead waited its turn: not its time
            report = await self._guarded(self._archive(prepared))
        except BaseException:
            await prepared.release()  # first: a batch read ahead may be waiting for one
            await self.read_ahead.drop()  # of this batch's locks
            raise
        await release(prepared.conn, None)
        assert prepared.last is not None  # run batches know their keyset position
        return prepared.last, report

    async def _read_ahead(self, after: Root, generation: int) -> Read:
        return await self._guarded(self._read(after, generation))

    async def _read(self, after: Root | None, generation: int, *, encode: bool = True) -> Read:
        """Open a transaction, lock and read the batch after ``after``, plan its
        artifact collections and (``encode``) encode its files.

        Once it holds every lock it will take, the batch after it may start reading
        (:meth:`ReadAhead.locked`). Nothing is written anywhere here.
        """
        clock = Stopwatch()
        conn = await self.engine.connect()
        transaction = None
        try:
            await write_transaction_options(conn)
            transaction = await conn.begin()
            roots = await lock_roots(
                conn,
                self.selection.upper_cutoff,
                self.options.batch_size,
                after,
                self.selection,
            )
            if not roots:
                await release(conn, transaction)
                return None
            self.hook("selected", "")
            gathered = await gather(
                conn, self.schema, roots, legal_hold_tag=self.options.legal_hold_tag
            )
            self.held_roots.update(gathered.held_roots)
            if not gathered.roots:
                await release(conn, transaction)
                self.read_ahead.locked(roots[-1], generation)
                return roots[-1], None
            content = run_content(gathered)
            await self._follow_collections(conn, content)
            self.read_ahead.locked(roots[-1], generation)
            clock.lap("select")
            prepared = PreparedBatch(conn, transaction, roots[-1], self._plan(content), clock)
            if encode:
                await prepared.encode()
            return prepared
        except BaseException:
            await release(conn, transaction)
            raise

    async def _selected(self, conn: AsyncConnection, select: Select) -> BatchReport | None:
        clock = Stopwatch()
        transaction = await conn.begin()
        content = await select(conn)
        clock.lap("select")
        if content is None or not (content.row_count or content.repoints):
            await transaction.rollback()
            return None
        self.hook("selected", "")
        if not content.row_count:  # only collections to re-point: nothing to archive
            await apply_repoints(conn, content.repoints)
            url = self.options.database.url
            await commit_or_uncertain(transaction, "re-pointing artifact collections", url)
            self.repointed += len(content.repoints)
            return None
        await self._follow_collections(conn, content)
        return await self._archive(
            PreparedBatch(conn, transaction, None, self._plan(content), clock)
        )

    async def _follow_collections(self, conn: AsyncConnection, content: BatchContent) -> None:
        """Collections whose latest artifact leaves: archive them too, or re-point them."""
        artifacts = content.tables.get("artifact")
        if artifacts is None or "artifact_collection" not in self.schema.tables:
            return
        archived, repoints = await plan_collections(conn, self.schema, artifacts)
        if len(archived):
            content.tables["artifact_collection"] = archived
        content.repoints.extend(repoints)

    def _plan(self, content: BatchContent) -> PlannedBatch:
        options = self.options
        return PlannedBatch(
            content, self.schema, self.source_id, options.cutoff, options.compression
        )

    async def _archive(self, prepared: PreparedBatch) -> BatchReport:
        """The commit protocol for one batch whose rows its connection has locked."""
        batch = prepared.batch
        self.hook("gathered", batch.batch_id)
        (manifest,) = await commit_batches(
            self.storage,
            _BatchSide(self, prepared),
            [batch.new_batch()],
            self.hook,
            prepared.clock.lap,
        )
        return batch.report(manifest, prepared.clock)


class _BatchSide(DatabaseSide):
    """A run or sweep batch in the database: its DELETEs run beside the writes."""

    def __init__(self, batcher: Batcher, prepared: PreparedBatch) -> None:
        super().__init__(prepared.conn, prepared.transaction, batcher.options.database.url)
        self.batcher = batcher
        self.prepared = prepared

    async def beside_the_writes(self, batch: NewBatch) -> None:
        """DELETE exactly the archived keys (each count must match), then re-point
        the collections whose latest artifact left; all uncommitted until COMMIT."""
        started = time.monotonic()
        planned = self.prepared.batch
        content = planned.content
        await delete_archived(self.conn, planned.ids_by_table(), cascade=content.kind == "runs")
        await apply_repoints(self.conn, content.repoints)
        self.batcher.hook("deleted", batch.batch_id)
        self.prepared.clock.record("delete", time.monotonic() - started)

    def failed(self, exc: BaseException) -> BaseException:
        return _batch_error(exc, self.url)

    async def commit(self, what: str) -> None:
        await super().commit(what)
        self.batcher.repointed += len(self.prepared.batch.content.repoints)


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
