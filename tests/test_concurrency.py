"""Several archivers at once, and Prefect writing while archiver works."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import factory, kill
from tests.factory import TestDatabase, TestStorage
from tests.helpers import EXPIRED, NOW, RECENT, archive
from tests.oracle import assert_archive_consistent, assert_nothing_lost, committed_ids, ledger


def run_together(
    db: TestDatabase, storage: TestStorage, count: int, batch_size: int, tmp_path: Path
) -> list[dict[str, Any]]:
    """Start ``count`` archiver processes and let them go at the same moment."""
    start_file = tmp_path / "go"
    job = kill.Job.of("run", db, storage, batch_size=batch_size)
    children = [kill.start(job, start_file=start_file) for _ in range(count)]
    outputs = []
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("go.*.ready"))) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        start_file.touch()
        for child in children:
            out, err = child.communicate(timeout=300)
            outputs.append((child.returncode, out, err))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    for returncode, _, err in outputs:
        assert returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outputs]


@pytest.mark.parametrize("archivers", [2, 4])
def test_archivers_on_postgres_share_the_backlog(
    postgres_database: TestDatabase, local_storage: TestStorage, archivers: int, tmp_path: Path
) -> None:
    storage = local_storage
    ends = [EXPIRED - timedelta(seconds=i) for i in range(1500)]
    factory.make_trees(postgres_database, len(ends), end_time=ends, task_runs=1, logs_per_run=1)
    before = factory.snapshot_ids(postgres_database)

    reports = run_together(postgres_database, storage, archivers, 25, tmp_path)

    worked = [r for r in reports if r["batches"]]
    assert len(worked) >= 2, "the archivers did not work in parallel"
    batch_roots = [m["root_ids"] for m in ledger(postgres_database).values()]
    all_roots = [root for roots in batch_roots for root in roots]
    assert len(all_roots) == len(set(all_roots)) == 1500  # disjoint, and all of them
    assert postgres_database.count("flow_run") == 0
    assert_nothing_lost(postgres_database, storage, before)
    assert_archive_consistent(postgres_database, storage)


def test_archivers_on_sqlite_take_turns(
    sqlite_database: TestDatabase, local_storage: TestStorage, tmp_path: Path
) -> None:
    ends = [EXPIRED - timedelta(seconds=i) for i in range(300)]
    factory.make_trees(sqlite_database, len(ends), end_time=ends, task_runs=1)
    before = factory.snapshot_ids(sqlite_database)

    run_together(sqlite_database, local_storage, 2, 20, tmp_path)

    assert sqlite_database.count("flow_run") == 0
    assert_nothing_lost(sqlite_database, local_storage, before)
    assert_archive_consistent(sqlite_database, local_storage)


class PrefectWriter(threading.Thread):
    """Writes like a busy Prefect server: logs for old runs, new runs, logs for new runs."""

    def __init__(self, db: TestDatabase, old_root_ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.old_root_ids = old_root_ids
        self.stop = threading.Event()
        self.log_ids: list[str] = []
        self.new_trees: list[factory.Tree] = []

    def run(self) -> None:
        i = 0
        while not self.stop.is_set() and i < 400:
            target = self.old_root_ids[i % len(self.old_root_ids)]
            self.log_ids.append(factory.make_log(self.db, flow_run_id=target))
            if i % 10 == 0:
                tree = factory.make_tree(self.db, end_time=RECENT, task_runs=1)
                self.new_trees.append(tree)
                self.log_ids.append(factory.make_log(self.db, flow_run_id=tree.root_id))
            i += 1
            time.sleep(0.002)


def test_prefect_writing_during_a_run_loses_nothing(
    database: TestDatabase, storage: TestStorage
) -> None:
    trees = factory.make_trees(
        database, 120, end_time=[EXPIRED - timedelta(minutes=i) for i in range(120)]
    )
    before = factory.snapshot_ids(database)
    writer = PrefectWriter(database, [tree.root_id for tree in trees])
    writer.start()
    try:
        archive(database, storage, batch_size=10, now=NOW)
    finally:
        writer.stop.set()
        writer.join(timeout=60)

    assert not writer.is_alive() and writer.log_ids
    assert_nothing_lost(database, storage, before)
    archived_logs = set(committed_ids(database, storage)["log"])
    in_db = database.ids("log")
    for log_id in writer.log_ids:
        assert (log_id in in_db) != (log_id in archived_logs), "a log written during the run"
    new_roots = {tree.root_id for tree in writer.new_trees}
    assert new_roots <= database.ids("flow_run"), "young runs written during the run survive"
    assert_archive_consistent(database, storage)


def test_runs_locked_by_another_archiver_are_passed_over(
    postgres_database: TestDatabase, local_storage: TestStorage
) -> None:
    older = factory.make_tree(postgres_database, end_time=EXPIRED - timedelta(days=60))
    newer = factory.make_tree(postgres_database, end_time=EXPIRED)
    with postgres_database.engine.connect() as other:  # another archiver's open batch
        other.exec_driver_sql(
            "SELECT id FROM flow_run WHERE id = %(id)s FOR UPDATE", {"id": older.root_id}
        )
        report = archive(postgres_database, local_storage)
        other.rollback()

    assert report.archived_roots == 1
    assert postgres_database.ids("flow_run") == set(older.flow_run_ids)
    assert newer.root_id not in postgres_database.ids("flow_run")


def test_live_trees_are_not_locked_while_a_batch_runs(
    postgres_database: TestDatabase, local_storage: TestStorage
) -> None:
    live = factory.make_tree(
        postgres_database, end_time=EXPIRED, subflow_depth=1, subflow_state_type="RUNNING"
    )
    factory.make_tree(postgres_database, end_time=EXPIRED - timedelta(hours=1))
    locked_by_prefect: list[int] = []

    def prefect_updates_the_live_runs(step: str, batch_id: str) -> None:
        if step == "gathered":  # NOWAIT fails at once if archiver holds a conflicting lock
            with postgres_database.engine.connect() as other:
                subflows = other.exec_driver_sql(  # Prefect updating the live subflow
                    "SELECT id FROM flow_run WHERE id = ANY(%(ids)s) FOR UPDATE NOWAIT",
                    {"ids": live.subflow_ids},
                ).all()
                root = other.exec_driver_sql(  # Prefect adding a row under the root
                    "SELECT id FROM flow_run WHERE id = %(id)s FOR KEY SHARE NOWAIT",
                    {"id": live.root_id},
                ).all()
                locked_by_prefect.append(len(subflows) + len(root))
                other.rollback()

    report = archive(postgres_database, local_storage, hook=prefect_updates_the_live_runs)

    assert locked_by_prefect == [len(live.flow_run_ids)]
    assert report.archived_roots == 1 and report.skipped_roots == [live.root_id]
