"""Self-tests of the fixtures in conftest.py and the data factory."""

from __future__ import annotations

import io
import json
import re
import time
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.factory import (
    LONG_LOG_LENGTH,
    SQL_NULL,
    TREE_TABLES,
    TestDatabase,
    TestStorage,
    make_artifact,
    make_deployment,
    make_flow,
    make_log,
    make_tree,
    make_trees,
    snapshot,
    snapshot_diff,
)

END = datetime(2024, 3, 1, 12, 30, 45, 123456, tzinfo=UTC)
HEADS = {"postgresql": "91e2b8f3d6a4", "sqlite": "27d8f4e1a6c9"}  # Prefect 3.9.1
SQLITE_TS = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")


def _tree_query(db: TestDatabase) -> str:
    return """
        WITH RECURSIVE runs(id) AS (
            SELECT id FROM flow_run WHERE id = :root
            UNION ALL
            SELECT child.id FROM flow_run child
            JOIN task_run parent ON child.parent_task_run_id = parent.id
            JOIN runs ON parent.flow_run_id = runs.id
        )
        SELECT id FROM runs
    """


# -- databases --------------------------------------------------------------------------------


def test_database_is_prefect_migrated(
    database: TestDatabase, request: pytest.FixtureRequest
) -> None:
    expected_marker = "sqlite" if database.dialect == "sqlite" else "postgres"
    assert request.node.get_closest_marker(expected_marker) is not None
    assert database.scalar("SELECT version_num FROM alembic_version") == HEADS[database.dialect]
    driver = "sqlite+aiosqlite:///" if database.is_sqlite else "postgresql+asyncpg://"
    assert database.url.startswith(driver)
    assert database.count("flow_run") == 0
    if database.is_sqlite:
        assert database.scalar("PRAGMA journal_mode") == "wal"
        assert database.scalar("PRAGMA foreign_keys") == 1
        assert database.scalar("PRAGMA busy_timeout") == 60000
        assert database.path is not None and database.path.is_file()
    else:
        assert database.scalar("SELECT current_database()") == database.name
        assert database.scalar("SELECT count(*) FROM pg_type WHERE typname = 'state_type'") == 1


def test_databases_are_isolated(database: TestDatabase) -> None:
    """Each test gets its own copy: the template itself stays empty."""
    make_tree(database, end_time=END)
    assert database.count("flow_run") == 1


def test_specific_backend_fixtures(
    sqlite_database: TestDatabase, postgres_database: TestDatabase
) -> None:
    assert sqlite_database.dialect == "sqlite"
    assert postgres_database.dialect == "postgresql"
    for db in (sqlite_database, postgres_database):
        tree = make_tree(db, end_time=END, subflow_depth=1)
        assert db.ids("flow_run") == set(tree.flow_run_ids)


def test_subflow_depth_3_counts_and_links(database: TestDatabase) -> None:
    tree = make_tree(
        database,
        end_time=END,
        artifacts=3,
        subflow_depth=3,
        keyed_artifact_key="nightly-report",
        task_run_state_cache=True,
    )
    runs = 4  # root + 3 subflows
    task_runs = runs * 2 + 3  # 2 ordinary per run + 1 parent task run per subflow
    expected = {
        "flow_run": runs,
        "task_run": task_runs,
        "flow_run_state": runs * 3,
        "task_run_state": task_runs * 3,
        "flow_run_input": runs,
        "log": runs * (2 + 2 * 2),  # flow-level + per ordinary task run
        "artifact": runs * 3 + 3 + 1,  # per run + result copies on parent tasks + keyed
        "artifact_collection": 1,
        "task_run_state_cache": runs * 2,
    }
    assert tree.counts() == expected
    for table, ids in tree.rows_by_table().items():
        assert database.ids(table) == ids, table

    # The chain: each subflow's parent task run belongs to the level above.
    chain = database.rows(
        "SELECT f.id, f.parent_task_run_id, t.flow_run_id AS parent_run"
        " FROM flow_run f LEFT JOIN task_run t ON t.id = f.parent_task_run_id"
    )
    by_id = {row["id"]: row for row in chain}
    assert by_id[tree.root_id]["parent_task_run_id"] is None
    for parent, child in zip(tree.flow_run_ids, tree.flow_run_ids[1:], strict=False):
        assert by_id[child]["parent_run"] == parent
    reached = {row["id"] for row in database.rows(_tree_query(database), {"root": tree.root_id})}
    assert reached == set(tree.flow_run_ids)

    # The parent task run mirrors its subflow and names it in state_details.
    mirrored = database.rows(
        "SELECT t.state_type AS task_type, f.state_type AS flow_type,"
        " t.state_timestamp AS task_ts, f.state_timestamp AS flow_ts, s.state_details"
        " FROM flow_run f JOIN task_run t ON t.id = f.parent_task_run_id"
        " JOIN task_run_state s ON s.id = t.state_id"
    )
    assert len(mirrored) == 3
    for row in mirrored:
        assert row["task_type"] == row["flow_type"] == "COMPLETED"
        assert row["task_ts"] == row["flow_ts"]
        assert json.loads(row["state_details"])["child_flow_run_id"] in tree.subflow_ids

    # The keyed artifact is its key's latest.
    collection = database.rows("SELECT id, latest_id, data FROM artifact_collection")
    assert [(r["id"], r["latest_id"]) for r in collection] == [
        (tree.artifact_collection_ids[0], tree.keyed_artifact_id)
    ]

    if database.is_sqlite:
        assert database.rows("PRAGMA foreign_key_check") == []


