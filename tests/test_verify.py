"""Reading the archive back without a database: ls, verify, open_archive, and DuckDB."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from archiver import open_archive
from archiver.cli.app import app
from tests import factory
from tests.factory import TestDatabase, TestStorage
from tests.helpers import EXPIRED, archive, write_config


@pytest.fixture
def archived(database: TestDatabase, storage: TestStorage, tmp_path: Path) -> Path:
    """Two batches archived from the test database; returns a config file for the CLI."""
    for i in range(4):
        factory.make_tree(database, end_time=EXPIRED - timedelta(minutes=i), subflow_depth=1)
    archive(database, storage, batch_size=2)
    return write_config(tmp_path / "archiver.toml", storage)


def verify(config: Path) -> Result:
    return CliRunner().invoke(app, ["verify", "--config", str(config)])


def test_ls_lists_the_batches(archived: Path) -> None:
    result = CliRunner().invoke(app, ["ls", "--config", str(archived)])
    assert result.exit_code == 0, result.output
    assert "2 batches in" in result.stdout
    assert f"month={EXPIRED:%Y-%m}" in result.stdout


def test_verify_passes_a_sound_archive(archived: Path) -> None:
    result = verify(archived)
    assert result.exit_code == 0, result.output
    assert "2 batches" in result.stdout and ": sound" in result.stdout


def test_verify_catches_a_deleted_file(archived: Path, storage: TestStorage) -> None:
    storage.fs().rm_file(next(f for f in storage.list_files() if "/task_run/" in f))
    result = verify(archived)
    assert result.exit_code == 1 and "is missing" in result.stderr


def test_verify_catches_a_truncated_file(archived: Path, storage: TestStorage) -> None:
    key = next(k for k in storage.keys(".parquet") if k.startswith("log/"))
    storage.write_bytes(key, storage.read_bytes(key)[:-100])
    result = verify(archived)
    assert result.exit_code == 1 and "checksum differs" in result.stderr


def test_verify_catches_a_file_from_another_batch(archived: Path, storage: TestStorage) -> None:
    first, second = sorted(k for k in storage.keys(".parquet") if k.startswith("flow_run/"))
    storage.write_bytes(first, storage.read_bytes(second))
    result = verify(archived)
    assert result.exit_code == 1 and "checksum differs" in result.stderr


def test_verify_catches_a_tampered_manifest(archived: Path, storage: TestStorage) -> None:
    key = next(k for k in storage.keys(".json") if k.startswith("_manifests/"))
    manifest = json.loads(storage.read_bytes(key))
    manifest["files"][0]["rows"] += 1
    manifest["files"][0]["sha256"] = "0" * 64
    storage.write_bytes(key, json.dumps(manifest).encode())
    result = verify(archived)
    assert result.exit_code == 1 and "checksum differs" in result.stderr


def test_verify_catches_a_file_in_no_manifest(archived: Path, storage: TestStorage) -> None:
    key = next(k for k in storage.keys(".parquet") if k.startswith("log/"))
    storage.write_bytes(key.replace(".parquet", "-stray.parquet"), storage.read_bytes(key))
    result = verify(archived)
    assert result.exit_code == 1 and "is in no manifest" in result.stderr


def test_open_archive_and_duckdb_read_the_same_rows(
    archived: Path, database: TestDatabase, storage: TestStorage
) -> None:
    tables = open_archive(storage.url, storage.options)
    runs = tables["flow_run"].to_table()
    assert runs.num_rows == 8 and set(runs.column("month").to_pylist()) == {f"{EXPIRED:%Y-%m}"}
    if storage.kind == "local":  # the README's DuckDB recipe
        count = duckdb.execute(
            f"SELECT count(*) FROM read_parquet('{storage.url}/flow_run/*/*.parquet', "
            "hive_partitioning = true)"
        ).fetchall()
        assert count == [(8,)]


def test_show_reads_a_run_from_the_archive_alone(
    database: TestDatabase, storage: TestStorage, tmp_path: Path
) -> None:
    trees = [factory.make_tree(database, end_time=EXPIRED - timedelta(minutes=i),
                               subflow_depth=2) for i in range(3)]  # fmt: skip
    archive(database, storage, batch_size=1)
    config = write_config(tmp_path / "show.toml", storage)
    tree = trees[1]

    by_root = CliRunner().invoke(app, ["show", tree.root_id, "-c", str(config)])
    by_subflow = CliRunner().invoke(app, ["show", tree.subflow_ids[-1], "-c", str(config)])
    missing = CliRunner().invoke(app, ["show", trees[0].task_run_ids[0], "-c", str(config)])

    assert by_root.exit_code == 0, by_root.output
    assert all(run_id in by_root.stdout for run_id in tree.flow_run_ids)
    assert "logs (" in by_root.stdout and "states" in by_root.stdout
    assert by_subflow.exit_code == 0 and tree.subflow_ids[-1] in by_subflow.stdout
    assert tree.root_id not in by_subflow.stdout
    assert missing.exit_code == 1 and "is not in the archive" in missing.stderr


def test_verify_catches_a_wrong_schema(archived: Path, storage: TestStorage) -> None:
    key = next(k for k in storage.keys(".json") if k.startswith("_manifests/"))
    manifest = json.loads(storage.read_bytes(key))
    record = next(r for r in manifest["files"] if r["table"] == "flow_run")
    table = pq.read_table(pa.BufferReader(storage.read_bytes(record["key"])))
    index = table.schema.get_field_index("run_count")
    field = table.schema.field(index)
    table = table.set_column(
        index, field.with_type(pa.string()), table["run_count"].cast(pa.string())
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(record["key"], data)
    record.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    storage.write_bytes(key, json.dumps(manifest).encode())

    result = verify(archived)

    assert result.exit_code == 1 and "column run_count is string, not int32" in result.stderr


def test_verify_a_sample_or_a_date_range(archived: Path, storage: TestStorage) -> None:
    sample = CliRunner().invoke(app, ["verify", "-c", str(archived), "--sample", "1"])
    before = CliRunner().invoke(
        app, ["verify", "-c", str(archived), "--ended-before", "2000-01-01T00:00:00"]
    )
    assert sample.exit_code == 0 and "1 batches" in sample.stdout
    assert before.exit_code == 0 and "0 batches" in before.stdout
