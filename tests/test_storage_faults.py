"""Storage that fails for real: missing files on read-back, a manifest that cannot be written,
a full disk, credentials the server rejects. Each batch rolls back with one clear error."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from archiver.cli.app import app
from archiver.errors import BatchError, StorageError
from tests import factory
from tests.factory import TestDatabase, TestStorage
from tests.helpers import EXPIRED, archive, moto_process, mounted_tmpfs
from tests.oracle import assert_archive_consistent, assert_nothing_lost, ledger


def test_file_missing_on_read_back_rolls_back(database: TestDatabase, storage: TestStorage) -> None:
    factory.make_tree(database, end_time=EXPIRED)
    before = factory.snapshot(database)

    def lose_a_file(step: str, batch_id: str) -> None:
        if step == "files":
            storage.fs().rm_file(next(f for f in storage.list_files() if "/flow_run/" in f))

    with pytest.raises(BatchError, match="nothing in it was deleted"):
        archive(database, storage, hook=lose_a_file)

    assert factory.snapshot(database) == before
    assert storage.list_files() == []


def test_manifest_write_failure_after_commit_is_completed_by_the_next_run(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    factory.make_tree(database, end_time=EXPIRED)
    obstacles: list[Path] = []

    def block_manifest(step: str, batch_id: str) -> None:
        if step == "verified":  # a folder where the manifest file must go
            obstacle = Path(local_storage.root) / "_manifests" / f"{batch_id}.json"
            obstacle.mkdir(parents=True)
            (obstacle / "x").write_text("in the way")
            obstacles.append(obstacle)

    with pytest.raises(StorageError, match="archived and committed, but writing its manifest"):
        archive(database, local_storage, hook=block_manifest)

    assert database.count("flow_run") == 0 and len(ledger(database)) == 1
    for obstacle in obstacles:
        (obstacle / "x").unlink()
        obstacle.rmdir()
    report = archive(database, local_storage)
    assert report.recovered and "had committed" in report.recovered[0]
    assert_archive_consistent(database, local_storage)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "tiny", "size=16k") as mount_point:
        yield mount_point


@pytest.mark.sqlite
def test_full_disk_rolls_back_with_a_clear_error(
    sqlite_database: TestDatabase, tiny_disk: Path
) -> None:
    for _ in range(3):
        factory.make_tree(sqlite_database, end_time=EXPIRED, logs_per_run=30, artifacts=4)
    before = factory.snapshot(sqlite_database)
    storage = factory.TestStorage("local", str(tiny_disk / "archive"), {})

    with pytest.raises(BatchError) as raised:
        archive(sqlite_database, storage)

    assert "no space left on the device" in str(raised.value)
    assert "nothing in it was deleted" in str(raised.value) and "\n" not in str(raised.value)
    assert factory.snapshot(sqlite_database) == before


@pytest.fixture(scope="module")
def moto_with_auth() -> Iterator[str]:
    """A second moto server, in its own process, that checks credentials (IAM mode)."""
    with moto_process(dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")) as endpoint:
        yield endpoint


@pytest.mark.s3
def test_wrong_s3_credentials_give_one_line_and_delete_nothing(
    tmp_path: Path, database: TestDatabase, moto_with_auth: str
) -> None:
    factory.make_tree(database, end_time=EXPIRED)
    before = factory.snapshot(database)
    config = tmp_path / "c.toml"
    config.write_text(
        f'database_url = "{database.url}"\nstorage_url = "s3://archive-bucket/x"\n'
        'retention_period = "P30D"\nenabled = true\n'
        f'[storage_options]\nendpoint_url = "{moto_with_auth}"\nkey = "wrong"\n'
        'secret = "wrong"\nclient_kwargs = { region_name = "us-east-1" }\n'
    )

    result = CliRunner().invoke(app, ["run", "--config", str(config)])

    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "access denied" in lines[0] and "credentials" in lines[0]
    assert factory.snapshot(database) == before


@pytest.mark.postgres
def test_lost_database_connection_mid_batch_is_retried(
    postgres_database: TestDatabase, storage: TestStorage
) -> None:
    for i in range(3):
        factory.make_tree(postgres_database, end_time=EXPIRED - timedelta(minutes=i))
    before = factory.snapshot_ids(postgres_database)
    killed: list[int] = []

    def kill_connection(step: str, batch_id: str) -> None:
        if step == "verified" and not killed:  # the server drops archiver's session
            killed.append(
                postgres_database.scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'archiver' AND datname = current_database()"
                )
            )

    report = archive(postgres_database, storage, hook=kill_connection)

    assert killed and killed[0] >= 1
    assert report.archived_roots == 3 and postgres_database.count("flow_run") == 0
    assert_nothing_lost(postgres_database, storage, before)
    assert_archive_consistent(postgres_database, storage)
