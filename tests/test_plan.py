"""`archiver plan`: what a run would archive, counted without writing, deleting or locking."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from typer.testing import CliRunner

from archiver.cli.app import app
from archiver.cli.plan import Plan, plan
from archiver.source.engine import DatabaseOptions, create_engine, read_only_connection
from tests import factory
from tests.factory import TestDatabase, TestStorage
from tests.helpers import EXPIRED, RECENT, archive, options, write_config

LAST_MONTH = EXPIRED - timedelta(days=31)


def make_mixed_trees(db: TestDatabase) -> None:
    """Two months of expired trees, with every kind of row a batch takes, and trees it leaves."""
    factory.make_trees(db, 4, end_time=LAST_MONTH, task_runs=3, subflow_depth=1)
    trees = factory.make_trees(
        db, 3, end_time=EXPIRED, task_run_state_cache=True, keyed_artifact_key="report"
    )
    # a task run's log without a flow run id is taken through the task run
    factory.make_log(db, task_run_id=trees[0].task_run_ids[0])
    factory.make_tree(db, end_time=EXPIRED, subflow_depth=1, subflow_state_type="RUNNING")
    factory.make_tree(db, end_time=RECENT)
    factory.make_tree(db, end_time=EXPIRED, state_type="PAUSED")


def plan_json(
    tmp_path: Path, db: TestDatabase, storage: TestStorage, **settings: Any
) -> dict[str, Any]:
    config = write_config(
        tmp_path / "plan.toml",
        storage,
        database_url=db.url,
        retention_period="P30D",
        **settings,
    )
    result = CliRunner().invoke(app, ["plan", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_plan_counts_what_the_next_run_archives(
    tmp_path: Path, database: TestDatabase, local_storage: TestStorage
) -> None:
    make_mixed_trees(database)
    before = factory.snapshot(database)

    planned = plan_json(tmp_path, database, local_storage, batch_size=3)

    assert factory.snapshot(database) == before and local_storage.list_files("") == []
    report = archive(database, local_storage, batch_size=3)
    assert planned["rows"] == {table: report.rows.get(table, 0) for table in planned["rows"]}
    assert planned["rows"]["task_run_state_cache"] > 0 and planned["rows"]["log"] > 0
    assert planned["roots"] == report.archived_roots == 7
    assert planned["batches"] == len(report.batches) >= 3  # batches keep to one month
    # (the run's own skipped_roots misses a batch whose roots were all skipped)
    assert planned["skipped_roots"] == 1 and database.count("flow_run", "state_type = 'RUNNING'")
    assert planned["expired_roots"] == 8  # 7 + the live one; the PAUSED root is not expired
    assert planned["oldest_end_time"].startswith(f"{LAST_MONTH:%Y-%m-%d}")
    # the estimate comes from encoding one batch as a run does: close to what was written
    assert 0.8 * report.bytes < planned["total_estimated_bytes"] < 1.25 * report.bytes
    assert "measured on the first" in planned["estimate_method"]
    assert planned["rules"] == []  # no retention policies configured
    assert set(planned["sweeps"].values()) == {0} and report.sweep_batches == []  # no orphans


def test_plan_stops_where_max_batches_stops_a_run(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    factory.make_trees(database, 5, end_time=EXPIRED)

    planned = asyncio.run(plan(options(database, local_storage, batch_size=2, max_batches=2)))

    report = archive(database, local_storage, batch_size=2, max_batches=2)
    assert planned.limited_by_max_batches and planned.batches == 2
    assert planned.roots == report.archived_roots == 4
    assert planned.rows == {table: report.rows.get(table, 0) for table in planned.rows}


@pytest.mark.postgres
def test_plan_does_not_wait_for_row_locks(
    postgres_database: TestDatabase, local_storage: TestStorage
) -> None:
    factory.make_trees(postgres_database, 3, end_time=EXPIRED)
    dsn = f"host=127.0.0.1 port=5432 user=postgres dbname={postgres_database.name}"
    with psycopg.connect(dsn) as holder:  # Prefect updating every run, uncommitted
        holder.execute("SELECT id FROM flow_run FOR UPDATE").fetchall()
        holder.execute("SELECT id FROM task_run FOR UPDATE").fetchall()
        database = options(postgres_database, local_storage).database
        quick = options(
            postgres_database,
            local_storage,
            database=type(database)(database.url, lock_timeout=1),
        )
        planned = asyncio.run(plan(quick))
        holder.rollback()
    assert planned.roots == 3 and planned.rows["flow_run"] == 3


def test_plan_warns_about_what_would_make_a_run_slow_or_unsafe(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    database.execute("DROP INDEX ix_log__flow_run_id")
    database.execute("DROP INDEX ix_log__flow_run_id_timestamp")
    if database.is_sqlite:
        database.dispose()
        with sqlite3.connect(database.sqlite_file) as connection:
            connection.execute("PRAGMA journal_mode = DELETE")

    result: Plan = asyncio.run(
        plan(options(database, local_storage, retention_period=timedelta(hours=6)))
    )

    text = "\n".join(result.warnings)
    assert "log has no index on flow_run_id" in text
    assert "under a day" in text
    assert ("journal_mode is delete" in text) == database.is_sqlite
    assert result.expired_roots == 0 and result.total_rows == 0


@pytest.mark.sqlite
def test_plan_table_on_a_terminal(
    tmp_path: Path, sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    factory.make_trees(sqlite_database, 2, end_time=EXPIRED)
    config = write_config(
        tmp_path / "c.toml",
        local_storage,
        database_url=sqlite_database.url,
        retention_period="P30D",
    )

    result = CliRunner().invoke(app, ["plan", "--config", str(config)])

    assert result.exit_code == 0, result.output
    assert "2 expired top-level runs" in result.stdout
    assert "a run would archive 2 in 1 batches" in result.stdout
    for table in ("flow_run", "task_run_state", "log", "total"):
        assert table in result.stdout
    assert "estimate: each table's Parquet size" in result.stdout
    assert sqlite_database.count("flow_run") == 2


def test_plan_reads_through_a_connection_that_refuses_writes(database: TestDatabase) -> None:
    async def try_to_write() -> str:
        engine = create_engine(DatabaseOptions(database.url))
        try:
            async with read_only_connection(engine) as conn:
                try:
                    await conn.execute(text("CREATE TABLE archiver_plan_probe (x integer)"))
                except SQLAlchemyError as exc:
                    return str(exc)
            return "written"
        finally:
            await engine.dispose()

    refused = asyncio.run(try_to_write())

    assert "read-only" in refused or "readonly" in refused, refused
