"""Independent checks for tests: read the archive with pyarrow and the database with sync drivers.

Nothing here imports archiver's source or codec, so a bug there cannot hide itself.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq

RUN_TABLES = (
    "flow_run",
    "task_run",
    "flow_run_state",
    "task_run_state",
    "flow_run_input",
    "log",
    "artifact",
    "task_run_state_cache",
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def archive_files(storage: Any, table: str) -> list[str]:
    return [f for f in storage.list_files(".parquet") if f"/{table}/" in f]


def archived_rows(storage: Any, table: str) -> dict[str, dict[str, Any]]:
    """Every row of ``table`` across all batches, keyed by id (duplicates fail)."""
    files = archive_files(storage, table)
    if not files:
        return {}
    fs = storage.fs()
    dataset = ds.dataset(files, filesystem=fs, format="parquet", partitioning=None)
    rows = dataset.to_table().to_pylist()
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows), f"duplicate ids in the archive of {table}"
    return by_id


def archived_ids(storage: Any) -> dict[str, set[str]]:
    return {table: set(archived_rows(storage, table)) for table in RUN_TABLES}


def field_kinds(storage: Any, table: str) -> dict[str, str]:
    path = archive_files(storage, table)[0]
    with storage.fs().open(path, "rb") as handle:
        schema = pq.read_schema(handle)
    return {f.name: f.metadata[b"archiver.kind"].decode() for f in schema}


def db_rows(db: Any, table: str) -> dict[str, dict[str, Any]]:
    """Rows as the sync driver returns them, JSON always as its text (never parsed)."""
    if db.dialect == "postgresql":
        columns = db.rows(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = :t AND table_schema = 'public'",
            {"t": table},
        )
        select = ", ".join(
            f'"{c["column_name"]}"::text AS "{c["column_name"]}"'
            if c["data_type"] in ("json", "jsonb")
            else f'"{c["column_name"]}"'
            for c in columns
        )
    else:
        select = "*"
    return {str(row["id"]): row for row in db.rows(f"SELECT {select} FROM {table}")}


def normalise(kind: str, value: Any) -> Any:
    """A database value in the form the archive promises for ``kind``."""
    if value is None:
        return None
    if kind == "uuid":
        return str(value).lower()
    if kind == "timestamp":
        return _as_utc(value)
    if kind == "interval":
        if isinstance(value, timedelta):
            return value
        if isinstance(value, int | float) or str(value).replace(".", "", 1).isdigit():
            return timedelta(seconds=float(value))
        return _as_utc(value) - EPOCH
    if kind == "json":
        return value if isinstance(value, str) else json.dumps(value)
    if kind == "boolean":
        return bool(value)
    return value


def _as_utc(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def assert_archive_equals(storage: Any, table: str, expected: dict[str, dict[str, Any]]) -> None:
    """The archived rows of ``table`` equal ``expected`` (rows read before), value for value."""
    archived = archived_rows(storage, table)
    assert set(archived) == set(expected), table
    if not archived:
        return
    kinds = field_kinds(storage, table)
    for row_id, original in expected.items():
        row = archived[row_id]
        for column, value in original.items():
            want = normalise(kinds[column], value)
            got = row[column]
            if kinds[column] == "json" and want is not None and got is not None:
                assert json.loads(got) == json.loads(want), (table, column)
                if not isinstance(original[column], int | float):
                    assert got == want, (table, column)  # text kept exactly
            else:
                assert got == want, (table, row_id, column, got, want)
