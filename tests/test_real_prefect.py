"""Archive a database that Prefect itself wrote, by running real flows against it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from archiver.engine.restore import RestoreOptions, restore
from archiver.source.engine import DatabaseOptions
from tests import factory
from tests.factory import RUN_TABLES, TestDatabase, TestStorage
from tests.helpers import NOW, archive
from tests.oracle import archived_rows, assert_archive_equals

ROOT = Path(__file__).resolve().parent.parent


def run_prefect_flows(db: TestDatabase, home: Path, parents: int) -> None:
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=db.url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.prefect_flows", str(parents)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_archive_what_prefect_wrote(
    database: TestDatabase, local_storage: TestStorage, tmp_path: Path
) -> None:
    run_prefect_flows(database, tmp_path / "prefect-home", parents=2)
    before = factory.snapshot(database)
    assert len(before["flow_run"]) == 6  # 2 parents x (1 + 2 subflows)
    assert before["task_run"] and before["task_run_state"] and before["log"]

    # Prefect's runs just ended; archive them as if two days had passed.
    report = archive(database, local_storage, retention_period=timedelta(days=1),
                     now=NOW + timedelta(days=2))  # fmt: skip

    assert report.archived_roots == 2
    # the key's only artifacts left with the runs, so its collection was archived too
    rows = report.rows
    assert rows.pop("artifact_collection") == 1
    assert database.count("artifact_collection") == 0
    assert rows == {table: len(rows) for table, rows in before.items()}
    for table in RUN_TABLES:
        assert database.count(table) == 0, table
        assert_archive_equals(local_storage, table, before[table])
    subflows = [r for r in archived_rows(local_storage, "flow_run").values()
                if r["parent_task_run_id"]]  # fmt: skip
    assert len(subflows) == 4


def read_through_prefect(db: TestDatabase, home: Path) -> dict[str, Any]:
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_DATABASE_CONNECTION_URL=db.url)
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.prefect_read"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    described: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return described


def test_prefect_shows_a_restored_run_as_it_was(
    database: TestDatabase, local_storage: TestStorage, tmp_path: Path
) -> None:
    home = tmp_path / "prefect-home"
    run_prefect_flows(database, home, parents=1)
    as_prefect_wrote_it = read_through_prefect(database, home)
    assert len(as_prefect_wrote_it) == 3 and all(r["logs"] for r in as_prefect_wrote_it.values())
    archive(database, local_storage, retention_period=timedelta(days=1),
            now=NOW + timedelta(days=2))  # fmt: skip
    assert database.count("flow_run") == 0

    restore_into = RestoreOptions(
        database=DatabaseOptions(database.url),
        storage_url=local_storage.url,
        ended_after=NOW - timedelta(days=1),
    )
    asyncio.run(restore(restore_into))

    assert read_through_prefect(database, home) == as_prefect_wrote_it
