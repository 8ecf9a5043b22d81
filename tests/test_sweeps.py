"""Sweeps on PostgreSQL and SQLite with Prefect's schema: orphans, standalone task runs,
artifact collections and events are archived under the commit protocol, and only when old."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from archiver.archive.catalog import list_batches
from archiver.archive.show import show_run
from archiver.archive.storage import Storage
from archiver.archive.verify import verify_archive
from archiver.cli.app import app
from archiver.engine.restore import RestoreOptions, restore
from archiver.engine.sweeps import SweepOptions, count_sweeps
from archiver.source.engine import DatabaseOptions, create_engine
from archiver.source.schema import inspect_schema
from tests import factory, kill
from tests.factory import RUN_TABLES, TestDatabase, TestStorage
from tests.helpers import EXPIRED, NOW, RECENT, RETENTION, archive, fail_at, write_config
from tests.oracle import archived_rows, assert_archive_consistent, assert_nothing_lost

SWEEP_TABLES = ("events", "event_resources", "artifact_collection")
#: Every table a run or a sweep may take rows from.
TAKEN_TABLES = (*RUN_TABLES, *SWEEP_TABLES)


def make_orphans(db: TestDatabase) -> dict[str, Any]:
    """Old orphans of every kind the default sweeps take, and rows that must stay."""
    live = factory.make_tree(db, end_time=None)  # a running flow run
    made = {
        "live": live,
        "old_logs": [
            factory.make_log(db, flow_run_id=factory.uuid4(), timestamp=EXPIRED - timedelta(i))
            for i in range(5)
        ]
        + [factory.make_log(db, task_run_id=factory.uuid4(), timestamp=EXPIRED)],
        "young_log": factory.make_log(db, flow_run_id=factory.uuid4(), timestamp=RECENT),
        "live_old_log": factory.make_log(db, flow_run_id=live.root_id, timestamp=EXPIRED),
        "no_run_log": factory.make_log(db, timestamp=EXPIRED),  # names no run: not an orphan
        # key "alone": its only artifact is an orphan, so the collection goes too
        "alone": factory.make_artifact(
            db, flow_run_id=factory.uuid4(), key="alone", created=EXPIRED
        ),
        # key "shared": an older artifact of a live run stays, the collection follows it
        "kept_shared": factory.make_artifact(
            db, flow_run_id=live.root_id, key="shared", created=EXPIRED - timedelta(days=3)
        ),
        "orphan_shared": factory.make_artifact(
            db, flow_run_id=factory.uuid4(), key="shared", created=EXPIRED
        ),
        "young_artifact": factory.make_artifact(db, flow_run_id=factory.uuid4(), created=RECENT),
    }
    return made


def test_orphans_archived_young_and_live_rows_kept(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    made = make_orphans(database)
    expired = factory.make_tree(database, end_time=EXPIRED, subflow_depth=1)
    before = factory.snapshot_ids(database, TAKEN_TABLES)
    collection_before = database.rows('SELECT id, "key" FROM artifact_collection')

    report = archive(database, local_storage, sweep_batch_size=100)

    logs = database.ids("log")
    assert not set(made["old_logs"]) & logs, "old orphan logs were not swept"
    assert {made["young_log"], made["live_old_log"], made["no_run_log"]} <= logs
    tree_logs = set(expired.rows_by_table()["log"])
    assert set(archived_rows(local_storage, "log")) == set(made["old_logs"]) | tree_logs
    artifacts = database.ids("artifact")
    assert {made["kept_shared"], made["young_artifact"]} <= artifacts
    assert not {made["alone"], made["orphan_shared"]} & artifacts
    collections = {r["key"]: str(r["latest_id"]) for r in database.rows(
        'SELECT "key", latest_id FROM artifact_collection')}  # fmt: skip
    assert collections == {"shared": made["kept_shared"]}
    archived_collections = archived_rows(local_storage, "artifact_collection")
    alone_row = next(r for r in collection_before if r["key"] == "alone")
    assert set(archived_collections) == {str(alone_row["id"])}
    assert report.swept["orphans"]["log"] == 6 and report.swept["orphans"]["artifact"] == 2
    assert {m.kind for m in list_batches(Storage(local_storage.url))} == {"runs", "orphans"}
    view = show_run(Storage(local_storage.url), expired.subflow_ids[0])  # show still finds runs
    assert view.run["id"] == expired.subflow_ids[0]
    assert_nothing_lost(database, local_storage, before)
    assert_archive_consistent(database, local_storage)


def test_orphans_in_many_batches_with_kind_in_the_parquet_metadata(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    months = [EXPIRED - timedelta(days=31 * (i % 2), minutes=i) for i in range(9)]
    orphans = {factory.make_log(database, flow_run_id=factory.uuid4(), timestamp=t) for t in months}
    before = factory.snapshot_ids(database, TAKEN_TABLES)

    report = archive(database, local_storage, sweep_batch_size=2)

    assert not orphans & database.ids("log")
    assert len(report.sweep_batches) >= 5  # 9 rows, at most 2 a batch, split by month
    assert all(sum(b.rows.values()) <= 2 for b in report.sweep_batches)
    partitions = {m.partition for m in list_batches(Storage(local_storage.url))}
    assert partitions == {f"month={t:%Y-%m}" for t in months}
    for path in local_storage.list_files(".parquet"):
        with local_storage.fs().open(path, "rb") as handle:
            metadata = pq.read_schema(handle).metadata
        assert metadata[b"archiver.kind"] == b"orphans"
    assert_nothing_lost(database, local_storage, before)


def detach_task_run(db: TestDatabase, tree: factory.Tree) -> str:
    """Make the tree's first task run a background task run (no flow run), as `.delay()` does."""
    task_id = tree.task_run_ids[0]
    for table in ("log", "artifact"):
        db.execute(f"UPDATE {table} SET flow_run_id = NULL WHERE task_run_id = :t", {"t": task_id})
    db.execute("UPDATE task_run SET flow_run_id = NULL WHERE id = :t", {"t": task_id})
    return task_id


