"""The command line, in process: output, exit codes, and one-line errors that delete nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from archiver.cli.app import app
from tests import factory
from tests.factory import TestDatabase, TestStorage
from tests.helpers import EXPIRED, RECENT, write_config
from tests.oracle import archived_ids


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def config_for(tmp_path: Path, db: TestDatabase, storage: TestStorage, **extra: Any) -> Path:
    return write_config(
        tmp_path / "archiver.toml",
        storage,
        database_url=db.url,
        retention_period="P30D",
        batch_interval=0,
        **extra,
    )


def test_run_without_enabled_only_reports(
    tmp_path: Path, database: TestDatabase, storage: TestStorage
) -> None:
    factory.make_tree(database, end_time=EXPIRED)
    factory.make_tree(database, end_time=RECENT)
    before = factory.snapshot(database)

    result = invoke("run", "--config", str(config_for(tmp_path, database, storage)))

    assert result.exit_code == 0, result.output
    assert "1 expired top-level runs" in result.stderr
    assert "dry run: nothing archived or deleted" in result.stderr
    assert factory.snapshot(database) == before


def test_run_with_yes_archives(
    tmp_path: Path, database: TestDatabase, storage: TestStorage
) -> None:
    tree = factory.make_tree(database, end_time=EXPIRED, subflow_depth=1)

    result = invoke("run", "--yes", "--config", str(config_for(tmp_path, database, storage)))

    assert result.exit_code == 0, result.output
    assert "archived 1 runs in 1 batches" in result.stderr
    assert archived_ids(storage)["flow_run"] == set(tree.flow_run_ids)
    assert database.count("flow_run") == 0


def test_enabled_in_environment(
    tmp_path: Path, sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    factory.make_tree(sqlite_database, end_time=EXPIRED)
    config = config_for(tmp_path, sqlite_database, local_storage)

    result = invoke("run", "--config", str(config), env={"ARCHIVER_ENABLED": "true"})

    assert result.exit_code == 0, result.output
    assert sqlite_database.count("flow_run") == 0


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_database_url(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", database_url="not a url", enabled=True)
    assert_one_line_error(invoke("run", "--config", str(config)), "is not a database URL", "Try:")


def test_missing_sqlite_file(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml", database_url=f"sqlite+aiosqlite:///{tmp_path}/nope.db"
    )
    assert_one_line_error(invoke("run", "--config", str(config)), "no SQLite database at")


def test_not_a_prefect_database(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    config = write_config(
        tmp_path / "c.toml",
        database_url=f"sqlite+aiosqlite:///{path}",
        storage_url=str(tmp_path / "a"),
        enabled=True,
    )
    assert_one_line_error(invoke("run", "--config", str(config)), "not a Prefect database")


@pytest.mark.postgres
def test_wrong_postgres_credentials(tmp_path: Path) -> None:
    url = "postgresql+asyncpg://no_such_user:pw@127.0.0.1:5432/postgres"
    config = write_config(tmp_path / "c.toml", database_url=url, storage_url=str(tmp_path))
    result = invoke("run", "--config", str(config))
    assert_one_line_error(result, "refused the credentials", "check the user and password")
    assert "pw@" not in result.stderr


@pytest.mark.postgres
def test_unreachable_postgres(tmp_path: Path) -> None:
    url = "postgresql+asyncpg://postgres@127.0.0.1:1/postgres"
    config = write_config(tmp_path / "c.toml", database_url=url, storage_url=str(tmp_path))
    assert_one_line_error(invoke("run", "--config", str(config)), "cannot connect to the database")


def test_retention_under_an_hour(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", retention_period=600)
    assert_one_line_error(invoke("run", "--config", str(config)), "at least 1 hour")


def test_missing_bucket_deletes_nothing(
    tmp_path: Path, database: TestDatabase, s3_storage: TestStorage
) -> None:
    factory.make_tree(database, end_time=EXPIRED)
    before = factory.snapshot(database)
    config = write_config(
        tmp_path / "c.toml",
        database_url=database.url,
        storage_url="s3://no-such-bucket/archive",
        storage_options=s3_storage.options,
        retention_period="P30D",
        enabled=True,
    )

    result = invoke("run", "--config", str(config))

    assert_one_line_error(result, "no-such-bucket", "not found")
    assert factory.snapshot(database) == before


def test_storage_path_that_is_a_file(tmp_path: Path, sqlite_database: TestDatabase) -> None:
    factory.make_tree(sqlite_database, end_time=EXPIRED)
    before = factory.snapshot(sqlite_database)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the archive folder should be")
    config = write_config(
        tmp_path / "c.toml",
        database_url=sqlite_database.url,
        storage_url=str(blocker / "archive"),
        retention_period="P30D",
        enabled=True,
    )

    result = invoke("run", "--config", str(config))

    assert_one_line_error(result, "failed")
    assert factory.snapshot(sqlite_database) == before


def test_help_for_every_command() -> None:
    for command in ("run", "recover", "plan", "doctor"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout


def test_missing_end_time_index_is_reported(
    tmp_path: Path, database: TestDatabase, local_storage: TestStorage
) -> None:
    database.execute("DROP INDEX ix_flow_run__end_time_desc")

    result = invoke("run", "--config", str(config_for(tmp_path, database, local_storage)))

    assert result.exit_code == 0, result.output
    assert "warning: flow_run has no index on end_time" in result.stderr