def test_state_copies_are_consistent(database: TestDatabase) -> None:
    tree = make_tree(database, end_time=END, states_per_run=6)
    rows = database.rows(
        "SELECT f.state_type, f.state_name, f.state_timestamp, f.end_time, f.run_count,"
        " s.type, s.name, s.timestamp, s.result_artifact_id"
        " FROM flow_run f JOIN flow_run_state s ON s.id = f.state_id"
    )
    assert len(rows) == 1
    row = rows[0]
    assert (row["state_type"], row["state_name"]) == (row["type"], row["name"])
    assert (row["state_type"], row["state_name"]) == ("COMPLETED", "Completed")
    assert row["state_timestamp"] == row["timestamp"] == row["end_time"]
    assert row["run_count"] == 2  # Running, then Retrying
    assert row["result_artifact_id"] == tree.artifact_ids[0]
    snap = snapshot(database, TREE_TABLES, normalise=True)
    root = snap["flow_run"][tree.root_id]
    assert root["end_time"] == END
    assert root["total_run_time"] == timedelta(seconds=7, microseconds=123457) * 2
    names = sorted(
        (s["timestamp"], s["name"])
        for s in snap["flow_run_state"].values()
        if s["flow_run_id"] == tree.root_id
    )
    assert [n for _, n in names] == [
        "Scheduled",
        "Pending",
        "Running",
        "AwaitingRetry",
        "Retrying",
        "Completed",
    ]
    assert names[0][0].microsecond == 0  # some timestamps land on whole seconds
    assert len({t for t, _ in names}) == 6
    five = make_tree(database, end_time=END, states_per_run=5)
    got = database.rows(
        "SELECT name FROM flow_run_state WHERE flow_run_id = :id ORDER BY timestamp",
        {"id": five.root_id},
    )
    assert [r["name"] for r in got] == ["Scheduled", "Late", "Pending", "Running", "Completed"]


def test_non_terminal_root_and_subflow(database: TestDatabase) -> None:
    running = make_tree(database, end_time=None)
    stuck = make_tree(database, end_time=END, subflow_depth=2, subflow_state_type="RUNNING")
    snap = snapshot(database, ["flow_run"], normalise=True)["flow_run"]
    assert snap[running.root_id]["state_type"] == "RUNNING"
    assert snap[running.root_id]["end_time"] is None
    assert snap[stuck.root_id]["state_type"] == "COMPLETED"
    assert snap[stuck.flow_run_ids[1]]["state_type"] == "COMPLETED"
    deepest = snap[stuck.flow_run_ids[2]]
    assert (deepest["state_type"], deepest["end_time"]) == ("RUNNING", None)


