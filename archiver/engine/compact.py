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
import contextlib
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from archiver.archive import codec
from archiver.archive.manifest import BatchManifest, FileRecord, PendingMarker
from archiver.archive.storage import PENDING_DIR, Storage, data_key, manifest_key, pending_key
from archiver.archive.verify import check_written, list_batches
from archiver.engine.recovery import ensure_source, recover
from archiver.errors import (
    ArchiverError,
    ConcurrentChange,
    ConfigError,
    DatabaseError,
    VerificationError,
)
from archiver.source import ledger
from archiver.source.engine import (
    DatabaseOptions,
    create_engine,
    translate_error,
    write_transaction_options,
)
from archiver.version import __version__

#: Called as ``hook(step, batch_id)`` after each step; tests use it to inject faults.
StepHook = Callable[[str, str], None]
STEPS = ("marker", "file", "verified", "committed", "manifest", "removed", "done")
DEFAULT_TARGET_SIZE = 128 * 2**20
#: a batch whose largest file is at least this share of the target is left as it is
FULL_ENOUGH = 0.75
#: rows are buffered up to about this many Arrow bytes per row group
_ROW_GROUP_BYTES = 64 * 2**20
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KIB|MIB|GIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}


@dataclass(frozen=True)
class CompactOptions:
    """Everything one compaction needs, as plain values (the CLI builds it)."""

    database: DatabaseOptions
    storage_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    target_size: int = DEFAULT_TARGET_SIZE
    compression: str = "zstd"
    dry_run: bool = False


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

    def tables(self) -> dict[tuple[str, Literal["archived", "reference"]], list[FileRecord]]:
        """(table, role) -> the old files, oldest batch first."""
        by_table: dict[tuple[str, Literal["archived", "reference"]], list[FileRecord]] = {}
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
    storage = Storage(options.storage_url, options.storage_options)
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
        compactor = _Compactor(engine, storage, options, hook or _no_hook, source_id)
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


def _no_hook(step: str, batch_id: str) -> None:
    return None


class _UncertainCommit(DatabaseError):
    """The COMMIT failed in a way that leaves open whether it happened."""


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
        """Write, verify and swap in one group's batch; then remove the old batches."""
        group.batch_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}"
        marker = _marker(group, self.source_id)
        try:
            try:
                async with self.engine.connect() as conn:
                    manifest = await self._write_and_swap(conn, group, marker)
            except (SQLAlchemyError, OSError) as exc:
                raise translate_error(exc, self.options.database.url) from None
        except _UncertainCommit:
            raise  # recovery decides from the ledger
        except ArchiverError as exc:
            exc.message = _undone(group, exc)
            raise
        self.hook("committed", group.batch_id)
        try:
            await asyncio.to_thread(self._finish, manifest, marker)
        except ArchiverError as exc:
            raise type(exc)(
                f"compacted batch {group.batch_id} is committed, but removing the batches it "
                f"replaces failed ({exc.message.rstrip('.')}); they stay until recovery",
                hint="run `archiver compact` or `archiver recover` again",
            ) from None
        group.bytes_after = sum(record.bytes for record in manifest.files)
        self.hook("done", group.batch_id)

    async def _write_and_swap(
        self, conn: AsyncConnection, group: Group, marker: PendingMarker
    ) -> BatchManifest:
        postgres = conn.dialect.name == "postgresql"
        transaction = await conn.begin() if postgres else None
        try:
            if transaction is not None:  # recovery leaves a locked batch alone
                await ledger.hold_batch_lock(conn, group.batch_id)
            records = await asyncio.to_thread(self._write, group, marker)
            manifest = _manifest(group, self.source_id, records)
            if transaction is None:  # SQLite: the write lock only from here to COMMIT
                await write_transaction_options(conn)
                transaction = await conn.begin()
            await asyncio.to_thread(_check_still_there, self.storage, marker)
            for batch in group.batches:
                if not await ledger.forget_batch(conn, batch.batch_id):
                    raise ConcurrentChange(
                        f"batch {batch.batch_id} changed while it was being compacted",
                        hint="run `archiver compact` again",
                    )
            await ledger.record_commit(conn, group.batch_id, manifest.to_json())
        except BaseException:
            await asyncio.to_thread(_abandon, self.storage, marker)
            if transaction is not None:
                with contextlib.suppress(SQLAlchemyError, OSError):
                    await transaction.rollback()
            raise
        try:
            await transaction.commit()
        except (SQLAlchemyError, OSError) as exc:
            raise _UncertainCommit(
                f"COMMIT of compacted batch {group.batch_id} failed and may or may not have "
                f"happened ({translate_error(exc, self.options.database.url).message}); "
                "both the old and the new files stay until recovery asks the ledger",
                hint="run `archiver recover` or `archiver compact` again",
            ) from None
        return manifest

    def _write(self, group: Group, marker: PendingMarker) -> list[FileRecord]:
        """Marker, then each merged file, then each read back. Blocking."""
        self.storage.put(pending_key(group.batch_id), marker.to_json().encode())
        self.hook("marker", group.batch_id)
        written = []
        for (table, role), inputs in group.tables().items():
            key = data_key(table, group.partition, group.batch_id)
            encoded, ids = _merge(self.storage, inputs, group, role, self.options.compression)
            self.storage.put(key, encoded.data)
            self.hook("file", group.batch_id)
            written.append((key, table, role, ids, encoded.sha256))
        records = [check_written(self.storage, *file) for file in written]
        self.hook("verified", group.batch_id)
        return records

    def _finish(self, manifest: BatchManifest, marker: PendingMarker) -> None:
        """After COMMIT: the new manifest, then the old manifests and files, then the marker.

        If this fails half-way the marker stays and recovery finishes the same steps.
        """
        self.storage.put(manifest_key(manifest.batch_id), manifest.to_json().encode())
        self.hook("manifest", manifest.batch_id)
        for key in marker.replaces:
            self.storage.delete(key)
            self.hook("removed", manifest.batch_id)
        self.storage.delete(pending_key(manifest.batch_id))


