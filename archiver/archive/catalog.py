"""The batch catalog: which committed batches an archive holds, and proof that a file is whole.

Every module that reads or writes batches goes through here: the engine (run,
compaction, restore) lists the committed batches and proves each file it wrote
with :func:`check_written`; ``verify``, ``show`` and ``ls`` list the batches;
:func:`open_archive` hands pyarrow readers exactly the files the current
manifests name. Nothing here needs a database.
"""

from __future__ import annotations

import pyarrow.dataset as ds

from archiver.archive import codec
from archiver.archive.manifest import BatchManifest, FileRecord, current_batches
from archiver.archive.storage import MANIFEST_DIR, Storage
from archiver.errors import VerificationError
from archiver.models import Role


def check_written(
    storage: Storage, key: str, table: str, role: Role, ids: list[str], sha256: str
) -> FileRecord:
    """Read ``key`` back fresh and prove it holds exactly what was written. Blocking.

    Raises VerificationError on other bytes, another row count, or other primary keys.
    """
    data = storage.get(key)
    where = storage.describe(key)
    if codec.checksum(data) != sha256:
        raise VerificationError(f"{where} read back with different bytes than were written")
    facts = codec.read_facts(data)
    if facts.rows != len(ids):
        raise VerificationError(f"{where} holds {facts.rows} rows, expected {len(ids)}")
    if not facts.holds_exactly(ids):
        raise VerificationError(f"{where} does not hold exactly the primary keys selected")
    return FileRecord(
        table=table, key=key, rows=facts.rows, bytes=len(data), sha256=sha256, role=role
    )


def list_batches(storage: Storage) -> list[BatchManifest]:
    """Every committed batch's manifest, oldest first. Blocking; raises StorageError.

    Batches already replaced by a rewrite or a compaction whose clean-up is still
    under way are left out (:func:`current_batches`), so each row appears once.
    """
    return current_batches([
        BatchManifest.from_json(storage.get(key), storage.describe(key))
        for key in storage.list(MANIFEST_DIR)
        if key.endswith(".json")
    ])  # fmt: skip


def open_archive(url: str, options: dict[str, object] | None = None) -> dict[str, ds.Dataset]:
    """Each archived table as a pyarrow dataset over all batches (Hive ``month=`` partitions).

    The datasets hold exactly the files the current manifests name, so they never
    show a row twice, even while a compaction or a rewrite is cleaning up.
    """
    storage = Storage(url, options)
    files: dict[str, list[str]] = {}
    for manifest in list_batches(storage):
        for record in manifest.files:
            files.setdefault(record.table, []).append(storage.path(record.key))
    return {
        table: ds.dataset(
            paths, filesystem=storage.fs, format="parquet", partitioning="hive",
            partition_base_dir=storage.path(table),
        )
        for table, paths in sorted(files.items())
    }  # fmt: skip
