"""The fast paths: COPY into Arrow, the exact cascade on PostgreSQL, and reading ahead."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from sqlalchemy import text

from archiver.models import Column, Kind, TableShape
from archiver.source import copy_csv
from archiver.source.deletion import DeleteMismatch, delete_archived
from archiver.source.engine import DatabaseOptions, create_engine
from archiver.source.schema import inspect_schema
from archiver.source.trees import gather, lock_roots
from tests import factory
from tests.helpers import EXPIRED, NOW, RETENTION, archive
from tests.oracle import (
    RUN_TABLES,
    archived_rows,
    assert_archive_consistent,
    assert_nothing_lost,
)


def test_copy_csv_parses_into_archive_types_column_wise() -> None:
    shape = TableShape(
        "t",
        (
            Column("id", Kind.UUID),
            Column("at", Kind.TIMESTAMP),
            Column("took", Kind.INTERVAL),
            Column("doc", Kind.JSON),
            Column("ok", Kind.BOOLEAN),
            Column("n", Kind.INT32),
            Column("name", Kind.STRING),
        ),
    )
    # What PostgreSQL writes for COPY ... (FORMAT csv, FORCE_QUOTE *) in UTC, ISO style.
    data = (
        b'"0b3f6a2e-0000-4000-8000-000000000001","2026-01-02 03:04:05.123456+00",'
        b'"5123456","{""a"": [1, ""x\\ny""]}","t","7","say ""hi"",\nnext line"\n'
        b'"0b3f6a2e-0000-4000-8000-000000000002","2026-01-02 03:04:05+02",,"null",,,""\n'
    )
    table = copy_csv.from_csv(data, shape)
    first, second = table.to_pylist()
    assert first["at"].isoformat() == "2026-01-02T03:04:05.123456+00:00"
    assert first["took"] == timedelta(seconds=5.123456)
    assert first["doc"] == '{"a": [1, "x\\ny"]}'
    assert (first["ok"], first["n"], first["name"]) == (True, 7, 'say "hi",\nnext line')
    assert second["at"].isoformat() == "2026-01-02T01:04:05+00:00"
    assert second["doc"] == "null", "JSON null is a document, not SQL NULL"
    assert (second["took"], second["ok"], second["n"]) == (None, None, None)
    assert second["name"] == "", "an empty string is not NULL"
    assert copy_csv.from_csv(b"", shape).num_rows == 0
    with pytest.raises(pa.ArrowInvalid):
        copy_csv.from_csv(b'"x","infinity",,,,,\n', shape)


def test_cascade_refuses_to_take_a_row_that_was_not_archived(postgres_database: Any) -> None:
    db = postgres_database
    factory.make_tree(db, end_time=EXPIRED, subflow_depth=1, task_runs=2)
    before = {table: db.ids(table) for table in RUN_TABLES}

    async def delete_all_but_one_state() -> None:
        engine = create_engine(DatabaseOptions(db.url))
        try:
            async with engine.connect() as conn:
                schema = await inspect_schema(conn)
                await conn.rollback()
                transaction = await conn.begin()
                roots = await lock_roots(conn, NOW - RETENTION, 10)
                gathered = await gather(conn, schema, roots)
                ids = {table: rows.ids for table, rows in gathered.tables.items()}
                assert len(ids["task_run_state"]) > 1
                ids["task_run_state"] = ids["task_run_state"][1:]
                with pytest.raises(DeleteMismatch, match="task_run_state: the flow_run DELETE"):
                    await delete_archived(conn, ids, cascade=True)
                await transaction.rollback()
        finally:
            await engine.dispose()

    asyncio.run(delete_all_but_one_state())
    assert {table: db.ids(table) for table in RUN_TABLES} == before


@pytest.mark.parametrize("read_ahead", [1, 2, 0])
def test_a_fault_after_the_cascade_delete_rolls_back_only_that_batch(
    postgres_database: Any, local_storage: Any, read_ahead: int
) -> None:
    db = postgres_database
    for hours in range(4):
        factory.make_tree(db, end_time=EXPIRED - timedelta(hours=hours))
    before = {table: db.ids(table) for table in RUN_TABLES}
    open_transactions: list[int] = []
    deleted = 0

    def hook(step: str, batch_id: str) -> None:
        nonlocal deleted
        with db.engine.connect() as conn:  # archiver sessions inside a transaction now
            sql = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'archiver' AND xact_start IS NOT NULL"
            )
            open_transactions.append(int(conn.execute(text(sql)).scalar_one()))
        if step != "deleted":
            return
        deleted += 1
        if deleted == 2:
            raise RuntimeError("injected fault after the second DELETE")

    with pytest.raises(RuntimeError, match="injected fault"):
        archive(db, local_storage, hook=hook, batch_size=1, read_ahead=read_ahead)

    # with read-ahead, later batches are locked and read in their own transactions meanwhile
    assert max(open_transactions) > 1 if read_ahead else max(open_transactions) == 1
    assert db.count("flow_run", "parent_task_run_id IS NULL") == 3, "only batch 1 committed"
    assert_nothing_lost(db, local_storage, before)
    report = archive(db, local_storage, batch_size=1)
    assert report.archived_roots == 3, "the rolled-back batch left rows locked"
    assert_nothing_lost(db, local_storage, before)
    assert_archive_consistent(db, local_storage)


def test_a_value_copy_text_cannot_carry_falls_back_to_reading_rows(
    postgres_database: Any, local_storage: Any
) -> None:
    db = postgres_database
    tree = factory.make_tree(db, end_time=EXPIRED)
    db.execute(
        "UPDATE flow_run SET next_scheduled_start_time = 'infinity' WHERE id = :id",
        {"id": tree.root_id},
    )

    report = archive(db, local_storage)

    assert report.archived_roots == 1
    assert db.count("flow_run") == 0
    row = archived_rows(local_storage, "flow_run")[tree.root_id]
    # what asyncpg makes of 'infinity', as before COPY was used
    assert row["next_scheduled_start_time"] == datetime.max.replace(tzinfo=UTC)


@pytest.mark.postgres
@pytest.mark.parametrize("read_ahead", [1, 2])
def test_a_batch_read_ahead_plans_collections_on_what_the_batch_before_left(
    postgres_database: Any, local_storage: Any, monkeypatch: pytest.MonkeyPatch, read_ahead: int
) -> None:
    """Batch 1 archives the latest artifact of key "report" and re-points the collection to
    the next newest, which batch 2 (read ahead meanwhile) archives. Batch 2 must wait for
    batch 1's lock on the collection and plan on the committed row: re-point it again to
    the one that remains. Planned on the row it saw before batch 1 committed, it would leave
    the collection pointing at a deleted artifact."""
    from archiver.engine import batcher as pipeline
    from archiver.source import collections

    db = postgres_database
    trees = [  # kept, then batch 2, then batch 1 (roots go oldest end_time first)
        factory.make_tree(db, end_time=end_time)
        for end_time in (NOW - timedelta(days=1), EXPIRED, EXPIRED - timedelta(days=1))
    ]
    kept, second, first = [  # created in this order: batch 1's is the newest
        factory.make_artifact(db, tree.root_id, key="report", created=NOW + timedelta(minutes=i))
        for i, tree in enumerate(trees)
    ]
    before = {table: db.ids(table) for table in RUN_TABLES}
    events: list[str] = []
    plan, repoint = collections.plan_collections, collections.apply_repoints

    async def planning(conn: Any, schema: Any, artifacts: Any) -> Any:
        which = "2" if second in artifacts.ids else "1"
        events.append(f"plan {which} starts")
        planned = await plan(conn, schema, artifacts)
        events.append(f"plan {which} ends")
        return planned

    async def slow_repoint(conn: Any, repoints: Any) -> None:
        if repoints and repoints[0].old_latest_id == first:
            await asyncio.sleep(0.5)  # batch 1 holds the collection: let batch 2 reach it
            events.append("batch 1 re-points")
        await repoint(conn, repoints)

    monkeypatch.setattr(pipeline, "plan_collections", planning)
    monkeypatch.setattr(pipeline, "apply_repoints", slow_repoint)
    report = archive(db, local_storage, batch_size=1, sweeps=(), read_ahead=read_ahead)

    assert report.archived_roots == 2
    assert events.index("plan 2 starts") < events.index("batch 1 re-points"), events
    assert events.index("batch 1 re-points") < events.index("plan 2 ends"), events
    latest = db.rows("SELECT latest_id FROM artifact_collection WHERE \"key\" = 'report'")
    assert [str(row["latest_id"]) for row in latest] == [kept]
    assert report.repointed_collections == 2
    assert_nothing_lost(db, local_storage, before)
    assert_archive_consistent(db, local_storage)


@pytest.mark.postgres
def test_no_batch_is_read_ahead_past_the_batch_limit(
    postgres_database: Any, local_storage: Any
) -> None:
    for hours in range(5):
        factory.make_tree(postgres_database, end_time=EXPIRED - timedelta(hours=hours))
    selected: list[str] = []

    def hook(step: str, batch_id: str) -> None:
        if step == "selected":
            selected.append(step)

    report = archive(
        postgres_database, local_storage, hook=hook, batch_size=1, max_batches=2, read_ahead=2
    )

    assert report.archived_roots == 2 and report.outcome == "max_batches"
    assert len(selected) == 2, "a batch past max_batches was locked and read"
    assert postgres_database.count("flow_run", "parent_task_run_id IS NULL") == 3
