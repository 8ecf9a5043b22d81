"""One planned batch of a run: its id, the keys its files go under, their encoding, its manifest.

A batch is planned inside its open transaction, once its rows are locked and read
(:class:`PreparedBatch` holds both); nothing of it is written until the commit
protocol (:mod:`archiver.engine.commit`) takes it as a :class:`~archiver.engine.commit.NewBatch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncTransaction

from archiver.archive import codec
from archiver.archive.manifest import BatchManifest, FileRecord
from archiver.archive.storage import data_key
from archiver.engine.commit import NewBatch, NewFile, new_batch_id
from archiver.engine.results import BatchReport
from archiver.models import BatchContent, Role, Root, TableRows
from archiver.source.schema import PrefectSchema
from archiver.source.trees import Gathered
from archiver.version import __version__


class PlannedBatch:
    """The rows of one batch and the names they will be written under."""

    def __init__(
        self,
        content: BatchContent,
        schema: PrefectSchema,
        source_id: str,
        cutoff: datetime,
        compression: str,
    ) -> None:
        self.content = content
        self.schema = schema
        self.source_id = source_id
        self.cutoff = cutoff
        self.compression = compression
        self.created_at = datetime.now(UTC)
        # Sortable by time, and unique: two attempts at the same runs never share a name.
        self.batch_id = new_batch_id(self.created_at)
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
        self._encoded: list[NewFile] | None = None

    def ids_by_table(self) -> dict[str, list[str]]:
        """The archived tables' ids (references are not deleted)."""
        return {table: self.ids[table] for table in self.content.tables}

    def encode(self) -> None:
        """Encode every file (once). Blocking."""
        if self._encoded is None:
            self._encoded = [
                self._encode(key, rows, role) for key, (rows, role) in self.files.items()
            ]

    def take_files(self) -> list[NewFile]:
        """The encoded files, handed over once: the batch lets go of their bytes. Blocking."""
        self.encode()
        files, self._encoded = self._encoded or [], []
        return files

    def new_batch(self) -> NewBatch:
        """The batch as the commit protocol writes it: small files, all at once."""
        return NewBatch(
            batch_id=self.batch_id,
            source_id=self.source_id,
            keys=list(self.files),
            files=self.take_files,
            manifest=self.manifest,
            at_once=True,
        )

    def _encode(self, key: str, rows: TableRows, role: Role) -> NewFile:
        table = rows.shape.name
        metadata = codec.file_metadata(
            batch_id=self.batch_id,
            source_id=self.source_id,
            table=table,
            role=role,
            kind=self.content.kind,
            partition=self.partition,
            source_dialect=self.schema.dialect,
            source_revision=self.schema.revision,
        )
        encoded = codec.encode(rows, metadata, self.compression)
        return NewFile(key, table, role, self.ids[table], encoded)

    def manifest(self, records: list[FileRecord]) -> BatchManifest:
        oldest, newest = self.content.time_range
        return BatchManifest(
            batch_id=self.batch_id,
            source_id=self.source_id,
            created_at=self.created_at,
            cutoff=self.cutoff,
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

    def report(self, manifest: BatchManifest, clock: Stopwatch) -> BatchReport:
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


@dataclass
class PreparedBatch:
    """A batch locked and read in its open transaction; nothing of it written yet."""

    conn: AsyncConnection
    transaction: AsyncTransaction | None
    last: Root | None  # the keyset position after it (run batches)
    batch: PlannedBatch
    clock: Stopwatch

    async def encode(self) -> None:
        await asyncio.to_thread(self.batch.encode)
        self.clock.lap("encode")

    async def release(self) -> None:
        await release(self.conn, self.transaction)


async def release(conn: AsyncConnection, transaction: AsyncTransaction | None) -> None:
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


def run_content(gathered: Gathered) -> BatchContent:
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


class Stopwatch:
    """Seconds per stage of one batch (select, encode, upload, verify, delete, ...)."""

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
