"""archiver compact: small batches merged into large files, crash-safe, and readable as before."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from typer.testing import CliRunner

from archiver import open_archive
from archiver.archive.catalog import list_batches
from archiver.archive.manifest import BatchManifest
from archiver.archive.storage import Storage
from archiver.archive.verify import verify_archive
from archiver.cli.app import app
from archiver.engine.commit import StepHook
from archiver.engine.compact import (
    STEPS,
    CompactOptions,
    CompactReport,
    compact,
    parse_size,
)
from archiver.engine.recovery import recover
from archiver.engine.restore import RestoreOptions, RestoreReport, restore
from archiver.errors import ConcurrentChange, ConfigError, VerificationError
from archiver.source.engine import DatabaseOptions, create_engine
from tests import factory, kill
from tests.factory import RUN_TABLES, TestDatabase, TestStorage
from tests.helpers import EXPIRED, archive, fail_at, write_config
from tests.oracle import assert_archive_consistent, assert_archive_equals, assert_nothing_lost

CRASH_POINTS = [step for step in STEPS if step != "done"]


def make_trees(db: TestDatabase, count: int) -> list[factory.Tree]:
    return [
        factory.make_tree(db, end_time=EXPIRED - timedelta(minutes=i), subflow_depth=i % 2,
                          task_run_state_cache=i == 0)
        for i in range(count)
    ]  # fmt: skip


def compact_archive(
    db: TestDatabase, storage: TestStorage, hook: StepHook | None = None, **overrides: Any
) -> CompactReport:
    options = CompactOptions(DatabaseOptions(db.url), storage.url, storage.options, **overrides)
    return asyncio.run(compact(options, hook))


def restore_into(db: TestDatabase, storage: TestStorage, **selection: Any) -> RestoreReport:
    options = RestoreOptions(DatabaseOptions(db.url), storage.url, storage.options, **selection)
    return asyncio.run(restore(options))


def batches(storage: TestStorage) -> list[BatchManifest]:
    return list_batches(Storage(storage.url, storage.options))


def exactly_once_through_manifests(storage: TestStorage, before: dict[str, set[str]]) -> None:
    """open_archive (manifest-driven) shows every archived row once, whatever the moment."""
    tables = open_archive(storage.url, storage.options)
    for table in RUN_TABLES:
        ids = tables[table].to_table(columns=["id"])["id"].to_pylist() if table in tables else []
        assert len(ids) == len(set(ids)), f"{table}: a row shows twice"
        assert set(ids) == before[table], table


def test_compacted_archive_reads_verifies_and_restores_as_before(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    trees = make_trees(database, 5)
    rows_before = factory.snapshot(database)
    ids_before = {table: set(rows) for table, rows in rows_before.items()}
    archive(database, local_storage, batch_size=1)
    originals = [batch.batch_id for batch in batches(local_storage)]
    files_before = len(local_storage.keys(".parquet"))

    report = compact_archive(database, local_storage)

    assert [len(group.batches) for group in report.groups] == [5]
    (merged,) = batches(local_storage)
    assert sorted(merged.compacted_from) == sorted(originals)
    assert len(local_storage.keys(".parquet")) == len(merged.files) < files_before
    for table in RUN_TABLES:  # a glob over the folders: every row once, value for value
        assert_archive_equals(local_storage, table, rows_before[table])
    assert_archive_consistent(database, local_storage)
    assert_nothing_lost(database, local_storage, ids_before)
    verified = asyncio.run(verify_archive(Storage(local_storage.url, local_storage.options)))
    assert verified.sound and verified.batches == 1, verified.problems
    exactly_once_through_manifests(local_storage, ids_before)
    count = duckdb.execute(
        f"SELECT count(*) FROM read_parquet('{local_storage.url}/log/*/*.parquet', "
        "hive_partitioning = true)"
    ).fetchall()
    assert count == [(len(ids_before["log"]),)]

    # --batch of an original batch: just its run, out of the compacted batch
    one = restore_into(database, local_storage, batch_ids=(originals[1],))
    (tree,) = [t for t in trees if t.root_id in batches_roots(originals[1], merged)]
    assert one.runs == 1 and database.ids("flow_run") == set(tree.flow_run_ids)
    assert_nothing_lost(database, local_storage, ids_before)

    restore_into(database, local_storage, ended_after=EXPIRED - timedelta(days=1))
    assert factory.snapshot(database) == rows_before
    assert local_storage.keys(".parquet") == []  # every run moved back out of the archive


def batches_roots(batch_id: str, merged: BatchManifest) -> set[str]:
    return set(merged.compacted_from[batch_id])


@pytest.mark.sqlite
def test_compact_on_s3_and_show_and_ls(
    sqlite_database: TestDatabase, s3_storage: TestStorage, tmp_path: Path
) -> None:
    trees = make_trees(sqlite_database, 3)
    rows_before = factory.snapshot(sqlite_database)
    archive(sqlite_database, s3_storage, batch_size=1)
    config = write_config(tmp_path / "c.toml", s3_storage, database_url=sqlite_database.url)

    result = CliRunner().invoke(app, ["compact", "-c", str(config)])

    assert result.exit_code == 0, result.output
    assert "merged 3 batches into 1" in result.stdout
    verified = CliRunner().invoke(app, ["verify", "-c", str(config)])
    assert verified.exit_code == 0 and "1 batches" in verified.stdout, verified.output
    listed = CliRunner().invoke(app, ["ls", "-c", str(config)])
    assert "1 batches in" in listed.stdout
    shown = CliRunner().invoke(app, ["show", trees[1].subflow_ids[0], "-c", str(config)])
    assert shown.exit_code == 0 and trees[1].subflow_ids[0] in shown.stdout
    assert_archive_consistent(sqlite_database, s3_storage)
    restore_into(sqlite_database, s3_storage, run_ids=tuple(t.root_id for t in trees))
    assert factory.snapshot(sqlite_database) == rows_before


@pytest.mark.sqlite
def test_target_size_splits_and_dry_run_writes_nothing(
    sqlite_database: TestDatabase, local_storage: TestStorage, tmp_path: Path
) -> None:
    make_trees(sqlite_database, 6)
    archive(sqlite_database, local_storage, batch_size=1)
    largest = max(r.bytes for b in batches(local_storage) for r in b.files)
    target = int(largest * 2.5)  # about two batches per group
    config = write_config(tmp_path / "c.toml", local_storage, database_url=sqlite_database.url)
    keys = local_storage.keys("")

    dry = CliRunner().invoke(
        app, ["compact", "-c", str(config), "--dry-run", "--target-size", str(target)]
    )

    assert dry.exit_code == 0, dry.output
    assert "would merge" in dry.stdout and local_storage.keys("") == keys
    report = compact_archive(sqlite_database, local_storage, target_size=target)
    assert len(report.groups) >= 2
    for batch in batches(local_storage):
        sizes: dict[str, int] = {}
        for record in batch.files:
            sizes[record.table] = sizes.get(record.table, 0) + record.bytes
        assert batch.compacted_from == {} or max(sizes.values()) <= target * 1.2
    assert_archive_consistent(sqlite_database, local_storage)


def test_parse_size() -> None:
    assert parse_size("128MB") == 128 * 2**20 and parse_size("1.5 KiB") == 1536
    assert parse_size("4096") == 4096
    with pytest.raises(ConfigError, match="cannot read the size"):
        parse_size("big")


@pytest.mark.sqlite
def test_corrupt_input_stops_with_one_line_and_deletes_nothing(
    sqlite_database: TestDatabase, local_storage: TestStorage, tmp_path: Path
) -> None:
    make_trees(sqlite_database, 3)
    archive(sqlite_database, local_storage, batch_size=1)
    key = next(k for k in local_storage.keys(".parquet") if k.startswith("task_run/"))
    data = local_storage.read_bytes(key)
    local_storage.write_bytes(key, data[:100] + bytes([data[100] ^ 1]) + data[101:])
    keys = local_storage.keys("")
    config = write_config(tmp_path / "c.toml", local_storage, database_url=sqlite_database.url)

    result = CliRunner().invoke(app, ["compact", "-c", str(config)])

    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "other bytes than its manifest records" in line, line
    assert "nothing was deleted" in line and "Try:" in line
    assert local_storage.keys("") == keys
    with pytest.raises(VerificationError):
        compact_archive(sqlite_database, local_storage)


def check_after_fault(
    db: TestDatabase, storage: TestStorage, before: dict[str, set[str]], step: str
) -> None:
    """Exact for archiver's readers at once; consistent after the next compact (recovery)."""
    assert_nothing_lost(db, storage, before)
    exactly_once_through_manifests(storage, before)
    published = STEPS.index(step) >= STEPS.index("manifest")
    assert len(batches(storage)) == (1 if published else 4), step

    again = compact_archive(db, storage)

    assert again.recovered, "the open compaction was not resolved"
    assert_archive_consistent(db, storage)
    assert_nothing_lost(db, storage, before)
    (merged,) = batches(storage)
    assert len(merged.compacted_from) == 4
    exactly_once_through_manifests(storage, before)


