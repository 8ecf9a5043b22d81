"""Merging one table's Parquet files of several batches into one file (``archiver compact``).

The old files are read one by one, each checked against its manifest first
(SHA-256, readable, row count), and streamed into the new file in row groups of
about 64 MB of Arrow data, so memory stays near one old file plus one row group
whatever the size of the new file. Every input must have the columns of the first:
an archive written by two schema revisions is never mixed in one file.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from archiver.archive import codec
from archiver.archive.manifest import FileRecord
from archiver.archive.storage import Storage
from archiver.engine.commit import NewFile
from archiver.errors import ArchiverError, VerificationError
from archiver.models import Role

#: rows are buffered up to about this many Arrow bytes per row group
_ROW_GROUP_BYTES = 64 * 2**20


def merge_files(
    storage: Storage,
    inputs: list[FileRecord],
    *,
    key: str,
    role: Role,
    batch_id: str,
    source_id: str,
    merged: list[str],
    compression: str,
) -> NewFile:
    """One Parquet file at ``key`` from ``inputs`` (one table), for batch ``batch_id``. Blocking.

    Archived rows are kept as they are, and each id must be in one input only.
    Reference snapshots (flows, deployments) repeat across batches; the latest
    snapshot of each id is kept. The file's metadata names the ``merged`` batches.
    Raises VerificationError if an input is not what its manifest says.
    """
    name = inputs[0].table
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
            metadata = codec.rebatched_metadata(
                table.schema.metadata,
                batch_id=batch_id,
                source_id=source_id,
                compacted_from=merged,
            )
            schema = table.schema.with_metadata(metadata)
            writer = pq.ParquetWriter(sink, schema, **codec.parquet_options(compression))
        buffered.append(_conform(table, schema, name))
        ids.extend(str(i) for i in table.column("id").to_pylist())
        if sum(t.nbytes for t in buffered) >= _ROW_GROUP_BYTES:
            _flush(writer, buffered)
    assert writer is not None, "a group has at least one file per table"
    _flush(writer, buffered)
    writer.close()
    if role == "archived" and len(set(ids)) != len(ids):
        raise VerificationError(
            f"{name} rows of partition {key.split('/')[1]} appear in more than one batch",
            hint="run `archiver verify` and inspect the batches by hand",
        )
    data = sink.getvalue().to_pybytes()
    encoded = codec.EncodedFile(data=data, rows=len(ids), sha256=codec.checksum(data))
    return NewFile(key, name, role, ids, encoded)


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


def _latest_by_id(tables: list[pa.Table]) -> pa.Table:
    table = pa.concat_tables(tables)
    last: dict[str, int] = {}
    for index, row_id in enumerate(table.column("id").to_pylist()):
        last[row_id] = index
    return table.take(pa.array(sorted(last.values())))
