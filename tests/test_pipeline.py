"""archiver run end to end, on PostgreSQL and SQLite, to a local folder and to S3 (moto)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from datetime import timedelta

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from archiver.errors import BatchError, ConcurrentChange, VerificationError
from archiver.source.engine import DatabaseOptions, create_engine
from archiver.source.reader import Reader
from archiver.source.schema import inspect_schema
from tests import factory, oracle
from tests.factory import RUN_TABLES, TestDatabase, TestStorage
from tests.helpers import EXPIRED, NOW, RECENT, archive
from tests.oracle import archived_ids, assert_archive_equals


def remaining(db: TestDatabase, ids_by_table: dict[str, set[str]]) -> dict[str, set[str]]:
    """Which of the given ids are still in the database, per table."""
    left = {}
    for table, ids in ids_by_table.items():
        left[table] = ids & db.ids(table)
    return left


def union(*trees: factory.Tree) -> dict[str, set[str]]:
    """Ids per run table of the given trees (artifact collections are not run rows)."""
    merged: dict[str, set[str]] = {table: set() for table in RUN_TABLES}
    for tree in trees:
        for table in RUN_TABLES:
            merged[table] |= set(tree.rows_by_table().get(table, ()))
    return merged


def test_expired_trees_archived_and_everything_else_untouched(
    database: TestDatabase, storage: TestStorage
) -> None:
    expired = [factory.make_tree(database, end_time=EXPIRED - timedelta(hours=i)) for i in range(3)]
    kept = [
        factory.make_tree(database, end_time=RECENT),  # too young
        factory.make_tree(database, end_time=None),  # still running
        factory.make_tree(database, end_time=EXPIRED, state_type="SCHEDULED"),
        factory.make_tree(database, end_time=EXPIRED, state_type="PAUSED"),
    ]
    before = factory.snapshot(database)

    report = archive(database, storage)

    gone = union(*expired)
    assert report.archived_roots == 3
    assert remaining(database, gone) == {table: set() for table in RUN_TABLES}
    kept_ids = union(*kept)
    after = factory.snapshot(database)
    for table in RUN_TABLES:
        assert kept_ids[table] <= set(after[table]), table
        untouched = {i: row for i, row in before[table].items() if i not in gone[table]}
        assert after[table] == untouched, f"{table} rows changed that were not archived"
    assert archived_ids(storage) == gone
    assert report.rows == {table: len(ids) for table, ids in gone.items()}


def test_parquet_equals_deleted_rows_value_for_value(
    database: TestDatabase, storage: TestStorage
) -> None:
    for i in range(2):
        factory.make_tree(database, end_time=EXPIRED - timedelta(minutes=i), subflow_depth=1,
                          task_run_state_cache=True, keyed_artifact_key=f"report-{i}")  # fmt: skip
    before = factory.snapshot(database)

    archive(database, storage)

    for table in RUN_TABLES:
        assert before[table], f"the factory made no {table} rows"
        assert_archive_equals(storage, table, before[table])


def test_subflows_three_levels_deep_go_with_their_root(
    database: TestDatabase, storage: TestStorage
) -> None:
    tree = factory.make_tree(database, end_time=EXPIRED, subflow_depth=3)
    assert len(tree.flow_run_ids) == 4

    report = archive(database, storage)

    assert report.archived_roots == 1
    assert archived_ids(storage)["flow_run"] == set(tree.flow_run_ids)
    assert remaining(database, union(tree)) == {table: set() for table in RUN_TABLES}


def test_tree_with_live_subflow_is_skipped_whole(
    database: TestDatabase, storage: TestStorage
) -> None:
    live = factory.make_tree(
        database, end_time=EXPIRED, subflow_depth=2, subflow_state_type="RUNNING"
    )
    done = factory.make_tree(database, end_time=EXPIRED - timedelta(hours=1), subflow_depth=2)

    report = archive(database, storage)

    assert report.skipped_roots == [live.root_id]
    assert remaining(database, union(live)) == union(live)
    assert archived_ids(storage)["flow_run"] == set(done.flow_run_ids)


def test_many_batches_until_the_backlog_is_done(
    database: TestDatabase, storage: TestStorage
) -> None:
    months_apart = [EXPIRED - timedelta(days=40 * (i % 2), minutes=i) for i in range(11)]
    trees = [factory.make_tree(database, end_time=end, task_runs=1) for end in months_apart]

    report = archive(database, storage, batch_size=3)

    assert report.archived_roots == 11
    assert len(report.batches) >= 4  # 11 roots in batches of at most 3, split by month
    assert all(batch.roots <= 3 for batch in report.batches)
    assert database.count("flow_run") == 0
    assert archived_ids(storage)["flow_run"] == set().union(*(t.flow_run_ids for t in trees))
    dataset = ds.dataset(
        f"{storage.root_path}/flow_run", filesystem=storage.fs(), partitioning="hive"
    )
    months = set(dataset.to_table(columns=["month"]).column("month").to_pylist())
    assert months == {f"{end:%Y-%m}" for end in months_apart}
    manifests = [f for f in storage.list_files(".json") if "/_manifests/" in f]
    assert len(manifests) == len(report.batches)
    assert not [f for f in storage.list_files(".json") if "/_pending/" in f]


def test_max_batches_stops_early(database: TestDatabase, storage: TestStorage) -> None:
    for i in range(5):
        factory.make_tree(database, end_time=EXPIRED - timedelta(minutes=i), task_runs=0)

    report = archive(database, storage, batch_size=2, max_batches=1)

    assert len(report.batches) == 1 and report.archived_roots == 2
    assert database.count("flow_run") == 3


def test_dry_run_deletes_and_writes_nothing(database: TestDatabase, storage: TestStorage) -> None:
    tree = factory.make_tree(database, end_time=EXPIRED)
    before = factory.snapshot(database)

    report = archive(database, storage, dry_run=True)

    assert report.dry_run and report.expired_roots == 1 and not report.batches
    assert factory.snapshot(database) == before
    assert storage.list_files("") == []
    assert tree.root_id in before["flow_run"]


def test_log_written_after_selection_survives(database: TestDatabase, storage: TestStorage) -> None:
    tree = factory.make_tree(database, end_time=EXPIRED)
    late_log: dict[str, str] = {}

    def write_late_log() -> None:  # blocks on SQLite until the batch commits
        late_log["id"] = factory.make_log(database, flow_run_id=tree.root_id)

    writer = threading.Thread(target=write_late_log)

    def hook(step: str, batch_id: str) -> None:
        if step == "gathered":
            writer.start()
            writer.join(timeout=0.5 if database.dialect == "sqlite" else 30)

    archive(database, storage, hook=hook)
    writer.join(timeout=30)

    assert database.count("log", "id = :id", {"id": late_log["id"]}) == 1
    assert late_log["id"] not in archived_ids(storage)["log"]
    assert tree.root_id not in database.ids("flow_run")


def test_storage_failure_mid_batch_leaves_database_unchanged(
    database: TestDatabase, storage: TestStorage
) -> None:
    factory.make_tree(database, end_time=EXPIRED, subflow_depth=1)
    before = factory.snapshot(database)

    def break_storage(step: str, batch_id: str) -> None:
        if step == "marker":
            storage.break_writes()  # a real backend failure, not a mock

    with pytest.raises(BatchError, match="nothing in it was deleted"):
        archive(database, storage, hook=break_storage)

    assert factory.snapshot(database) == before


def test_corrupted_read_back_rolls_back(database: TestDatabase, storage: TestStorage) -> None:
    factory.make_tree(database, end_time=EXPIRED)
    before = factory.snapshot(database)

    def corrupt(step: str, batch_id: str) -> None:
        if step == "files":
            victim = next(f for f in storage.list_files(".parquet") if "/log/" in f)
            with storage.fs().open(victim, "wb") as handle:
                handle.write(b"PAR1 not really parquet")

    with pytest.raises(BatchError, match="verifying") as raised:
        archive(database, storage, hook=corrupt)

    assert isinstance(raised.value.cause, VerificationError)
    assert factory.snapshot(database) == before
    assert storage.list_files(".parquet") == []


def test_flow_and_deployment_are_copied_not_deleted(
    database: TestDatabase, storage: TestStorage
) -> None:
    flow_id = factory.make_flow(database, name="etl")
    deployment_id = factory.make_deployment(database, flow_id, name="nightly")
    factory.make_tree(database, flow_id=flow_id, deployment_id=deployment_id, end_time=EXPIRED)

    archive(database, storage)

    assert database.count("flow", "id = :id", {"id": flow_id}) == 1
    assert database.count("deployment", "id = :id", {"id": deployment_id}) == 1
    flows = [f for f in storage.list_files(".parquet") if "/flow/" in f]
    deployments = [f for f in storage.list_files(".parquet") if "/deployment/" in f]
    assert len(flows) == 1 and len(deployments) == 1
    names = ds.dataset(flows, filesystem=storage.fs()).to_table(columns=["name"]).to_pylist()
    assert names == [{"name": "etl"}]


def test_cutoff_is_exclusive_and_uses_end_time(
    database: TestDatabase, storage: TestStorage
) -> None:
    boundary = factory.make_tree(database, end_time=NOW - timedelta(days=29, hours=23))
    old = factory.make_tree(database, end_time=NOW - timedelta(days=30, minutes=5))

    archive(database, storage, now=NOW)

    assert archived_ids(storage)["flow_run"] == {old.root_id}
    assert boundary.root_id in database.ids("flow_run")


def test_files_and_manifest_describe_themselves(
    database: TestDatabase, storage: TestStorage
) -> None:
    factory.make_tree(database, end_time=EXPIRED)

    report = archive(database, storage)

    (batch,) = report.batches
    revision = database.scalar("SELECT version_num FROM alembic_version")
    manifest = json.loads(storage.read_bytes(f"_manifests/{batch.batch_id}.json"))
    assert manifest["batch_id"] == batch.batch_id
    assert manifest["source_dialect"] == database.dialect
    assert manifest["source_revision"] == revision
    assert manifest["partition"] == f"month={EXPIRED:%Y-%m}"
    for record in manifest["files"]:
        data = storage.read_bytes(record["key"])
        assert record["bytes"] == len(data)
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        metadata = pq.ParquetFile(pa.BufferReader(data)).schema_arrow.metadata
        assert metadata[b"archiver.table"].decode() == record["table"]
        assert metadata[b"archiver.batch_id"].decode() == batch.batch_id
        assert metadata[b"archiver.source_revision"].decode() == revision
        assert pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows == record["rows"]
    archived = {r["table"]: r["rows"] for r in manifest["files"] if r["role"] == "archived"}
    assert archived == {table: n for table, n in batch.rows.items() if n}


@pytest.mark.sqlite
def test_values_sqlite_does_not_bound_are_archived(
    sqlite_database: TestDatabase, storage: TestStorage
) -> None:
    tree = factory.make_tree(sqlite_database, end_time=EXPIRED)
    log_id = factory.make_log(sqlite_database, flow_run_id=tree.root_id)
    sqlite_database.execute("UPDATE log SET level = 40000 WHERE id = :id", {"id": log_id})

    archive(sqlite_database, storage)

    assert oracle.archived_rows(storage, "log")[log_id]["level"] == 40000


def test_a_subflow_added_after_the_tree_was_walked_stops_the_batch(
    database: TestDatabase, storage: TestStorage
) -> None:
    tree = factory.make_tree(database, end_time=EXPIRED, subflow_depth=1)
    walked_before_the_subflow = {tree.root_id}

    async def check() -> None:
        engine = create_engine(DatabaseOptions(database.url))
        try:
            async with engine.connect() as conn:
                reader = Reader(conn, await inspect_schema(conn))
                await reader.refuse_new_subflows(tree.task_run_ids, set(tree.flow_run_ids))
                with pytest.raises(ConcurrentChange, match="subflow was added"):
                    await reader.refuse_new_subflows(tree.task_run_ids, walked_before_the_subflow)
        finally:
            await engine.dispose()

    asyncio.run(check())


def test_task_run_logs_without_a_flow_run_id_go_with_their_tree(
    database: TestDatabase, storage: TestStorage
) -> None:
    tree = factory.make_tree(database, end_time=EXPIRED)
    only_task = factory.make_log(database, task_run_id=tree.task_run_ids[0])

    archive(database, storage)

    assert only_task in archived_ids(storage)["log"]
    assert database.count("log") == 0
