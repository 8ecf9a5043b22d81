"""The commit protocol, once: how new batches are written, verified, committed and published.

Every writer of batches goes through :func:`commit_batches`: run and sweep batches
(:mod:`archiver.engine.batcher`), compaction (:mod:`archiver.engine.compact`) and
the rewrites of a restore (:mod:`archiver.engine.restore`). What differs between
them is what they do in the database, and that is their :class:`DatabaseSide`; the
order of the steps, abandoning a batch before COMMIT, the uncertain COMMIT and
publishing after it live here only. ``docs/commit-protocol.md`` says why the order
is safe; :mod:`archiver.engine.recovery`, the one reader of pending markers,
finishes or undoes whatever a crash leaves between a marker and its removal.

The steps (:data:`STEPS`), in order; tests hook in after each to inject faults::

    selected    roots (or a sweep's rows) locked; no batch id yet ("")
    gathered    the batch's rows read and locked
    marker      _pending/<batch>.json written: the keys about to be written
    file        one data file written (once per file)
    files       every data file written
    verified    every file read back fresh: checksum, row count, exact primary keys
    deleted     the archived rows deleted, uncommitted (beside the writes)
    recorded    the ledger row inserted (replaced batches forgotten); before COMMIT
    committed   COMMIT returned
    manifest    _manifests/<batch>.json written
    removed     one key of a replaced batch removed (once per key)
    done        the marker removed: the batch is complete
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncTransaction

from archiver.archive import codec
from archiver.archive.catalog import check_written
from archiver.archive.manifest import BatchManifest, FileRecord, PendingMarker
from archiver.archive.storage import PENDING_DIR, Storage, manifest_key, pending_key
from archiver.errors import ArchiverError, ConcurrentChange, DatabaseError, StorageError
from archiver.models import Role
from archiver.source import ledger
from archiver.source.engine import translate_error

T = TypeVar("T")
U = TypeVar("U")

STEPS: tuple[str, ...] = (
    "selected", "gathered", "marker", "file", "files", "verified", "deleted", "recorded",
    "committed", "manifest", "removed", "done",
)  # fmt: skip
#: The steps a run or sweep batch passes (it replaces no batch: nothing is removed).
BATCH_STEPS = tuple(step for step in STEPS if step != "removed")
#: The steps a compaction or a restore's rewrite passes (no rows selected or deleted).
REWRITE_STEPS = tuple(step for step in STEPS if step not in ("selected", "gathered", "deleted"))

#: Called as ``hook(step, batch_id)`` after each step of :data:`STEPS`; tests use it to
#: inject faults. It may be called from a worker thread.
StepHook = Callable[[str, str], None]
#: Told the name of a stage as it ends (``encode``, ``upload``, ...), to time batches.
Lap = Callable[[str], None]


def no_hook(step: str, batch_id: str) -> None:
    """The step hook of every run no test watches."""


def _no_lap(stage: str) -> None:
    return None


def new_batch_id(moment: datetime | None = None) -> str:
    """A new batch (or run) id: the UTC time, sortable, then 48 random bits.

    No two attempts ever share a name, even two attempts at the same runs in one
    second, so an abandoned attempt's clean-up never touches a later one's files.
    """
    return f"{moment or datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}"


class UncertainCommit(DatabaseError):
    """COMMIT failed in a way that leaves open whether it happened; recovery decides."""


@dataclass(frozen=True)
class NewFile:
    """A data file of a new batch, encoded: where it goes, and what reading it back must find."""

    key: str
    table: str
    role: Role
    ids: list[str]
    encoded: codec.EncodedFile


@dataclass
class NewBatch:
    """One batch about to be written: its files, and the committed batches it replaces.

    ``files`` is called in a worker thread and yields each file as it is encoded.
    With ``at_once`` (run and sweep batches: small files) every file is encoded
    first, then all are written and read back in parallel; otherwise (compaction,
    rewrites: files up to the target size) each is encoded, written and let go in
    turn, and they are read back one at a time, so two are never in memory at once.
    """

    batch_id: str
    source_id: str
    keys: list[str]  # every data key it will write, known before the first is
    files: Callable[[], Iterable[NewFile]]
    manifest: Callable[[list[FileRecord]], BatchManifest]
    replaces: list[BatchManifest] = field(default_factory=list)
    at_once: bool = False

    def marker(self) -> PendingMarker:
        old_manifests = [manifest_key(old.batch_id) for old in self.replaces]
        old_files = [record.key for old in self.replaces for record in old.files]
        return PendingMarker(
            batch_id=self.batch_id,
            source_id=self.source_id,
            created_at=datetime.now(UTC),
            keys=self.keys,
            # manifests first: readers of older archiver versions stop seeing them sooner
            replaces=old_manifests + old_files,
        )


class DatabaseSide:
    """What one writer of batches does in the database at the steps of the protocol.

    The defaults suit a writer whose transaction is open from the start and holds
    every lock it needs (a run batch, a restore): the advisory lock before the
    marker, the ledger rows after the files are verified. Subclasses override
    what differs, and say in ``replacing`` what a batch they replace was doing.
    """

    replacing = "rewritten"
    again = "run the same command again"

    def __init__(self, conn: AsyncConnection, transaction: AsyncTransaction | None, url: str):
        self.conn = conn
        self.transaction = transaction
        self.url = url

    async def hold(self, batch: NewBatch) -> None:
        """Before the marker: PostgreSQL's advisory lock on the batch id, so that a
        recovery running meanwhile leaves the batch alone (a no-op on SQLite)."""
        await ledger.hold_batch_lock(self.conn, batch.batch_id)

    async def beside_the_writes(self, batch: NewBatch) -> None:
        """Work that runs while the files are written and read back (run batches: the DELETEs)."""

    async def before_ledger(self, storage: Storage, batch: NewBatch) -> None:
        """Just before the ledger rows; nothing unless a subclass needs a last check."""

    async def record(self, batch: NewBatch, manifest: BatchManifest) -> None:
        """The ledger: each replaced batch leaves it (it must still be there), then the
        new batch enters it. Raises ConcurrentChange if a replaced batch is gone."""
        for old in batch.replaces:
            if not await ledger.forget_batch(self.conn, old.batch_id):
                raise ConcurrentChange(
                    f"batch {old.batch_id} changed while it was being {self.replacing}",
                    hint=self.again,
                )
        await ledger.record_commit(self.conn, batch.batch_id, manifest.to_json())

    def failed(self, exc: BaseException) -> BaseException:
        """The error to raise for ``exc``, a failure before COMMIT (the batch is undone by then)."""
        return exc

    async def rollback(self) -> None:
        if self.transaction is not None:
            with contextlib.suppress(SQLAlchemyError, OSError):
                await self.transaction.rollback()  # a dead connection has rolled back already

    async def commit(self, what: str) -> None:
        """COMMIT; raises UncertainCommit if it failed (it may have happened all the same)."""
        assert self.transaction is not None, "the ledger rows were written in a transaction"
        await commit_or_uncertain(self.transaction, what, self.url)


async def commit_batches(
    storage: Storage,
    side: DatabaseSide,
    batches: Sequence[NewBatch],
    hook: StepHook = no_hook,
    lap: Lap = _no_lap,
) -> list[BatchManifest]:
    """Write, verify, record, commit and publish ``batches`` in ``side``'s one transaction.

    Raises ``side.failed(exc)`` for a failure before COMMIT, once every new file and
    marker is removed (or, if that fails too, left to recovery) and the transaction
    rolled back; UncertainCommit if COMMIT failed (recovery asks the ledger);
    StorageError if publishing after COMMIT failed (committed: recovery finishes it).
    """
    manifests: list[BatchManifest] = []
    begun: list[NewBatch] = []
    try:
        for batch in batches:
            await side.hold(batch)  # PostgreSQL: from before the marker to COMMIT
            begun.append(batch)
            records, _ = await both(  # COMMIT only once the files are verified *and*
                write_and_verify(storage, batch, hook, lap),  # every DELETE count matched
                side.beside_the_writes(batch),
            )
            lap("wait")  # for the slower of the two, already counted in its stages
            await side.before_ledger(storage, batch)
            manifests.append(batch.manifest(records))
            await side.record(batch, manifests[-1])  # the ledger row commits with the rows
            lap("delete")
            hook("recorded", batch.batch_id)
    except BaseException as exc:
        await abandon(storage, begun, side)
        error = side.failed(exc)
        if error is exc:
            raise
        raise error from exc
    await side.commit(", ".join(f"batch {b.batch_id}" for b in batches) or "the transaction")
    lap("commit")
    for batch, manifest in zip(batches, manifests, strict=True):
        hook("committed", batch.batch_id)
        await asyncio.to_thread(publish, storage, batch, manifest, hook)
        hook("done", batch.batch_id)
    lap("manifest")
    return manifests


async def write_and_verify(
    storage: Storage, batch: NewBatch, hook: StepHook = no_hook, lap: Lap = _no_lap
) -> list[FileRecord]:
    """The marker, then every file, then each read back fresh and proven whole.

    With ``batch.at_once`` the files are written and read back in parallel threads
    and the hooks run in the event loop; otherwise all of it runs in one worker
    thread, hooks included (:func:`write_one_by_one`).
    """
    if not batch.at_once:
        return await asyncio.to_thread(write_one_by_one, storage, batch, hook)
    files = await asyncio.to_thread(lambda: list(batch.files()))
    lap("encode")
    await asyncio.to_thread(_put_marker, storage, batch)
    hook("marker", batch.batch_id)
    puts = [(_put, (storage, file)) for file in files]
    written = await in_threads(puts, lambda _: hook("file", batch.batch_id))
    files.clear()  # the bytes are in storage now
    hook("files", batch.batch_id)
    lap("upload")
    records = await in_threads([(check_written, (storage, *file)) for file in written])
    hook("verified", batch.batch_id)
    lap("verify")
    return records


def write_one_by_one(storage: Storage, batch: NewBatch, hook: StepHook) -> list[FileRecord]:
    """The marker, then each file encoded and written in turn, then each read back. Blocking.

    Never more than one new file in memory: for files as large as a compaction's.
    """
    _put_marker(storage, batch)
    hook("marker", batch.batch_id)
    written = []
    for file in batch.files():
        written.append(_put(storage, file))
        hook("file", batch.batch_id)
    hook("files", batch.batch_id)
    records = [check_written(storage, *file) for file in written]
    hook("verified", batch.batch_id)
    return records


#: What reading a file back needs: key, table, role, ids, sha256 (not the bytes).
_Written = tuple[str, str, Role, list[str], str]


def _put_marker(storage: Storage, batch: NewBatch) -> None:
    storage.put(pending_key(batch.batch_id), batch.marker().to_json().encode())


def _put(storage: Storage, file: NewFile) -> _Written:
    storage.put(file.key, file.encoded.data)
    return file.key, file.table, file.role, file.ids, file.encoded.sha256


async def abandon(storage: Storage, batches: Sequence[NewBatch], side: DatabaseSide) -> None:
    """Before COMMIT: remove each batch's new files, then its marker; then roll back.

    Files go first, while the transaction still holds its locks: after the rollback
    another archiver may take the same rows at once. If removing fails, the marker
    stays and recovery removes the files.
    """
    for batch in batches:
        await asyncio.to_thread(_remove_new_files, storage, batch)
    await side.rollback()


def _remove_new_files(storage: Storage, batch: NewBatch) -> None:
    with contextlib.suppress(ArchiverError):
        for key in batch.keys:
            storage.delete(key)
        storage.delete(pending_key(batch.batch_id))


async def commit_or_uncertain(transaction: AsyncTransaction, what: str, url: str) -> None:
    """COMMIT ``transaction``; a failure here may or may not have committed.

    Raises UncertainCommit, and then nothing is undone: the files and the marker
    stay until recovery asks the ledger what happened.
    """
    try:
        await transaction.commit()
    except (SQLAlchemyError, OSError) as exc:
        raise UncertainCommit(
            f"COMMIT of {what} failed and may or may not have happened "
            f"({translate_error(exc, url).message}); its files stay until recovery asks "
            "the ledger",
            hint="run `archiver recover`, or the same command again",
        ) from None


def publish(storage: Storage, batch: NewBatch, manifest: BatchManifest, hook: StepHook) -> None:
    """After COMMIT: the manifest, then the replaced batches' keys, then the marker. Blocking.

    Raises StorageError if any of it fails: the batch is committed, the ledger holds
    its manifest, and recovery finishes the same steps.
    """
    doing = "writing its manifest"
    try:
        if manifest.files:  # a rewrite that restored every run of its batch leaves none
            storage.put(manifest_key(batch.batch_id), manifest.to_json().encode())
        hook("manifest", batch.batch_id)
        doing = "removing the batches it replaces"
        for key in batch.marker().replaces:
            storage.delete(key)
            hook("removed", batch.batch_id)
        doing = "removing its pending marker"
        storage.delete(pending_key(batch.batch_id))
    except StorageError as exc:
        raise StorageError(
            f"batch {batch.batch_id} is archived and committed, but {doing} failed "
            f"({exc.message.rstrip('.')}); the ledger holds it and recovery finishes it",
            hint="run `archiver recover` once storage is reachable",
        ) from None


def still_there(storage: Storage, batch: NewBatch, doing: str) -> None:
    """Raise ConcurrentChange if the batch's marker or a file of it is gone. Blocking.

    For a writer that did not hold the database's write lock while it wrote (SQLite
    compaction): a recovery that ran meanwhile saw a marker with no ledger row and no
    lock, and removed what it lists.
    """
    folders = {key.rsplit("/", 1)[0] for key in batch.keys}
    present = {key for folder in folders for key in storage.list(folder)}
    present |= set(storage.list(PENDING_DIR))
    expected = [*batch.keys, pending_key(batch.batch_id)]
    missing = [key for key in expected if key not in present]
    if missing:
        raise ConcurrentChange(
            f"{storage.describe(missing[0])} was removed while {doing} (a recovery by "
            "another archiver); the batches it replaces are untouched",
            hint="run the same command again",
        )


async def both(first: Awaitable[T], second: Awaitable[U]) -> tuple[T, U]:
    """Run both at once; once both have ended, raise the first one's failure, if any.

    Neither is cancelled when the other fails: the caller cleans up only after
    every write and statement in flight has finished.
    """
    one, two = await asyncio.gather(first, second, return_exceptions=True)
    for outcome in (one, two):
        if isinstance(outcome, BaseException):
            raise outcome
    return one, two  # type: ignore[return-value]


async def in_threads(
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