def test_standalone_task_runs_archived_with_states_and_logs(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    old, *others = [factory.make_tree(database, end_time=EXPIRED - timedelta(hours=i))
                    for i in range(3)]  # fmt: skip
    young = factory.make_tree(database, end_time=RECENT)
    old_task, young_task = detach_task_run(database, old), detach_task_run(database, young)
    other_tasks = {detach_task_run(database, tree) for tree in others}
    old_states = database.ids("task_run_state", "task_run_id = :t", {"t": old_task})
    old_logs = database.ids("log", "task_run_id = :t", {"t": old_task})
    assert old_states and old_logs
    before = factory.snapshot_ids(database, TAKEN_TABLES)

    report = archive(database, local_storage, sweep_batch_size=1)

    assert old_task not in database.ids("task_run") and young_task in database.ids("task_run")
    assert not other_tasks & database.ids("task_run")
    assert not old_states & database.ids("task_run_state")
    assert set(archived_rows(local_storage, "task_run_state")) >= old_states
    assert old_logs <= set(archived_rows(local_storage, "log"))
    assert report.swept["standalone_tasks"]["task_run"] == 3
    assert sum(1 for batch in report.sweep_batches if batch.kind == "standalone_tasks") == 3
    assert_nothing_lost(database, local_storage, before)


def test_a_standalone_task_runs_result_artifact_leaves_with_it(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    # A result artifact that names no run is no orphan: only its state leads to it.
    tree = factory.make_tree(database, end_time=EXPIRED)
    task_id = detach_task_run(database, tree)
    result = factory.make_artifact(database, created=EXPIRED)
    database.execute(
        "UPDATE task_run_state SET result_artifact_id = :a"
        " WHERE id = (SELECT state_id FROM task_run WHERE id = :t)",
        {"a": result, "t": task_id},
    )
    before = factory.snapshot_ids(database, TAKEN_TABLES)

    archive(database, local_storage)

    assert task_id not in database.ids("task_run")
    assert result not in database.ids("artifact")
    assert result in archived_rows(local_storage, "artifact")
    assert_nothing_lost(database, local_storage, before)


def test_collections_follow_the_artifacts_a_run_batch_archives(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    kept = factory.make_tree(database, end_time=RECENT, keyed_artifact_key="report")
    expired = factory.make_tree(database, end_time=EXPIRED, keyed_artifact_key="report")
    only = factory.make_tree(database, end_time=EXPIRED, keyed_artifact_key="only-expired")
    assert database.scalar("""SELECT latest_id FROM artifact_collection WHERE "key" = 'report'""")
    latest = {r["key"]: r for r in database.rows("SELECT * FROM artifact_collection")}
    assert str(latest["report"]["latest_id"]) == expired.keyed_artifact_id

    archive(database, local_storage, sweeps=())

    rows = {r["key"]: r for r in database.rows("SELECT * FROM artifact_collection")}
    assert set(rows) == {"report"}
    assert str(rows["report"]["latest_id"]) == kept.keyed_artifact_id
    artifact = database.rows("SELECT * FROM artifact WHERE id = :a", {"a": kept.keyed_artifact_id})
    for column in ("flow_run_id", "type", "description"):
        assert rows["report"][column] == artifact[0][column], column
    archived = archived_rows(local_storage, "artifact_collection")
    assert set(archived) == {str(latest["only-expired"]["id"])}
    assert only.root_id not in database.ids("flow_run")


def test_stale_collections_re_pointed_or_archived(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    older = factory.make_artifact(database, key="two", created=EXPIRED - timedelta(days=1))
    gone = factory.make_artifact(database, key="two", created=EXPIRED)
    lone = factory.make_artifact(database, key="one", created=EXPIRED)
    database.execute("DELETE FROM artifact WHERE id IN (:a, :b)", {"a": gone, "b": lone})
    stale_one = database.scalar("""SELECT id FROM artifact_collection WHERE "key" = 'one'""")

    report = archive(database, local_storage, sweeps=("collections",))

    rows = {r["key"]: str(r["latest_id"]) for r in database.rows(
        'SELECT "key", latest_id FROM artifact_collection')}  # fmt: skip
    assert rows == {"two": older}
    assert report.repointed_collections == 1
    assert set(archived_rows(local_storage, "artifact_collection")) == {str(stale_one)}
    assert report.swept["collections"]["artifact_collection"] == 1


def make_event(db: TestDatabase, occurred: datetime, resources: int = 2) -> tuple[str, set[str]]:
    event_id = factory.uuid4()
    db.execute(
        "INSERT INTO events (id, created, updated, occurred, event, resource_id, resource,"
        " related_resource_ids, related, payload, received, recorded) VALUES (:id, :at, :at,"
        " :at, 'prefect.flow-run.Completed', :rid, :res, '[]', '[]', :payload, :at, :at)",
        {"id": event_id, "at": occurred, "rid": f"prefect.flow-run.{factory.uuid4()}",
         "res": json.dumps({"prefect.resource.name": "x"}), "payload": '{"n": 1}'},
    )  # fmt: skip
    resource_ids = {factory.uuid4() for _ in range(resources)}
    for resource_id in resource_ids:
        db.execute(
            "INSERT INTO event_resources (id, created, updated, occurred, resource_id,"
            " resource_role, resource, event_id) VALUES (:id, :at, :at, :at, 'prefect.flow.1',"
            " 'flow', '{}', :event)",
            {"id": resource_id, "at": occurred, "event": event_id},
        )
    return event_id, resource_ids


def test_events_archived_only_when_enabled_and_past_their_retention(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    old = [make_event(database, NOW - timedelta(days=8, minutes=i)) for i in range(3)]
    young = make_event(database, NOW - timedelta(days=6))
    stray = factory.uuid4()  # a resource whose event is gone
    database.execute(
        "INSERT INTO event_resources (id, created, updated, occurred, resource_id, resource_role,"
        " resource, event_id) VALUES (:id, :at, :at, :at, 'r', '', '{}', :event)",
        {"id": stray, "at": NOW - timedelta(days=9), "event": factory.uuid4()},
    )
    events_before = database.ids("events")

    archive(database, local_storage)  # events are opt-in
    assert database.ids("events") == events_before

    report = archive(
        database, local_storage, sweeps=("events",), events_retention_period=timedelta(days=7),
        sweep_batch_size=1,
    )  # fmt: skip

    old_events = {event for event, _ in old}
    old_resources = set().union(*(resources for _, resources in old)) | {stray}
    assert database.ids("events") == {young[0]}
    assert database.ids("event_resources") == young[1]
    assert set(archived_rows(local_storage, "events")) == old_events
    assert set(archived_rows(local_storage, "event_resources")) == old_resources
    assert report.swept["events"] == {"events": 3, "event_resources": 7}
    assert len(report.sweep_batches) == 4  # one event (with its resources) a batch, then the stray
    assert_archive_consistent(database, local_storage)


def test_sqlite_rows_orphaned_with_foreign_keys_off(
    sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    tree = factory.make_tree(sqlite_database, end_time=EXPIRED, subflow_depth=1)
    before = factory.snapshot_ids(sqlite_database, TAKEN_TABLES)
    raw = sqlite3.connect(sqlite_database.sqlite_file)  # foreign_keys is OFF by default here
    with raw:
        raw.execute("DELETE FROM flow_run WHERE id = ?", (tree.root_id,))
    raw.close()
    assert sqlite_database.ids("task_run", "flow_run_id = :r", {"r": tree.root_id})

    archive(sqlite_database, local_storage, sweep_batch_size=100)

    tables = ("task_run", "flow_run_state", "flow_run_input", "log", "artifact")
    left = {t: sqlite_database.ids(t, "flow_run_id = :r", {"r": tree.root_id}) for t in tables}
    # the task run a subflow hangs under stays, with the subflow: deleting it would detach
    # the subflow (SET NULL), changing a row archiver does not archive
    parent = sqlite_database.scalar(
        "SELECT parent_task_run_id FROM flow_run WHERE id = :s", {"s": tree.subflow_ids[0]}
    )
    assert left == {t: set() for t in left} | {"task_run": {str(parent)}}
    assert not sqlite_database.ids("task_run_state") - before["task_run_state"]
    before["flow_run"].discard(tree.root_id)  # deleted by hand above, not by archiver
    assert_nothing_lost(sqlite_database, local_storage, before)


def test_restore_an_orphan_batch_by_its_id(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    made = make_orphans(database)
    archive(database, local_storage)
    manifests = list_batches(Storage(local_storage.url))
    with_artifacts = [m for m in manifests if any(f.table == "artifact" for f in m.files)]
    assert len(with_artifacts) == 1

    options = RestoreOptions(
        DatabaseOptions(database.url), local_storage.url, batch_ids=(with_artifacts[0].batch_id,)
    )
    asyncio.run(restore(options))

    assert {made["alone"], made["orphan_shared"]} <= database.ids("artifact")
    collections = {r["key"]: str(r["latest_id"]) for r in database.rows(
        'SELECT "key", latest_id FROM artifact_collection')}  # fmt: skip
    assert collections == {"shared": made["orphan_shared"], "alone": made["alone"]}
    assert not archived_rows(local_storage, "artifact_collection")
    assert not archived_rows(local_storage, "artifact")
    verified = asyncio.run(verify_archive(Storage(local_storage.url)))
    assert verified.sound and not verified.open_batches


def test_count_sweeps_matches_what_a_run_takes(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    make_orphans(database)

    async def count() -> dict[str, int]:
        engine = create_engine(DatabaseOptions(database.url))
        try:
            async with engine.connect() as conn:
                schema = await inspect_schema(conn)
                options = SweepOptions(("orphans", "collections", "events"), NOW - RETENTION,
                                       NOW - timedelta(days=7), NOW, 100)  # fmt: skip
                return await count_sweeps(conn, schema, options)
        finally:
            await engine.dispose()

    counts = asyncio.run(count())

    assert counts["orphans:log"] == 6 and counts["orphans:artifact"] == 2
    assert counts["standalone_tasks:task_run"] == 0 and counts["events:events"] == 0
    report = archive(database, local_storage)
    assert report.swept["orphans"]["log"] == counts["orphans:log"]


@pytest.mark.parametrize(
    "step", ["marker", "files", "verified", "deleted", "committed", "manifest"]
)
def test_a_failing_sweep_batch_loses_nothing(
    database: TestDatabase, local_storage: TestStorage, step: str
) -> None:
    made = make_orphans(database)
    before = factory.snapshot_ids(database, TAKEN_TABLES)

    with pytest.raises(RuntimeError, match="injected fault"):
        archive(database, local_storage, hook=fail_at(step), sweep_batch_size=2)

    assert_nothing_lost(database, local_storage, before)
    finish_sweeps(database, local_storage, before, made)


def finish_sweeps(
    db: TestDatabase, storage: TestStorage, before: dict[str, set[str]], made: dict[str, Any]
) -> None:
    report = archive(db, storage)  # recovers, then sweeps the rest
    assert_nothing_lost(db, storage, before)
    assert_archive_consistent(db, storage)
    assert not set(made["old_logs"]) & db.ids("log")
    assert not {made["alone"], made["orphan_shared"]} & db.ids("artifact")
    assert report.recovered or report.sweep_batches


@pytest.mark.parametrize("step", ["deleted", "committed"])
def test_sweep_killed_mid_batch_loses_nothing(
    database: TestDatabase, local_storage: TestStorage, step: str
) -> None:
    made = make_orphans(database)
    before = factory.snapshot_ids(database, TAKEN_TABLES)

    kill.killed_at(kill.Job.of("run", database, local_storage, batch_size=2), step)

    assert_nothing_lost(database, local_storage, before)
    finish_sweeps(database, local_storage, before, made)


def test_cli_reports_sweeps_in_dry_run_and_after_a_run(
    tmp_path: Path, sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    make_orphans(sqlite_database)
    config = write_config(
        tmp_path / "archiver.toml", local_storage, database_url=sqlite_database.url,
        retention_period="P30D", batch_interval=0, sweeps=["orphans", "collections", "events"],
    )  # fmt: skip

    planned = CliRunner().invoke(app, ["plan", "--json", "--config", str(config)])
    dry = CliRunner().invoke(app, ["run", "--config", str(config)])
    done = CliRunner().invoke(app, ["run", "--yes", "--config", str(config)])
    listed = CliRunner().invoke(app, ["ls", "--config", str(config)])

    # stdout is not a terminal: JSON lines there, the human summary on stderr
    assert dry.exit_code == 0 and "sweep orphans:log: 6 rows" in dry.stderr, dry.output
    assert done.exit_code == 0, done.output
    assert "swept orphans: artifact 2, artifact_collection 1, log 6 in 2 batches" in done.stderr
    assert "re-pointed 1 artifact collections" in done.stderr
    assert json.loads(planned.stdout)["sweeps"]["orphans:log"] == 6, planned.output
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["swept"]["orphans"] == {"artifact": 2, "artifact_collection": 1, "log": 6}
    assert report["repointed_collections"] == 1
    assert "(orphans)" in listed.stdout
