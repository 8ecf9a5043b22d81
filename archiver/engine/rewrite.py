"""Rewriting a committed batch without some of its rows (rows restored to the database).

A rewrite is a new batch under the same commit protocol: its pending marker
lists the new files *and* the old batch's files and manifest (``replaces``).
The new files are written and verified; then, in the database transaction that
puts the restored rows back, the old batch leaves the ledger and the new one
enters it. After COMMIT the new manifest is written and the old files removed.
So every row is, at every moment, in the database or in the committed batch:
before COMMIT the old batch; after it, the database (restored rows) or the new
batch (the rest). Recovery finishes or undoes an interrupted rewrite like any
other batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from archiver.archive import codec
from archiver.archive.manifest import BatchManifest, FileRecord, PendingMarker
from archiver.archive.storage import Storage, data_key, manifest_key, pending_key
from archiver.archive.verify import check_written


@dataclass
class Rewrite:
    old: BatchManifest
    batch_id: str
    source_id: str
    tables: dict[str, pa.Table]  # what stays in the archive, per table
    records: list[FileRecord] = field(default_factory=list)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def keys(self) -> dict[str, str]:
        return {table: data_key(table, self.old.partition, self.batch_id) for table in self.tables}

    def marker(self) -> PendingMarker:
        replaced = [record.key for record in self.old.files] + [manifest_key(self.old.batch_id)]
        return PendingMarker(
            batch_id=self.batch_id,
            source_id=self.source_id,
            created_at=datetime.now(UTC),
            keys=list(self.keys.values()),
            replaces=replaced,
        )

    def manifest(self) -> BatchManifest:
        runs = self.tables.get("flow_run")
        roots = runs.filter(pc.is_null(runs["parent_task_run_id"])) if runs else None
        ends = roots.column("end_time").to_pylist() if roots is not None else []
        root_ids = sorted(roots.column("id").to_pylist()) if roots is not None else []
        return self.old.model_copy(
            update={
                "batch_id": self.batch_id,
                "source_id": self.source_id,
                "created_at": self.created_at,
                "root_ids": root_ids,
                "root_rules": {
                    root: rule for root, rule in self.old.root_rules.items() if root in root_ids
                },
                "end_time_min": min(ends, default=self.old.end_time_min),
                "end_time_max": max(ends, default=self.old.end_time_max),
                "files": list(self.records),
                "replaces": self.old.batch_id,
            }
        )


def plan_rewrite(
    old: BatchManifest,
    tables: dict[str, pa.Table],
    removed: dict[str, set[str]],
    source_id: str,
) -> Rewrite:
    """The batch ``old`` without the ``removed`` ids (per table)."""
    batch_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}"
    kept: dict[str, pa.Table] = {}
    for record in old.files:
        table = tables[record.table]
        if record.role == "archived":
            gone = pa.array(sorted(removed.get(record.table, set())), pa.string())
            table = table.filter(pc.invert(pc.is_in(table["id"], value_set=gone)))
        if table.num_rows:
            kept[record.table] = _retag(table, batch_id, source_id)
    if not any(r.role == "archived" and r.table in kept for r in old.files):
        kept = {}  # only reference snapshots would be left: nothing to keep
    return Rewrite(old, batch_id, source_id, kept)


def _retag(table: pa.Table, batch_id: str, source_id: str) -> pa.Table:
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    metadata |= {"archiver.batch_id": batch_id, "archiver.source_id": source_id}
    return table.replace_schema_metadata(metadata)


def write_rewrite(storage: Storage, rewrite: Rewrite, compression: str = "zstd") -> None:
    """Marker first, then the new files, each read back and checked. Blocking."""
    storage.put(pending_key(rewrite.batch_id), rewrite.marker().to_json().encode())
    roles = {record.table: record.role for record in rewrite.old.files}
    for name, key in rewrite.keys.items():
        table = rewrite.tables[name]
        encoded = codec.encode_table(table, compression)
        storage.put(key, encoded.data)
        ids = [str(i) for i in table.column("id").to_pylist()]
        rewrite.records.append(check_written(storage, key, name, roles[name], ids, encoded.sha256))


def finish_rewrite(storage: Storage, rewrite: Rewrite) -> None:
    """After COMMIT: publish the new manifest, remove the old batch, drop the marker."""
    if rewrite.records:
        storage.put(manifest_key(rewrite.batch_id), rewrite.manifest().to_json().encode())
    for key in rewrite.marker().replaces:
        storage.delete(key)
    storage.delete(pending_key(rewrite.batch_id))


def abandon_rewrite(storage: Storage, rewrite: Rewrite) -> None:
    """Before COMMIT: remove the new files and the marker; the old batch stays."""
    for key in rewrite.keys.values():
        storage.delete(key)
    storage.delete(pending_key(rewrite.batch_id))
