"""Re-checking an archive against its manifests, without a database.

Every committed batch has a manifest in ``_manifests/``; each names its files
with row counts, sizes and SHA-256 checksums. :func:`verify_archive` reads every
manifest and every file it names, fresh from storage, and reports what differs:
a file missing, with other bytes, another row count, or another table or batch
in its own metadata; and Parquet files that no manifest names. Open batches
(pending markers) are reported too; `archiver recover` resolves them.

This is the ``verify`` command only. The batch catalog the other readers share
(``list_batches``, ``open_archive``) and the read-back check of newly written files
live in :mod:`archiver.archive.catalog`; verify reads the manifests itself, so that
one it cannot read is reported rather than raised.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from archiver.archive import codec
from archiver.archive.manifest import BatchManifest, FileRecord, current_batches
from archiver.archive.storage import MANIFEST_DIR, PENDING_DIR, Storage
from archiver.errors import ArchiverError, StorageError


@dataclass
class VerifyReport:
    batches: int = 0
    files: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    open_batches: list[str] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class VerifyScope:
    """Which batches to re-read: all, a date range of their runs' end times, a random sample."""

    ended_after: datetime | None = None
    ended_before: datetime | None = None
    sample: int | None = None

    def choose(self, manifests: list[BatchManifest]) -> list[BatchManifest]:
        chosen = [
            m for m in manifests
            if (self.ended_after is None or m.end_time_max >= self.ended_after)
            and (self.ended_before is None or m.end_time_min < self.ended_before)
        ]  # fmt: skip
        if self.sample is not None and self.sample < len(chosen):
            chosen = random.sample(chosen, self.sample)
        return chosen


async def verify_archive(storage: Storage, scope: VerifyScope | None = None) -> VerifyReport:
    """Check batches and files; never raises for a damaged archive, only reports it."""
    return await asyncio.to_thread(_verify, storage, scope or VerifyScope())


def _verify(storage: Storage, scope: VerifyScope) -> VerifyReport:
    report = VerifyReport()
    manifests = []
    for key in storage.list(MANIFEST_DIR):
        try:
            manifests.append(BatchManifest.from_json(storage.get(key), storage.describe(key)))
        except ArchiverError as exc:
            report.problems.append(str(exc.message))
    # files of replaced batches still being cleaned up are named, but not checked
    named = {record.key for manifest in manifests for record in manifest.files}
    for manifest in scope.choose(current_batches(manifests)):
        report.batches += 1
        for record in manifest.files:
            report.files += 1
            report.rows += record.rows
            report.problems.extend(_check_file(storage, manifest, record))
    for key in _data_files(storage):
        if key not in named:
            report.problems.append(f"{storage.describe(key)} is in no manifest")
    report.open_batches = [k for k in storage.list(PENDING_DIR) if k.endswith(".json")]
    return report


def _check_file(storage: Storage, manifest: BatchManifest, record: FileRecord) -> list[str]:
    where = storage.describe(record.key)
    try:
        data = storage.get(record.key)
    except StorageError:
        return [f"{where} is missing (batch {manifest.batch_id})"]
    if codec.checksum(data) != record.sha256:
        return [f"{where} has other bytes than its manifest records (checksum differs)"]
    facts = codec.read_facts(data)
    problems = []
    if facts.rows != record.rows:
        problems.append(f"{where} holds {facts.rows} rows, its manifest says {record.rows}")
    if facts.metadata.get("archiver.batch_id") != manifest.batch_id:
        problems.append(f"{where} belongs to another batch than {manifest.batch_id}")
    if facts.metadata.get("archiver.table") != record.table:
        problems.append(f"{where} holds another table than {record.table}")
    problems.extend(f"{where}: {problem}" for problem in facts.schema_problems)
    return problems


def _data_files(storage: Storage) -> Iterator[str]:
    for table in storage.list(""):
        if table.startswith(("_", ".")):
            continue
        for partition in storage.list(table):
            yield from (key for key in storage.list(partition) if key.endswith(".parquet"))