@pytest.mark.sqlite
@pytest.mark.parametrize("step", CRASH_POINTS)
def test_sigkill_at_every_compaction_step(
    sqlite_database: TestDatabase, local_storage: TestStorage, step: str
) -> None:
    make_trees(sqlite_database, 4)
    before = factory.snapshot_ids(sqlite_database)
    archive(sqlite_database, local_storage, batch_size=1)

    kill.killed_at(kill.Job.of("compact", sqlite_database, local_storage), step)

    check_after_fault(sqlite_database, local_storage, before, step)


@pytest.mark.parametrize("step", ["marker", "verified", "committed", "removed"])
def test_exception_at_compaction_steps(
    database: TestDatabase, local_storage: TestStorage, step: str
) -> None:
    make_trees(database, 4)
    before = factory.snapshot_ids(database)
    archive(database, local_storage, batch_size=1)

    with pytest.raises(RuntimeError, match="injected fault"):
        compact_archive(database, local_storage, hook=fail_at(step))

    if STEPS.index(step) < STEPS.index("committed"):  # undone at once, old batches intact
        assert len(batches(local_storage)) == 4
        assert_archive_consistent(database, local_storage)
    check_after_fault_in_process(database, local_storage, before)


def check_after_fault_in_process(
    db: TestDatabase, storage: TestStorage, before: dict[str, set[str]]
) -> None:
    assert_nothing_lost(db, storage, before)
    exactly_once_through_manifests(storage, before)
    compact_archive(db, storage)
    assert_archive_consistent(db, storage)
    assert_nothing_lost(db, storage, before)
    assert len(batches(storage)) == 1


