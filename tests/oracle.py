"""Independent checks for tests: read the archive with pyarrow, and hold it against the database
as the sync drivers read it (:func:`tests.factory.snapshot`).

Nothing here imports archiver's source or codec, so a bug there cannot hide itself.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tests.factory import RUN_TABLES as RUN_TABLES  # test_crash, test_hot_path import it here
from tests.factory import TestDatabase, TestStorage

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def archive_files(storage: TestStorage, table: str) -> list[str]:
    return [f for f in storage.list_files(".parquet") if f"/{table}/" in f]


def archived_rows(storage: TestStorage, table: str) -> dict[str, dict[str, Any]]:
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


def archived_ids(storage: TestStorage) -> dict[str, set[str]]:
    return {table: set(archived_rows(storage, table)) for table in RUN_TABLES}


def field_kinds(storage: TestStorage, table: str) -> dict[str, str]:
    path = archive_files(storage, table)[0]
    with storage.fs().open(path, "rb") as handle:
        schema = pq.read_schema(handle)
    return {f.name: f.metadata[b"archiver.kind"].decode() for f in schema}


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


def assert_archive_equals(
    storage: TestStorage, table: str, expected: dict[str, dict[str, Any]]
) -> None:
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


def ledger(db: TestDatabase) -> dict[str, dict[str, Any]]:
    """Committed batches according to archiver's ledger table: batch id -> manifest."""
    table = "archiver.batch" if db.dialect == "postgresql" else "archiver_batch"
    exists = (
        db.scalar("SELECT to_regclass('archiver.batch') IS NOT NULL")
        if db.dialect == "postgresql"
        else db.scalar("SELECT count(*) FROM sqlite_master WHERE name = 'archiver_batch'")
    )
    if not exists:
        return {}
    return {
        row["batch_id"]: json.loads(row["manifest"])
        for row in db.rows(f"SELECT batch_id, manifest FROM {table}")
    }


def committed_ids(db: TestDatabase, storage: TestStorage) -> dict[str, list[str]]:
    """Ids per table in the files of committed batches (a list: duplicates must show)."""
    found: dict[str, list[str]] = {table: [] for table in RUN_TABLES}
    fs = storage.fs()
    for manifest in ledger(db).values():
        for record in manifest["files"]:
            if record["role"] != "archived":
                continue
            with fs.open(f"{storage.root}/{record['key']}", "rb") as handle:
                ids = pq.read_table(handle, columns=["id"])["id"].to_pylist()
                found.setdefault(record["table"], []).extend(ids)
    return found


def assert_nothing_lost(
    db: TestDatabase, storage: TestStorage, before: dict[str, set[str]]
) -> None:
    """Every row that existed before is in the database or in a committed batch, once.

    Checks the tables ``before`` names (the run tables, and sweep tables if given).
    """
    archived = committed_ids(db, storage)
    for table in before:
        in_db = db.ids(table)
        counts: dict[str, int] = {}
        for row_id in archived.get(table, []):
            counts[row_id] = counts.get(row_id, 0) + 1
        assert all(n == 1 for n in counts.values()), f"{table}: a row archived twice"
        lost = before[table] - in_db - set(counts)
        both = before[table] & in_db & set(counts)
        assert not lost, f"{table}: {len(lost)} rows neither in the database nor archived"
        assert not both, f"{table}: {len(both)} rows both in the database and archived"


def assert_archive_consistent(db: TestDatabase, storage: TestStorage) -> None:
    """After recovery: every committed batch has its manifest and complete files, nothing else."""
    committed = ledger(db)
    manifests = {
        key.rsplit("/", 1)[1].removesuffix(".json")
        for key in storage.keys(".json")
        if key.startswith("_manifests/")
    }
    assert manifests == set(committed), "manifests in storage differ from the ledger"
    assert not [k for k in storage.keys(".json") if k.startswith("_pending/")], "open batches left"
    expected_files = {f["key"]: f for m in committed.values() for f in m["files"]}
    assert set(storage.keys(".parquet")) == set(expected_files), "files not in any manifest"
    assert not [k for k in storage.keys("") if k.endswith(".partial")], "partial writes left"
    for key, record in expected_files.items():
        data = storage.read_bytes(key)
        assert hashlib.sha256(data).hexdigest() == record["sha256"], key
