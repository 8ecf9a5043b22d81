"""Reclaiming space after a run (`--vacuum`): the SQLite file shrinks; PostgreSQL is vacuumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from archiver.cli.app import app
from archiver.cli.console import _statements
from archiver.source.maintenance import sqlite_file_bytes
from tests import factory
from tests.factory import TestDatabase, TestStorage
from tests.helpers import EXPIRED, RECENT, archive, write_config


@pytest.mark.sqlite
def test_vacuum_shrinks_the_sqlite_file(
    sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    factory.make_trees(sqlite_database, 40, end_time=EXPIRED, task_runs=4, logs_per_run=20)
    factory.make_tree(sqlite_database, end_time=RECENT)
    path = sqlite_database.sqlite_file
    sqlite_database.dispose()  # the test's own engine holds no pages of the WAL
    grown = sqlite_file_bytes(path)

    report = archive(sqlite_database, local_storage, vacuum=True)

    assert report.archived_roots == 40
    done = report.maintenance
    assert done is not None and done.warnings == []
    assert done.statements == ["VACUUM", "PRAGMA wal_checkpoint(TRUNCATE)"]
    assert done.bytes_before is not None and done.bytes_after is not None
    assert done.bytes_before >= grown  # deleting alone did not give anything back
    assert done.bytes_after == path.stat().st_size
    assert done.bytes_after < grown * 0.8, (grown, done.bytes_after)
    assert sqlite_database.count("flow_run") == 1


@pytest.mark.sqlite
def test_incremental_auto_vacuum_is_used_when_enabled(
    sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    import sqlite3

    path = sqlite_database.sqlite_file
    sqlite_database.dispose()
    with sqlite3.connect(path) as connection:  # auto_vacuum changes only through a VACUUM
        connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
        connection.execute("VACUUM")
    factory.make_trees(sqlite_database, 20, end_time=EXPIRED, logs_per_run=20)

    report = archive(sqlite_database, local_storage, vacuum=True)

    done = report.maintenance
    assert done is not None and done.statements[0] == "PRAGMA incremental_vacuum"
    assert done.bytes_after is not None and done.bytes_before is not None
    assert done.bytes_after < done.bytes_before


@pytest.mark.postgres
def test_vacuum_analyzes_the_touched_tables_on_postgres(
    postgres_database: TestDatabase, local_storage: TestStorage
) -> None:
    factory.make_trees(postgres_database, 10, end_time=EXPIRED)

    report = archive(postgres_database, local_storage, vacuum=True)

    done = report.maintenance
    assert done is not None and done.warnings == []
    assert "VACUUM (ANALYZE, SKIP_LOCKED) flow_run" in done.statements
    assert "VACUUM (ANALYZE, SKIP_LOCKED) log" in done.statements
    assert not any("task_run_state_cache" in s for s in done.statements)  # nothing deleted there
    assert _statements(done.statements).startswith("VACUUM (ANALYZE, SKIP_LOCKED) log, ")
    vacuumed = postgres_database.scalar(
        "SELECT count(*) FROM pg_stat_user_tables WHERE relname = 'flow_run'"
        " AND last_vacuum IS NOT NULL AND last_analyze IS NOT NULL"
    )
    assert vacuumed == 1
    assert done.bytes_before and done.bytes_after


def test_no_vacuum_unless_asked_or_nothing_archived(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    factory.make_tree(database, end_time=EXPIRED)
    assert archive(database, local_storage).maintenance is None
    assert archive(database, local_storage, vacuum=True).maintenance is None  # nothing left


@pytest.mark.sqlite
def test_run_vacuum_on_the_command_line(
    tmp_path: Path, sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    factory.make_trees(sqlite_database, 5, end_time=EXPIRED, logs_per_run=10)
    config = write_config(
        tmp_path / "c.toml",
        local_storage,
        database_url=sqlite_database.url,
        retention_period="P30D",
        batch_interval=0,
    )

    result = CliRunner().invoke(app, ["run", "--yes", "--vacuum", "--config", str(config)])

    assert result.exit_code == 0, result.output
    assert "reclaimed space: VACUUM, PRAGMA wal_checkpoint(TRUNCATE)" in result.stderr
    assert "database file" in result.stderr and " MB -> " in result.stderr
    report = json.loads(result.stdout.splitlines()[-1])  # stdout is not a terminal: JSON lines
    assert report["maintenance"]["statements"][0] == "VACUUM"