def test_a_concurrent_recovery_never_breaks_a_compaction(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    """PostgreSQL: recovery leaves the locked compaction alone. SQLite: the compaction sees
    that recovery removed its files, and stops with the old batches intact."""
    make_trees(database, 3)
    before = factory.snapshot_ids(database)
    archive(database, local_storage, batch_size=1)

    def recover_meanwhile(step: str, batch_id: str) -> None:
        if step == "verified":
            asyncio.run(recover_once(database, local_storage))

    if database.dialect == "postgresql":
        compact_archive(database, local_storage, hook=recover_meanwhile)
        assert len(batches(local_storage)) == 1
    else:
        with pytest.raises(ConcurrentChange, match="was removed while compacting"):
            compact_archive(database, local_storage, hook=recover_meanwhile)
        assert len(batches(local_storage)) == 3
    assert_archive_consistent(database, local_storage)
    assert_nothing_lost(database, local_storage, before)


async def recover_once(db: TestDatabase, storage: TestStorage) -> list[str]:
    engine = create_engine(DatabaseOptions(db.url))
    try:
        return await recover(engine, Storage(storage.url, storage.options))
    finally:
        await engine.dispose()


def test_restore_moves_a_run_out_of_a_compacted_batch(
    sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    trees = make_trees(sqlite_database, 3)
    before = factory.snapshot_ids(sqlite_database)
    archive(sqlite_database, local_storage, batch_size=1)
    compact_archive(sqlite_database, local_storage)

    restore_into(sqlite_database, local_storage, run_ids=(trees[0].root_id,))
    archive(sqlite_database, local_storage)  # archived again, as a new small batch
    compact_archive(sqlite_database, local_storage)  # and merged with the rewritten one

    assert sqlite_database.count("flow_run") == 0
    assert_nothing_lost(sqlite_database, local_storage, before)
    assert_archive_consistent(sqlite_database, local_storage)
    assert len(batches(local_storage)) == 1
    manifest = json.loads(local_storage.read_bytes(local_storage.keys(".json")[0]))
    assert trees[0].root_id in manifest["root_ids"]