def test_json_null_is_not_sql_null(database: TestDatabase) -> None:
    tree = make_tree(database, end_time=END, artifacts=3)
    json_null = "data = 'null'" if database.is_sqlite else "data::text = 'null'"
    assert database.count("artifact", json_null) == 1  # the markdown variant
    assert database.count("artifact", "data IS NULL") == 0
    assert database.count("artifact", "metadata_ IS NULL") == 1
    as_json_null = make_artifact(database, flow_run_id=tree.root_id, data=None)
    as_sql_null = make_artifact(database, flow_run_id=tree.root_id, data=SQL_NULL)
    artifacts = snapshot(database, ["artifact"], normalise=True)["artifact"]
    assert artifacts[as_json_null]["data"] == "null"
    assert artifacts[as_sql_null]["data"] is None
    # A bare JSON number: SQLite's NUMERIC affinity stores an INTEGER, PG json keeps the text.
    number = [a for a in artifacts.values() if a["type"] == "progress"]
    assert [a["data"] for a in number] == ["1"]
    if database.is_sqlite:
        assert database.scalar("SELECT typeof(data) FROM artifact WHERE type = 'progress'") == (
            "integer"
        )
        assert database.scalar("SELECT data FROM artifact WHERE type = 'progress'") == 1
    else:
        assert database.scalar("SELECT data::text FROM artifact WHERE type = 'progress'") == "1"


def test_values_are_stored_as_prefect_stores_them(database: TestDatabase) -> None:
    tree = make_tree(database, end_time=END)
    row = database.rows(
        "SELECT id, end_time, total_run_time, auto_scheduled, parameters, state_type"
        " FROM flow_run WHERE id = :id",
        {"id": tree.root_id},
    )[0]
    assert row["id"] == tree.root_id and row["id"] == row["id"].lower()
    params = json.loads(row["parameters"])
    assert params["city"] == "Zürich" and params["nested"]["list"] == [1, 2.5, None, True, "x"]
    assert row["state_type"] == "COMPLETED"
    if database.is_sqlite:
        assert row["end_time"] == "2024-03-01 12:30:45.123456"
        assert row["total_run_time"] == "1970-01-01 00:00:07.123457"
        assert row["auto_scheduled"] == 0
        times = [r["timestamp"] for r in database.rows("SELECT timestamp FROM flow_run_state")]
        assert all(SQLITE_TS.match(t) for t in times), times
        assert any(t.endswith(".000000") for t in times)
        assert database.scalar("SELECT count(*) FROM flow_run WHERE end_time < :t", {"t": END}) == 0
    else:
        assert row["end_time"] == END
        assert row["total_run_time"] == timedelta(seconds=7, microseconds=123457)
        assert row["auto_scheduled"] is False
        kinds = database.rows(
            "SELECT pg_typeof(id)::text AS id, pg_typeof(state_type)::text AS st,"
            " pg_typeof(parameters)::text AS p FROM flow_run"
        )[0]
        assert kinds == {"id": "uuid", "st": "state_type", "p": "jsonb"}
    lengths = [len(r["message"]) for r in database.rows("SELECT message FROM log")]
    assert max(lengths) == LONG_LOG_LENGTH


def test_cascade_matches_the_dossier(database: TestDatabase) -> None:
    """Deleting a root cascades to its own rows and detaches its subflow (dossier 4.3)."""
    tree = make_tree(database, end_time=END, subflow_depth=1, task_run_state_cache=True)
    before = snapshot(database, TREE_TABLES, normalise=True)
    assert database.execute("DELETE FROM flow_run WHERE id = :id", {"id": tree.root_id}) == 1
    after = snapshot(database, TREE_TABLES, normalise=True)
    child = tree.flow_run_ids[1]
    assert after["flow_run"][child]["parent_task_run_id"] is None
    assert set(after["flow_run"]) == {child}
    diff = snapshot_diff(before, after)
    assert diff["flow_run"].changed == {child}
    # No FK on logs, artifacts and cache rows: they stay.
    for table in ("log", "artifact", "task_run_state_cache"):
        assert table not in diff
    assert diff["task_run"].removed == {
        t for t in tree.task_run_ids if before["task_run"][t]["flow_run_id"] == tree.root_id
    }


