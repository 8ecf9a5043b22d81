"""Nothing is lost: crash archiver at every step, recover, and account for every row.

Two kinds of fault at each step of a batch (archiver.engine.run.STEPS):
* a hard kill: ``SIGKILL`` of a child process running ``archiver run`` (no clean-up runs);
* an exception raised in process (the batch's own error handling runs).
After each: every row is in the database or in a committed batch, never both and never
neither; then a second run recovers and finishes, and the archive matches its manifests.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from archiver.archive.storage import Storage
from archiver.engine.recovery import recover
from archiver.engine.run import STEPS
from archiver.source.engine import DatabaseOptions, create_engine
from tests import factory
from tests.helpers import EXPIRED, RETENTION, archive, fail_at, killed_at
from tests.oracle import RUN_TABLES, assert_archive_consistent, assert_nothing_lost

ROOT = Path(__file__).resolve().parent.parent
CRASH_POINTS = [step for step in STEPS if step != "done"]


def make_backlog(db: Any) -> dict[str, set[str]]:
    """Five expired trees (two batches of two and one of one), with subflows."""
    for i in range(5):
        factory.make_tree(db, end_time=EXPIRED - timedelta(minutes=i), subflow_depth=i % 2)
    return {table: db.ids(table) for table in RUN_TABLES}


def crash_in_child(db: Any, storage: Any, step: str, occurrence: int) -> None:
    spec = {
        "database_url": db.url,
        "storage_url": storage.url,
        "storage_options": storage.options,
        "retention_seconds": RETENTION.total_seconds(),
        "batch_size": 2,
        "kill_at": step,
        "occurrence": occurrence,
    }
    child = subprocess.run(
        [sys.executable, "-m", "tests.crash_runner", json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]


def finish_and_check(db: Any, storage: Any, before: dict[str, set[str]]) -> None:
    report = archive(db, storage, batch_size=2)
    assert_nothing_lost(db, storage, before)
    assert_archive_consistent(db, storage)
    assert db.count("flow_run") == 0, "the second run did not finish the backlog"
    assert report.recovered or report.batches


@pytest.mark.parametrize("step", CRASH_POINTS)
def test_sigkill_at_every_step(database: Any, storage: Any, step: str) -> None:
    before = make_backlog(database)
    # the second batch, so that one committed batch already sits in the archive
    occurrence = 2 if step != "file" else 3

    crash_in_child(database, storage, step, occurrence)

    assert_nothing_lost(database, storage, before)
    finish_and_check(database, storage, before)


@pytest.mark.parametrize("step", CRASH_POINTS)
def test_exception_at_every_step(database: Any, storage: Any, step: str) -> None:
    before = make_backlog(database)

    with pytest.raises(RuntimeError, match="injected fault"):
        archive(database, storage, hook=fail_at(step), batch_size=2)

    assert_nothing_lost(database, storage, before)
    finish_and_check(database, storage, before)


def test_recover_command_resolves_a_committed_batch_without_running_another(
    sqlite_database: Any, local_storage: Any
) -> None:
    before = make_backlog(sqlite_database)
    crash_in_child(sqlite_database, local_storage, "committed", 1)
    assert [k for k in local_storage.keys(".json") if k.startswith("_pending/")]

    async def recover_only() -> list[str]:
        engine = create_engine(DatabaseOptions(sqlite_database.url))
        try:
            return await recover(engine, Storage(local_storage.url, local_storage.options))
        finally:
            await engine.dispose()

    messages = asyncio.run(recover_only())

    assert len(messages) == 1 and "had committed" in messages[0]
    assert_nothing_lost(sqlite_database, local_storage, before)
    assert_archive_consistent(sqlite_database, local_storage)
    assert sqlite_database.count("flow_run") > 0  # recovery archives nothing new


def test_recovery_leaves_another_databases_batches_alone(
    sqlite_database: Any, local_storage: Any, sqlite_template: Path, tmp_path: Path
) -> None:
    before = make_backlog(sqlite_database)
    crash_in_child(sqlite_database, local_storage, "committed", 1)  # marker left open
    other_path = tmp_path / "other" / "prefect.db"
    other_path.parent.mkdir()
    shutil.copyfile(sqlite_template, other_path)
    other = factory.TestDatabase.sqlite(other_path)
    try:
        report = archive(other, local_storage)  # same archive root, another database
    finally:
        other.dispose()

    assert any("belongs to another database" in m for m in report.recovered)
    assert_nothing_lost(sqlite_database, local_storage, before)  # its committed files stay
    finish_and_check(sqlite_database, local_storage, before)


def restore_in_child(db: Any, storage: Any, root_id: str, kill_at: str) -> None:
    killed_at(
        kill_at,
        "from archiver.engine.restore import RestoreOptions, restore\n"
        "from archiver.source.engine import DatabaseOptions",
        f"options = RestoreOptions(DatabaseOptions({db.url!r}), {storage.url!r}, "
        f"{storage.options!r}, run_ids=({root_id!r},))\n"
        "asyncio.run(restore(options, hook))",
        ROOT,
    )


@pytest.mark.parametrize("step", ["rewritten", "committed"])
def test_restore_killed_mid_rewrite_is_resolved(database: Any, storage: Any, step: str) -> None:
    trees = [factory.make_tree(database, end_time=EXPIRED - timedelta(minutes=i))
             for i in range(2)]  # fmt: skip
    before = {table: database.ids(table) for table in RUN_TABLES}
    archive(database, storage)

    restore_in_child(database, storage, trees[0].root_id, step)

    assert_nothing_lost(database, storage, before)
    restored = trees[0].root_id in database.ids("flow_run")
    assert restored == (step == "committed")
    finish_and_check(database, storage, before)  # recovery, then the backlog again


def _partial_marker(storage: Any, batch_id: str) -> Path:
    """What a kill while writing a batch's marker leaves on a local disk."""
    path = Path(storage.url) / "_pending" / f".{batch_id}.json.partial"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"batch_id": "')  # cut short
    return path


def test_a_half_written_marker_is_removed_by_recovery(database: Any, local_storage: Any) -> None:
    before = make_backlog(database)
    partial = _partial_marker(local_storage, "20260101T000000Z-0123456789ab")

    report = archive(database, local_storage, batch_size=2)

    assert not partial.exists()
    assert any("while writing its marker" in message for message in report.recovered)
    assert_nothing_lost(database, local_storage, before)
    assert_archive_consistent(database, local_storage)


@pytest.mark.postgres
def test_a_half_written_marker_of_a_running_batch_is_left_alone(
    postgres_database: Any, local_storage: Any
) -> None:
    from sqlalchemy import text

    from archiver.source.ledger import _lock_key

    batch_id = "20260101T000000Z-0123456789ab"
    partial = _partial_marker(local_storage, batch_id)
    with postgres_database.engine.connect() as other:  # the batch's own archiver, alive
        other.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _lock_key(batch_id)})
        archive(postgres_database, local_storage)
        assert partial.exists()
        other.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _lock_key(batch_id)})
    archive(postgres_database, local_storage)
    assert not partial.exists()