def _undone(group: Group, exc: ArchiverError) -> str:
    return (
        f"compacting {len(group.batches)} batches of {group.partition} failed: "
        f"{exc.message.rstrip('.')}; it was undone and nothing was deleted"
    )


def _marker(group: Group, source_id: str) -> PendingMarker:
    old_manifests = [manifest_key(batch.batch_id) for batch in group.batches]
    old_files = [record.key for batch in group.batches for record in batch.files]
    return PendingMarker(
        batch_id=group.batch_id,
        source_id=source_id,
        created_at=datetime.now(UTC),
        keys=[data_key(table, group.partition, group.batch_id) for table, _ in group.tables()],
        # manifests first: readers of older archiver versions stop seeing them sooner
        replaces=old_manifests + old_files,
    )


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


def _merge(
    storage: Storage,
    inputs: list[FileRecord],
    group: Group,
    role: Literal["archived", "reference"],
    compression: str,
) -> tuple[codec.EncodedFile, list[str]]:
    """One Parquet file from ``inputs``, streamed in row groups; and the ids it must hold.

    Archived rows are kept as they are, and each id must be in one input only.
    Reference snapshots (flows, deployments) repeat across batches; the latest
    snapshot of each id is kept.
    """
    tables: Iterator[pa.Table] = (_read_checked(storage, record) for record in inputs)
    if role == "reference":
        tables = iter([_latest_by_id(list(tables))])
    sink = pa.BufferOutputStream()
    writer: pq.ParquetWriter | None = None
    schema: pa.Schema | None = None
    ids: list[str] = []
    buffered: list[pa.Table] = []
    for table in tables:
        if schema is None:
            schema = table.schema.with_metadata(_metadata(table.schema, group))
            writer = pq.ParquetWriter(sink, schema, **codec.parquet_options(compression))
        buffered.append(_conform(table, schema, inputs[0].table))
        ids.extend(str(i) for i in table.column("id").to_pylist())
        if sum(t.nbytes for t in buffered) >= _ROW_GROUP_BYTES:
            _flush(writer, buffered)
    assert writer is not None, "a group has at least one file per table"
    _flush(writer, buffered)
    writer.close()
    if role == "archived" and len(set(ids)) != len(ids):
        raise VerificationError(
            f"{inputs[0].table} rows of partition {group.partition} appear in more than one batch",
            hint="run `archiver verify` and inspect the batches by hand",
        )
    data = sink.getvalue().to_pybytes()
    return codec.EncodedFile(data=data, rows=len(ids), sha256=codec.checksum(data)), ids


def _flush(writer: pq.ParquetWriter | None, buffered: list[pa.Table]) -> None:
    if writer is not None and buffered:
        table = pa.concat_tables(buffered)
        writer.write_table(table, row_group_size=max(table.num_rows, 1))
        buffered.clear()


def _read_checked(storage: Storage, record: FileRecord) -> pa.Table:
    data = storage.get(record.key)
    where = storage.describe(record.key)
    hint = "run `archiver verify`; restore the file from a backup or leave this partition as is"
    if codec.checksum(data) != record.sha256:
        raise VerificationError(f"{where} has other bytes than its manifest records", hint=hint)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as exc:
        raise VerificationError(f"{where} is not readable ({exc})", hint=hint) from None
    if table.num_rows != record.rows:
        raise VerificationError(f"{where} holds {table.num_rows} rows, its manifest says "
                                f"{record.rows}", hint=hint)  # fmt: skip
    return table


def _conform(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """The first input's schema (with field kinds); other columns stop the group."""
    if not table.schema.equals(schema, check_metadata=False):
        raise ArchiverError(
            f"the {name} files of one partition have different columns",
            hint="report this to the archiver maintainers; the archive is intact",
        )
    return table.cast(schema)


def _metadata(schema: pa.Schema, group: Group) -> dict[str, str]:
    metadata = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    merged = ",".join(batch.batch_id for batch in group.batches)
    return metadata | {
        "archiver.batch_id": group.batch_id,
        "archiver.version": __version__,
        "archiver.compacted_from": merged,
    }


def _latest_by_id(tables: list[pa.Table]) -> pa.Table:
    table = pa.concat_tables(tables)
    last: dict[str, int] = {}
    for index, row_id in enumerate(table.column("id").to_pylist()):
        last[row_id] = index
    return table.take(pa.array(sorted(last.values())))


def _check_still_there(storage: Storage, marker: PendingMarker) -> None:
    """Under the write lock: a recovery that ran meanwhile took the marker or files away."""
    folders = {key.rsplit("/", 1)[0] for key in marker.keys}
    present = {key for folder in folders for key in storage.list(folder)}
    present |= set(storage.list(PENDING_DIR))
    missing = [key for key in [*marker.keys, pending_key(marker.batch_id)] if key not in present]
    if missing:
        raise ConcurrentChange(
            f"{storage.describe(missing[0])} was removed while compacting (a recovery by "
            "another archiver); the old batches are untouched",
            hint="run `archiver compact` again",
        )


def _abandon(storage: Storage, marker: PendingMarker) -> None:
    """Before COMMIT: remove the new files and the marker; if this fails, recovery will."""
    with contextlib.suppress(ArchiverError):
        for key in marker.keys:
            storage.delete(key)
        storage.delete(pending_key(marker.batch_id))
