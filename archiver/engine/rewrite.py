"""Rewriting a committed batch without some of its rows (rows restored to the database).

A rewrite is a new batch under the commit protocol (:mod:`archiver.engine.commit`):
its pending marker lists the new files *and* the old batch's manifest and files
(``replaces``). The new files are written and verified; then, in the database
transaction that puts the restored rows back, the old batch leaves the ledger and
the new one enters it. After COMMIT the new manifest is written and the old batch
removed. So every row is, at every moment, in the database or in the committed
batch: before COMMIT the old batch; after it, the database (restored rows) or the
new batch (the rest). Recovery finishes or undoes an interrupted rewrite like any
other batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from archiver.archive import codec
from archiver.archive.manifest import BatchManifest, FileRecord
from archiver.archive.storage import data_key
from archiver.engine.commit import NewBatch, NewFile, new_batch_id


@dataclass
class Rewrite:
    old: BatchManifest
    batch_id: str
    source_id: str
    tables: dict[str, pa.Table]  # what stays in the archive, per table
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def keys(self) -> dict[str, str]:
        return {table: data_key(table, self.old.partition, self.batch_id) for table in self.tables}

    def new_batch(self, compression: str = codec.DEFAULT_COMPRESSION) -> NewBatch:
        """The rewrite as the commit protocol writes it: one file per table, in turn."""
        return NewBatch(
            batch_id=self.batch_id,
            source_id=self.source_id,
            keys=list(self.keys.values()),
            files=lambda: self._files(compression),
            manifest=self.manifest,
            replaces=[self.old],
        )

    def _files(self, compression: str) -> Iterator[NewFile]:
        roles = {record.table: record.role for record in self.old.files}
        for name, key in self.keys.items():
            table = self.tables[name]
            ids = [str(i) for i in table.column("id").to_pylist()]
            yield NewFile(key, name, roles[name], ids, codec.encode_table(table, compression))

    def manifest(self, records: list[FileRecord]) -> BatchManifest:
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
                "files": list(records),
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
    batch_id = new_batch_id()
    kept: dict[str, pa.Table] = {}
    for record in old.files:
        table = tables[record.table]
        if record.role == "archived":
            gone = pa.array(sorted(removed.get(record.table, set())), pa.string())
            table = table.filter(pc.invert(pc.is_in(table["id"], value_set=gone)))
        if table.num_rows:
            metadata = codec.rebatched_metadata(
                table.schema.metadata, batch_id=batch_id, source_id=source_id
            )
            kept[record.table] = table.replace_schema_metadata(metadata)
    if not any(r.role == "archived" and r.table in kept for r in old.files):
        kept = {}  # only reference snapshots would be left: nothing to keep
    return Rewrite(old, batch_id, source_id, kept)
