"""Archive, verify and restore on the schemas Prefect 3.4.7 and 3.6.29 create, on both dialects.

The templates are replayed from dumps of those releases' own migrations (see
``tests/releases/__init__.py``). What differs from 3.9.1 (found by comparing the dumps,
PostgreSQL catalogs and SQLite ``sqlite_master``): no column of any table archiver reads,
writes or deletes; only indexes (3.9.1 adds ``ix_event_resources__occurred`` and
``__event_id``, which the events sweep walks and joins by, ``ix_flow_run__deployment_id``,
``ix_flow_run__state_type_coalesce_start_time``, SQLite's state ``type_name_timestamp``
indexes, and for 3.4.7 ``ix_task_run__state_type_start_time`` and the scheduler index), a
CHECK on ``block_document_reference`` (3.7.0) and the table ``automation_held_event``
(3.9.1), none of which archiver touches. :func:`test_tables_have_the_columns_of_3_9_1`
keeps that finding true: a release added later whose columns differ fails there first.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from archiver.cli.app import app
from archiver.engine.restore import RestoreOptions, RestoreReport, restore
from archiver.source.engine import DatabaseOptions
from archiver.source.schema import REFERENCE_TABLES, SWEEP_TABLES, TREE_TABLES
from tests import factory
from tests.factory import db_rows
from tests.factory.snapshots import column_kinds
from tests.helpers import EXPIRED, NOW, RECENT, archive, write_config
from tests.oracle import (
    RUN_TABLES,
    archived_rows,
    assert_archive_equals,
    assert_nothing_lost,
    field_kinds,
    ledger,
    normalise,
)
from tests.releases import Release

#: Everything a run with all sweeps on may archive, and restore puts back.
TABLES = (*RUN_TABLES, "artifact_collection", "events", "event_resources")
#: Archived value for value. An artifact_collection row is re-pointed to its newest
#: remaining artifact when a batch takes its latest one, so the row archived later is the
#: re-pointed one (as on 3.9.1; see test_sweeps).
EXACT_TABLES = tuple(table for table in TABLES if table != "artifact_collection")
ALL_SWEEPS = ("orphans", "collections", "events")


@dataclass
class Made:
    expired: list[factory.Tree]
    recent: factory.Tree
    flow_id: str
    young_event: str


def make_event(db: factory.TestDatabase, age: timedelta, resources: int) -> str:
    """One ``events`` row and its ``event_resources``, as Prefect's event persister writes."""
    event_id, at = factory.uuid4(), NOW - age
    db.execute(
        "INSERT INTO events (id, created, updated, occurred, event, resource_id, resource,"
        " related_resource_ids, related, payload, received, recorded) VALUES (:id, :at, :at,"
        " :at, 'prefect.flow-run.Completed', :rid, :res, '[]', '[]', :payload, :at, :at)",
        {"id": event_id, "at": at, "rid": f"prefect.flow-run.{factory.uuid4()}",
         "res": json.dumps({"prefect.resource.name": "nightly"}), "payload": '{"n": 1}'},
    )  # fmt: skip
    db.execute(
        "INSERT INTO event_resources (id, created, updated, occurred, resource_id,"
        " resource_role, resource, event_id) VALUES (:id, :at, :at, :at, 'prefect.flow.1',"
        " 'flow', '{}', :event)",
        [{"id": factory.uuid4(), "at": at, "event": event_id} for _ in range(resources)],
    )
    return event_id


def make_prefect_data(db: factory.TestDatabase) -> Made:
    """Expired trees of every shape archiver handles, old orphans and events, and young rows."""
    flow_id = factory.make_flow(db, "nightly-etl")
    deployment_id = factory.make_deployment(db, flow_id, "nightly")
    expired = factory.make_trees(
        db, 3, flow_id=flow_id, end_time=[EXPIRED + timedelta(minutes=i) for i in range(3)],
        subflow_depth=1, artifacts=4, keyed_artifact_key="old-report",
        deployment_id=deployment_id, task_run_state_cache=True,
    )  # fmt: skip
    recent = factory.make_tree(db, flow_id=flow_id, end_time=RECENT, keyed_artifact_key="report")
    for days in (1, 2):  # logs of runs that are gone
        factory.make_log(db, flow_run_id=factory.uuid4(), timestamp=EXPIRED - timedelta(days))
    make_event(db, timedelta(days=8), resources=2)
    young_event = make_event(db, timedelta(days=1), resources=1)
    return Made(expired, recent, flow_id, young_event)


def archive_everything(db: factory.TestDatabase, storage: Any) -> tuple[Any, list[str]]:
    """Archive with every sweep on; the report and every batch id it wrote."""
    report = archive(db, storage, batch_size=2, sweeps=ALL_SWEEPS)
    batch_ids = [batch.batch_id for batch in (*report.batches, *report.sweep_batches)]
    return report, batch_ids


def restore_batches(db: factory.TestDatabase, storage: Any, batch_ids: list[str]) -> RestoreReport:
    options = RestoreOptions(
        database=DatabaseOptions(db.url),
        storage_url=storage.url,
        storage_options=storage.options,
        batch_ids=tuple(batch_ids),
    )
    return asyncio.run(restore(options))


def without(rows: dict[str, dict[str, Any]], kept: set[str]) -> dict[str, dict[str, Any]]:
    return {row_id: row for row_id, row in rows.items() if row_id not in kept}


