"""Reading the archive back without a database: ls, verify, open_archive, and DuckDB."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from typer.testing import CliRunner

from archiver import open_archive
from archiver.cli import app
from tests import factory
from tests.helpers import EXPIRED, archive


@pytest.fixture
def archived(database: Any, storage: Any, tmp_path: Path) -> Path:
    """Two batches archived from the test database; returns a config file for the CLI."""
    for i in range(4):
        factory.make_tree(database, end_time=EXPIRED - timedelta(minutes=i), subflow_depth=1)
    archive(database, storage, batch_size=2)
    config = tmp_path / "archiver.toml"
    options = ", ".join(f"{k} = {json.dumps(v)}" for k, v in storage.options.items()
                        if not isinstance(v, dict))  # fmt: skip
    region = '{ region_name = "us-east-1" }'
    config.write_text(
        f"storage_url = {json.dumps(storage.url)}\n"
        + (f"storage_options = {{ {options}, client_kwargs = {region} }}\n" if options else "")
    )
    return config


def verify(config: Path) -> Any:
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


def test_verify_catches_a_deleted_file(archived: Path, storage: Any) -> None:
    storage.fs().rm_file(next(f for f in storage.list_files() if "/task_run/" in f))
    result = verify(archived)
    assert result.exit_code == 1 and "is missing" in result.stderr


def test_verify_catches_a_truncated_file(archived: Path, storage: Any) -> None:
    key = next(k for k in storage.keys(".parquet") if k.startswith("log/"))
    storage.write_bytes(key, storage.read_bytes(key)[:-100])
    result = verify(archived)
    assert result.exit_code == 1 and "checksum differs" in result.stderr


def test_verify_catches_a_file_from_another_batch(archived: Path, storage: Any) -> None:
    first, second = sorted(k for k in storage.keys(".parquet") if k.startswith("flow_run/"))
    storage.write_bytes(first, storage.read_bytes(second))
    result = verify(archived)
    assert result.exit_code == 1 and "checksum differs" in result.stderr


def test_verify_catches_a_tampered_manifest(archived: Path, storage: Any) -> None:
    key = next(k for k in storage.keys(".json") if k.startswith("_manifests/"))
    manifest = json.loads(storage.read_bytes(key))
    manifest["files"][0]["rows"] += 1
    manifest["files"][0]["sha256"] = "0" * 64
    storage.write_bytes(key, json.dumps(manifest).encode())
    result = verify(archived)
    assert result.exit_code == 1 and "checksum differs" in result.stderr


def test_verify_catches_a_file_in_no_manifest(archived: Path, storage: Any) -> None:
    key = next(k for k in storage.keys(".parquet") if k.startswith("log/"))
    storage.write_bytes(key.replace(".parquet", "-stray.parquet"), storage.read_bytes(key))
    result = verify(archived)
    assert result.exit_code == 1 and "is in no manifest" in result.stderr


def test_open_archive_and_duckdb_read_the_same_rows(
    archived: Path, database: Any, storage: Any
) -> None:
    tables = open_archive(storage.url, storage.options)
    runs = tables["flow_run"].to_table()
    assert runs.num_rows == 8 and set(runs.column("month").to_pylist()) == {f"{EXPIRED:%Y-%m}"}
    if storage.kind == "local":  # the README's DuckDB recipe
        count = duckdb.sql(
            f"SELECT count(*) FROM read_parquet('{storage.url}/flow_run/*/*.parquet', "
            "hive_partitioning = true)"
        ).fetchall()
        assert count == [(8,)]
