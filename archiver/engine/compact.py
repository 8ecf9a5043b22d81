"""Merging many small batches into a few large ones (``archiver compact``).

Small batches make small files: many S3 requests and slow readers. Compaction
packs the small committed batches of one partition (same database, month, kind
and Prefect schema revision) into groups whose largest table stays under a target
size, and rewrites each group as one new batch: one file per table.

Each group is a rewrite under the commit protocol (``docs/commit-protocol.md``),
the same machinery as a restore's rewrite, so recovery needs nothing new:

1. ``_pending/<new>.json``: the new keys, and (``replaces``) the old manifests
   and files.
2. The new files, streamed from the old ones (each old file's SHA-256 checked
   against its manifest first), each read back fresh: checksum, row count,
   exactly the union of the old primary keys.
3. One short transaction: the old batches leave the ledger, the new one enters
   it. The ledger stays the single source of truth, so a restore, recovery and
   the oracle of the tests read a compacted archive like any other.
4. After COMMIT: the new manifest (it lists the merged batches in
   ``compacted_from``), then the old manifests, the old files, the marker.

A crash before COMMIT leaves the old batches committed; recovery removes the
new files. A crash after it leaves the new batch committed; recovery writes its
manifest and removes the old batches. Readers that go through the manifests
(``verify``, ``show``, ``ls``, ``restore``, :func:`archiver.open_archive`) skip
manifests that a newer one supersedes, so they never see a row twice. Readers
that glob the folders (DuckDB ``<table>/*/*.parquet``) see the merged rows twice
from the moment the new files are written until the old ones are removed: a
few seconds per group, or until the next recovery if archiver dies in between.

On PostgreSQL the group holds an advisory lock on its new batch id from the
marker on, so a concurrent recovery leaves it alone. On SQLite it takes the
write lock only for the short commit (holding it while copying files would
stall Prefect's API), and checks under that lock that its marker and files are
still there: a recovery that ran meanwhile and removed them makes the group
fail cleanly (:class:`ConcurrentChange`), with the old batches untouched.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from archiver.archive import codec
from archiver.archive.catalog import list_batches
from archiver.archive.manifest import BatchManifest, FileRecord
from archiver.archive.storage import STORAGE_RETRY, Storage, data_key
from archiver.engine.commit import (
    REWRITE_STEPS,
    DatabaseSide,
    NewBatch,
    StepHook,
    commit_batches,
    new_batch_id,
    no_hook,
    still_there,
)
from archiver.engine.merge import merge_files
from archiver.engine.recovery import ensure_source, recover
from archiver.errors import ArchiverError, ConfigError
from archiver.models import RetryPolicy, Role
from archiver.source.engine import (
    DatabaseOptions,
    create_engine,
    translate_error,
    write_transaction_options,
)
from archiver.version import __version__

#: The steps of the commit protocol a compaction passes, in order (for tests).
STEPS = REWRITE_STEPS
DEFAULT_TARGET_SIZE = 128 * 2**20
#: a batch whose largest file is at least this share of the target is left as it is
FULL_ENOUGH = 0.75
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KIB|MIB|GIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}


@dataclass(frozen=True)
class CompactOptions:
    """Everything one compaction needs, as plain values (the CLI builds it)."""

    database: DatabaseOptions
    storage_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    target_size: int = DEFAULT_TARGET_SIZE
    compression: str = codec.DEFAULT_COMPRESSION
    dry_run: bool = False
    storage_retry: RetryPolicy = STORAGE_RETRY


@dataclass
class Group:
    """Batches of one partition that become one compacted batch."""

    partition: str
    batches: list[BatchManifest]
    batch_id: str = ""
    bytes_after: int = 0

    @property
    def files_before(self) -> int:
        return sum(len(batch.files) for batch in self.batches)

    @property
    def bytes_before(self) -> int:
        return sum(record.bytes for batch in self.batches for record in batch.files)

    @property
    def rows(self) -> int:
        return sum(r.rows for b in self.batches for r in b.files if r.role == "archived")

    def tables(self) -> dict[tuple[str, Role], list[FileRecord]]:
        """(table, role) -> the old files, oldest batch first."""
        by_table: dict[tuple[str, Role], list[FileRecord]] = {}
        for batch in self.batches:
            for record in batch.files:
                by_table.setdefault((record.table, record.role), []).append(record)
        return by_table


@dataclass
class CompactReport:
    dry_run: bool
    target_size: int
    groups: list[Group] = field(default_factory=list)
    #: batches written by another database sharing this archive root: left alone
    foreign_batches: int = 0
    recovered: list[str] = field(default_factory=list)
    seconds: float = 0.0


def parse_size(text: str) -> int:
    """``"128MB"``, ``"64 KiB"``, ``"1GB"`` or a number of bytes; units are powers of 1024."""
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(
            f"cannot read the size {text!r}", hint="write a size such as 128MB, 1GB or 500000"
        )
    unit = (match.group(2) or "B").upper().replace("I", "")
    return int(float(match.group(1)) * _UNITS[unit])


def plan(manifests: list[BatchManifest], source_id: str, target_size: int) -> list[Group]:
    """Groups of this database's small batches, packed in batch order up to the target.

    A batch is small if its largest file is under 75% of the target. A group
    closes before a batch would push any table's total past the target; a group
    of one batch is left as it is.
    """
    by_partition: dict[tuple[str, str, str, str], list[BatchManifest]] = {}
    for manifest in sorted(manifests, key=lambda m: m.batch_id):
        largest = max((record.bytes for record in manifest.files), default=0)
        if manifest.source_id == source_id and largest < FULL_ENOUGH * target_size:
            key = (
                manifest.partition,
                manifest.kind,  # run trees and sweep batches (orphans, events) stay apart
                manifest.source_dialect,
                manifest.source_revision,
            )
            by_partition.setdefault(key, []).append(manifest)
    groups = []
    for (partition, *_), batches in sorted(by_partition.items()):
        for packed in _pack(batches, target_size):
            if len(packed) > 1:
                groups.append(Group(partition, packed))
    return groups


def _pack(batches: list[BatchManifest], target_size: int) -> Iterator[list[BatchManifest]]:
    current: list[BatchManifest] = []
    sizes: dict[str, int] = {}
    for batch in batches:
        grown = dict(sizes)
        for record in batch.files:
            grown[record.table] = grown.get(record.table, 0) + record.bytes
        if current and max(grown.values(), default=0) > target_size:
            yield current
            current, grown = [], {r.table: r.bytes for r in batch.files}
        current.append(batch)
        sizes = grown
    if current:
        yield current


async def compact(options: CompactOptions, hook: StepHook | None = None) -> CompactReport:
    """Recover open batches, then merge this database's small batches group by group.

    With ``dry_run`` it only plans. Raises ArchiverError; a group that fails is
    undone (its new files removed, the old batches untouched), and groups
    finished before it stay compacted (``partial_report``).
    """
    started = time.monotonic()
    if options.target_size < 1:
        raise ConfigError("target_size must be positive", hint="pass --target-size 128MB")
    storage = Storage(options.storage_url, options.storage_options, options.storage_retry)
    await asyncio.to_thread(storage.check_reachable)
    engine = create_engine(options.database)
    report = CompactReport(options.dry_run, options.target_size)
    try:
        source_id = await ensure_source(engine)
        if not options.dry_run:
            report.recovered = await recover(engine, storage, source_id)
        manifests = await asyncio.to_thread(list_batches, storage)
        report.foreign_batches = sum(1 for m in manifests if m.source_id != source_id)
        report.groups = plan(manifests, source_id, options.target_size)
        if options.dry_run:
            return report
        compactor = _Compactor(engine, storage, options, hook or no_hook, source_id)
        for group in report.groups:
            await compactor.run(group)
    except ArchiverError as exc:
        report.groups = [group for group in report.groups if group.bytes_after]
        exc.partial_report = report
        raise
    finally:
        await engine.dispose()
        report.seconds = time.monotonic() - started
    return report


class _Compactor:
    def __init__(
        self,
        engine: AsyncEngine,
        storage: Storage,
        options: CompactOptions,
        hook: StepHook,
        source_id: str,
    ) -> None:
        self.engine = engine
        self.storage = storage
        self.options = options
        self.hook = hook
        self.source_id = source_id

    async def run(self, group: Group) -> None:
        """Write, verify and swap in one group's batch; then remove the old batches.

        A failure before COMMIT undoes the group (its new files removed, the old
        batches untouched) and says so; after it, recovery finishes the clean-up.
        """
        batch = self._new_batch(group)
        try:
            async with self.engine.connect() as conn:
                side = _CompactionSide(conn, self.options.database.url, group)
                (manifest,) = await commit_batches(self.storage, side, [batch], self.hook)
        except (SQLAlchemyError, OSError) as exc:  # connecting, before anything was written
            raise _undone(group, translate_error(exc, self.options.database.url)) from None
        group.bytes_after = sum(record.bytes for record in manifest.files)

    def _new_batch(self, group: Group) -> NewBatch:
        group.batch_id = new_batch_id()
        tables = group.tables()
        compression = self.options.compression
        return NewBatch(
            batch_id=group.batch_id,
            source_id=self.source_id,
            keys=[data_key(table, group.partition, group.batch_id) for table, _ in tables],
            files=lambda: (
                merge_files(
                    self.storage,
                    inputs,
                    key=data_key(table, group.partition, group.batch_id),
                    role=role,
                    batch_id=group.batch_id,
                    source_id=self.source_id,
                    merged=[batch.batch_id for batch in group.batches],
                    compression=compression,
                )
                for (table, role), inputs in tables.items()
            ),
            manifest=lambda records: _manifest(group, self.source_id, records),
            replaces=group.batches,
        )


class _CompactionSide(DatabaseSide):
    """On PostgreSQL the advisory lock from before the marker on; on SQLite the write
    lock only for the swap (held while copying files it would stall Prefect), after
    checking under it that a recovery did not remove the marker or files meanwhile."""

    replacing = "compacted"
    again = "run `archiver compact` again"

    def __init__(self, conn: AsyncConnection, url: str, group: Group) -> None:
        super().__init__(conn, None, url)
        self.group = group

    async def hold(self, batch: NewBatch) -> None:
        if self.conn.dialect.name == "postgresql":  # recovery leaves a locked batch alone
            self.transaction = await self.conn.begin()
            await super().hold(batch)

    async def before_ledger(self, storage: Storage, batch: NewBatch) -> None:
        if self.transaction is None:  # SQLite: the write lock only from here to COMMIT
            await write_transaction_options(self.conn)
            self.transaction = await self.conn.begin()
        await asyncio.to_thread(still_there, storage, batch, "compacting")

    def failed(self, exc: BaseException) -> BaseException:
        if isinstance(exc, SQLAlchemyError | OSError):
            exc = translate_error(exc, self.url)
        return _undone(self.group, exc) if isinstance(exc, ArchiverError) else exc


def _undone(group: Group, exc: ArchiverError) -> ArchiverError:
    exc.message = (
        f"compacting {len(group.batches)} batches of {group.partition} failed: "
        f"{exc.message.rstrip('.')}; it was undone and nothing was deleted"
    )
    return exc


def _manifest(group: Group, source_id: str, records: list[FileRecord]) -> BatchManifest:
    first, batches = group.batches[0], group.batches
    merged: dict[str, list[str]] = {}
    for batch in batches:
        merged |= batch.compacted_from | {batch.batch_id: batch.root_ids}
    return BatchManifest(
        batch_id=group.batch_id,
        source_id=source_id,
        created_at=datetime.now(UTC),
        cutoff=max(batch.cutoff for batch in batches),
        partition=group.partition,
        source_dialect=first.source_dialect,
        source_revision=first.source_revision,
        archiver_version=__version__,
        root_ids=sorted({root for batch in batches for root in batch.root_ids}),
        end_time_min=min(batch.end_time_min for batch in batches),
        end_time_max=max(batch.end_time_max for batch in batches),
        files=records,
        compacted_from=merged,
        root_rules={root: rule for batch in batches for root, rule in batch.root_rules.items()},
        kind=first.kind,
    )