def assert_collection_archived(
    storage: Any, before: dict[str, dict[str, dict[str, Any]]], kept: dict[str, set[str]]
) -> None:
    """The collection of the expired runs' key left with them, pointing at one of them."""
    archived = archived_rows(storage, "artifact_collection")
    assert set(archived) == set(before["artifact_collection"]) - kept["artifact_collection"]
    artifacts = set(before["artifact"]) - kept["artifact"]
    assert [(row["key"], row["latest_id"] in artifacts) for row in archived.values()] == [
        ("old-report", True)
    ]


def latest_by_key(collections: dict[str, dict[str, Any]]) -> dict[str, str]:
    # Restore does not keep an archived collection's created time (issue 16, item 6), so
    # collections are compared by what they mean: each key's latest artifact.
    return {row["key"]: str(row["latest_id"]) for row in collections.values()}


def declared_columns(db: factory.TestDatabase, table: str) -> dict[str, tuple[Any, ...]]:
    """Column -> (type, nullable, default) as the catalog declares them."""
    if db.is_sqlite:
        rows = db.rows(f"PRAGMA table_info({table})")
        return {row["name"]: (row["type"], row["notnull"], row["dflt_value"]) for row in rows}
    rows = db.rows(
        "SELECT column_name, udt_name, is_nullable, column_default FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = :t",
        {"t": table},
    )
    return {
        row["column_name"]: (row["udt_name"], row["is_nullable"], row["column_default"])
        for row in rows
    }


def test_tables_have_the_columns_of_3_9_1(
    release: Release,
    release_schema: factory.TestDatabase,
    current_schema: factory.TestDatabase,
) -> None:
    # Names, types, nullability and defaults. If this fails for a new release, the row
    # writers (tests.factory) and the restore comparison below must learn its columns.
    revision = "SELECT version_num FROM alembic_version"
    assert release_schema.scalar(revision) == release.revision
    assert current_schema.scalar(revision) != release.revision
    for table in (*TREE_TABLES, *REFERENCE_TABLES, *SWEEP_TABLES):
        old = declared_columns(release_schema, table)
        assert old == declared_columns(current_schema, table), (release, table)


def test_archive_verify_and_restore_in_place(
    release: Release, release_database: factory.TestDatabase, local_storage: Any, tmp_path: Path
) -> None:
    db = release_database
    made = make_prefect_data(db)
    before = {table: db_rows(db, table) for table in TABLES}

    report, batch_ids = archive_everything(db, local_storage)

    assert report.warnings == []  # a known revision, and every index archiver looks up by
    assert report.archived_roots == 3
    assert report.swept["orphans"] == {"log": 2}
    assert report.swept["events"] == {"events": 1, "event_resources": 2}
    kept = {table: db.ids(table) for table in TABLES}
    assert kept["flow_run"] == set(made.recent.flow_run_ids)
    assert kept["events"] == {made.young_event}
    for table in EXACT_TABLES:
        assert_archive_equals(local_storage, table, without(before[table], kept[table]))
    assert_collection_archived(local_storage, before, kept)
    assert_nothing_lost(db, local_storage, {table: set(rows) for table, rows in before.items()})
    assert {m["source_revision"] for m in ledger(db).values()} == {release.revision}

    verified = CliRunner().invoke(
        app, ["verify", "--config", str(write_config(tmp_path / "archiver.toml", local_storage))]
    )
    assert verified.exit_code == 0, verified.output
    assert f"{len(batch_ids)} batches" in verified.stdout and ": sound" in verified.stdout

    restored = restore_batches(db, local_storage, batch_ids)

    assert restored.runs == 3 and restored.dropped_columns == {}
    assert {table: db_rows(db, table) for table in EXACT_TABLES} == {
        table: before[table] for table in EXACT_TABLES
    }
    assert latest_by_key(db_rows(db, "artifact_collection")) == latest_by_key(
        before["artifact_collection"]
    )


def test_release_archive_restores_into_prefect_3_9_1(
    release: Release,
    release_database: factory.TestDatabase,
    current_database: factory.TestDatabase,
    local_storage: Any,
) -> None:
    made = make_prefect_data(release_database)
    before = {table: db_rows(release_database, table) for table in TABLES}
    _, batch_ids = archive_everything(release_database, local_storage)
    kept = {table: release_database.ids(table) for table in TABLES}

    restored = restore_batches(current_database, local_storage, batch_ids)

    # Every archived column exists in 3.9.1 and 3.9.1 has no column the archive lacks, so
    # no value is dropped and none falls back to a default.
    assert restored.runs == 3 and restored.dropped_columns == {}
    assert current_database.ids("flow") == {made.flow_id}
    assert latest_by_key(db_rows(current_database, "artifact_collection")) == latest_by_key(
        without(before["artifact_collection"], kept["artifact_collection"])
    )
    for table in EXACT_TABLES:
        expected = without(before[table], kept[table])
        after = db_rows(current_database, table)
        assert set(after) == set(expected), table
        kinds = field_kinds(local_storage, table)
        assert set(kinds) == set(column_kinds(current_database, table)), table
        for row_id, original in expected.items():
            for column, value in original.items():
                want = normalise(kinds[column], value)
                got = normalise(kinds[column], after[row_id][column])
                if kinds[column] == "json" and want is not None and got is not None:
                    assert json.loads(got) == json.loads(want), (table, column)
                else:
                    assert got == want, (table, row_id, column)