def test_reference_rows_and_late_rows(database: TestDatabase) -> None:
    flow_id = make_flow(database, name="nightly-ünïcode")
    deployment_id = make_deployment(database, flow_id, name="nightly")
    trees = make_trees(
        database,
        3,
        flow_id=flow_id,
        deployment_id=deployment_id,
        end_time=[END, END - timedelta(days=1), None],
        keyed_artifact_key="shared-key",
    )
    assert database.count("flow_run", "flow_id = :f", {"f": flow_id}) == 3
    assert database.count("flow_run", "deployment_id = :d", {"d": deployment_id}) == 3
    # The key is shared: only the last tree's artifact is the latest.
    assert [bool(t.artifact_collection_ids) for t in trees] == [False, False, True]
    log_id = make_log(database, flow_run_id=trees[0].root_id, timestamp=END + timedelta(hours=1))
    orphan = make_log(database, task_run_id=trees[0].task_run_ids[0])
    assert database.ids("log", "id IN (:a, :b)", {"a": log_id, "b": orphan}) == {log_id, orphan}
    late = make_artifact(database, flow_run_id=trees[1].root_id, key="shared-key")
    assert database.scalar("SELECT latest_id FROM artifact_collection") == late


def test_snapshot_normalises_every_run_table(database: TestDatabase) -> None:
    make_tree(
        database,
        end_time=END,
        artifacts=6,
        subflow_depth=1,
        task_run_state_cache=True,
        keyed_artifact_key="k",
    )
    snap = snapshot(database, TREE_TABLES, normalise=True)
    assert set(snap) == set(TREE_TABLES)
    for table, rows in snap.items():
        assert rows, table
        for row_id, row in rows.items():
            assert isinstance(row_id, str) and row_id == row["id"]
            assert row["created"].tzinfo is UTC and row["updated"].tzinfo is UTC
    data = sorted(str(a["data"]) for a in snap["artifact"].values() if a["type"] == "progress")
    assert data == ["0.25", "0.25", "1", "1"]  # artifacts 1 and 5 of both flow runs


def test_many_trees_are_quick(database: TestDatabase) -> None:
    started = time.perf_counter()
    trees = make_trees(database, 300, end_time=END)
    elapsed = time.perf_counter() - started
    assert len({t.root_id for t in trees}) == 300
    assert database.count("flow_run") == 300
    assert database.count("task_run_state") == 300 * 2 * 3
    assert elapsed < 10, f"300 trees took {elapsed:.1f} s"


# -- storage ----------------------------------------------------------------------------------


def test_storage_parquet_roundtrip(storage: TestStorage, request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker(storage.kind) is not None
    assert storage.list_files() == []
    table = pa.table({"id": ["a", "b"], "n": [1, 2]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    key = "flow_run/month=2024-03/batch-1.parquet"
    storage.write_bytes(key, sink.getvalue())
    storage.write_bytes("_manifests/batch-1.json", b"{}")
    assert storage.keys(".parquet") == [key]
    assert storage.list_files() == [f"{storage.root}/{key}"]
    assert len(storage.list_files(suffix="")) == 2
    back = pq.read_table(io.BytesIO(storage.fs().cat_file(storage.list_files()[0])))
    assert back.equals(table)
    if storage.kind == "s3":
        assert storage.url.startswith("s3://") and storage.url.endswith("/archive")
        listed = storage.boto_client().list_objects_v2(Bucket=storage.bucket)
        assert sorted(o["Key"] for o in listed["Contents"]) == [
            "archive/_manifests/batch-1.json",
            f"archive/{key}",
        ]
    else:
        assert storage.options == {}
        assert not storage.url.startswith("file:")


def test_s3_fs_is_fresh_and_sees_other_writers(s3_storage: TestStorage) -> None:
    fs = s3_storage.fs()
    assert fs is not s3_storage.fs()
    assert fs.ls(s3_storage.bucket) == []
    s3_storage.boto_client().put_object(
        Bucket=s3_storage.bucket, Key="archive/x.parquet", Body=b"1"
    )
    assert s3_storage.list_files() == [f"{s3_storage.root}/x.parquet"]


def test_moto_state_is_reset_between_tests(moto_server: str, s3_storage: TestStorage) -> None:
    """Only this test's bucket exists: the buckets of earlier tests were reset away."""
    client = s3_storage.boto_client()
    assert [b["Name"] for b in client.list_buckets()["Buckets"]] == [s3_storage.bucket]
    assert s3_storage.endpoint_url == moto_server


def test_local_storage(local_storage: TestStorage) -> None:
    assert local_storage.kind == "local"
    local_storage.write_bytes("a/b.parquet", b"x")
    assert local_storage.keys() == ["a/b.parquet"]
    with pytest.raises(TypeError):
        local_storage.boto_client()
