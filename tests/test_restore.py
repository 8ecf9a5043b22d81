"""archiver restore: archived rows go back, column for column, into PostgreSQL or SQLite."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from archiver.cli.app import app
from archiver.engine.restore import RestoreOptions, RestoreReport, restore
from archiver.errors import ArchiverError
from archiver.source.engine import DatabaseOptions
from tests import factory
from tests.factory import RUN_TABLES, TestDatabase, TestStorage
from tests.helpers import EXPIRED, archive
from tests.oracle import (
    archived_ids,
    assert_archive_consistent,
    assert_nothing_lost,
    field_kinds,
    normalise,
)


def restore_into(db: TestDatabase, storage: TestStorage, **selection: Any) -> RestoreReport:
    options = RestoreOptions(
        database=DatabaseOptions(db.url),
        storage_url=storage.url,
        storage_options=storage.options,
        **selection,
    )
    return asyncio.run(restore(options))


def make_trees(db: TestDatabase, count: int) -> list[factory.Tree]:
    return [
        factory.make_tree(db, end_time=EXPIRED - timedelta(minutes=i), subflow_depth=1,
                          artifacts=4, task_run_state_cache=True)
        for i in range(count)
    ]  # fmt: skip


def test_round_trip_into_the_same_database(database: TestDatabase, storage: TestStorage) -> None:
    make_trees(database, 3)
    before = factory.snapshot(database)
    archive(database, storage, batch_size=2)
    assert database.count("flow_run") == 0

    report = restore_into(database, storage, ended_after=EXPIRED - timedelta(days=1))

    assert report.runs == 3 and len(report.batches) == 2
    assert factory.snapshot(database) == before


@pytest.mark.sqlite
@pytest.mark.postgres
def test_round_trip_from_sqlite_into_postgres(
    sqlite_database: TestDatabase, postgres_database: TestDatabase, local_storage: TestStorage
) -> None:
    make_trees(sqlite_database, 2)
    before = factory.snapshot(sqlite_database)
    factory.make_flow(postgres_database)  # the target has flows of its own
    archive(sqlite_database, local_storage)

    restore_into(postgres_database, local_storage, ended_after=EXPIRED - timedelta(days=1))

    for table in RUN_TABLES:
        kinds = field_kinds(local_storage, table)
        after = factory.db_rows(postgres_database, table)
        assert set(after) == set(before[table]), table
        for row_id, original in before[table].items():
            for column, value in original.items():
                want, got = (
                    normalise(kinds[column], value),
                    normalise(kinds[column], after[row_id][column]),
                )
                if kinds[column] == "json" and want is not None:
                    assert json.loads(got) == json.loads(want), (table, column)
                else:
                    assert got == want, (table, column)


def test_restore_one_run_out_of_many(database: TestDatabase, storage: TestStorage) -> None:
    trees = make_trees(database, 3)
    archive(database, storage)

    report = restore_into(database, storage, run_ids=(trees[1].root_id,))

    assert report.runs == 1
    assert database.ids("flow_run") == set(trees[1].flow_run_ids)
    assert database.ids("task_run") == set(trees[1].task_run_ids)
    assert database.ids("log") == set(trees[1].log_ids)


def test_existing_rows_are_skipped_or_refused(
    sqlite_database: TestDatabase, postgres_database: TestDatabase, local_storage: TestStorage
) -> None:
    trees = make_trees(sqlite_database, 2)
    archive(sqlite_database, local_storage)
    # a copy into another database, then again: every row is there already
    first = restore_into(postgres_database, local_storage, run_ids=(trees[0].root_id,))
    before = factory.snapshot(postgres_database)

    again = restore_into(postgres_database, local_storage, run_ids=(trees[0].root_id,))
    with pytest.raises(ArchiverError, match="already exist"):
        restore_into(
            postgres_database, local_storage, run_ids=(trees[0].root_id,), on_conflict="error"
        )

    assert first.inserted["flow_run"] == 2 and again.inserted["flow_run"] == 0
    assert again.existing["flow_run"] == 2
    assert factory.snapshot(postgres_database) == before


def test_dry_run_writes_nothing(database: TestDatabase, storage: TestStorage) -> None:
    trees = make_trees(database, 1)
    archive(database, storage)

    report = restore_into(database, storage, run_ids=(trees[0].root_id,), dry_run=True)

    assert report.inserted["flow_run"] == 2 and database.count("flow_run") == 0


def test_unknown_run_id_is_a_clear_error(database: TestDatabase, storage: TestStorage) -> None:
    make_trees(database, 1)
    archive(database, storage)
    with pytest.raises(ArchiverError, match="no archived top-level run"):
        restore_into(database, storage, run_ids=("00000000-0000-4000-8000-000000000000",))


def test_restore_command(
    tmp_path: Path, sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    trees = make_trees(sqlite_database, 2)
    archive(sqlite_database, local_storage)
    config = tmp_path / "archiver.toml"
    config.write_text(
        f'database_url = "{sqlite_database.url}"\nstorage_url = "{local_storage.url}"\n'
    )

    dry = CliRunner().invoke(app, ["restore", trees[0].root_id, "-c", str(config), "--dry-run"])
    real = CliRunner().invoke(app, ["restore", trees[0].root_id, "-c", str(config)])

    assert dry.exit_code == 0 and "would restore 1 runs" in dry.stdout
    assert real.exit_code == 0 and "restored 1 runs" in real.stdout
    assert sqlite_database.ids("flow_run") == set(trees[0].flow_run_ids)


def test_restore_moves_rows_out_of_the_archive_so_they_can_be_archived_again(
    database: TestDatabase, storage: TestStorage
) -> None:
    trees = make_trees(database, 3)
    before = factory.snapshot_ids(database)
    archive(database, storage)  # one batch with all three

    report = restore_into(database, storage, run_ids=(trees[1].root_id,))

    assert len(report.rewritten) == 1
    assert archived_ids(storage)["flow_run"] == set(trees[0].flow_run_ids) | set(
        trees[2].flow_run_ids
    )
    assert_nothing_lost(database, storage, before)
    assert_archive_consistent(database, storage)

    archive(database, storage)  # the restored run expires again

    assert database.count("flow_run") == 0
    assert_nothing_lost(database, storage, before)  # every row once, no duplicates
    assert_archive_consistent(database, storage)


def test_restore_into_another_database_copies(
    sqlite_database: TestDatabase, postgres_database: TestDatabase, local_storage: TestStorage
) -> None:
    trees = make_trees(sqlite_database, 2)
    archive(sqlite_database, local_storage)
    files_before = local_storage.keys("")

    report = restore_into(postgres_database, local_storage, run_ids=(trees[0].root_id,))

    assert report.rewritten == [] and local_storage.keys("") == files_before
    assert postgres_database.ids("flow_run") == set(trees[0].flow_run_ids)


def test_columns_that_differ_between_archive_and_target(
    database: TestDatabase, storage: TestStorage
) -> None:
    tree = make_trees(database, 1)[0]
    archive(database, storage)
    database.execute("ALTER TABLE flow_run DROP COLUMN infrastructure_pid")
    database.execute("ALTER TABLE flow_run ADD COLUMN added_later VARCHAR DEFAULT 'new default'")

    report = restore_into(database, storage, run_ids=(tree.root_id,))

    assert report.dropped_columns == {"flow_run": ["infrastructure_pid"]}
    values = database.rows("SELECT added_later FROM flow_run")
    assert values and {row["added_later"] for row in values} == {"new default"}
