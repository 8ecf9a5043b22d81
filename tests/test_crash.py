"""Nothing is lost: crash every writer of batches at every step, recover, account for every row.

Run batches, sweep batches, compaction and restore's rewrites all go through one
commit protocol with one table of steps (``archiver.engine.commit.STEPS``). At each
step a writer passes, two kinds of fault:
* a hard kill: ``SIGKILL`` of a child process running the writer (no clean-up runs);
* an exception raised in process (the writer's own error handling runs).
After each: every row is in the database or in a committed batch, never both and never
neither; then the writer runs again, recovery first, and the archive matches its ledger.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from archiver.archive.catalog import list_batches
from archiver.archive.storage import Storage
from archiver.engine.commit import BATCH_STEPS, REWRITE_STEPS, STEPS
from archiver.engine.compact import CompactOptions, compact
from archiver.engine.recovery import recover
from archiver.engine.restore import RestoreOptions, restore
from archiver.source.engine import DatabaseOptions, create_engine
from tests import factory, kill
from tests.helpers import EXPIRED, archive, fail_at
from tests.oracle import RUN_TABLES, assert_archive_consistent, assert_nothing_lost

ROOT = Path(__file__).resolve().parent.parent
CRASH_POINTS = [step for step in BATCH_STEPS if step != "done"]


def make_backlog(db: Any) -> dict[str, set[str]]:
    """Five expired trees (two batches of two and one of one), with subflows."""
    for i in range(5):
        factory.make_tree(db, end_time=EXPIRED - timedelta(minutes=i), subflow_depth=i % 2)
    return {table: db.ids(table) for table in RUN_TABLES}


def crash_in_child(db: Any, storage: Any, step: str, occurrence: int, **spec: Any) -> None:
    """Run a writer (``writer`` in ``spec``; default: ``archiver run`` in batches of two) in a
    child that SIGKILLs itself at the ``occurrence``-th ``step``; assert it was killed there."""
    job = kill.Job.of(
        spec.get("writer", "run"),
        db,
        storage,
        batch_size=2,
        run_ids=spec.get("run_ids", ()),
        sweep_batch_size=spec.get("sweep_batch_size"),
    )
    kill.killed_at(job, step, occurrence=occurrence)


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


# --- the other writers of batches, through the same table of steps ----------------------------


@dataclass(frozen=True)
class Writer:
    """A writer of batches as these tests drive it: what it starts from, how it is run
    (``spec``: the child's job, see :func:`crash_in_child`), and what must hold once it
    ran again."""

    name: str
    steps: tuple[str, ...]
    prepare: Callable[[Any, Any], tuple[dict[str, set[str]], dict[str, Any]]]
    finish: Callable[[Any, Any, dict[str, set[str]], dict[str, Any], str], None]
    occurrence: int = 1


def _orphan_logs(db: Any, storage: Any) -> tuple[dict[str, set[str]], dict[str, Any]]:
    """Five orphan logs: three sweep batches of at most two (no run trees expired)."""
    logs = [
        factory.make_log(db, flow_run_id=factory.uuid4(), timestamp=EXPIRED - timedelta(minutes=i))
        for i in range(5)
    ]
    return {table: db.ids(table) for table in RUN_TABLES}, {"sweep_batch_size": 2, "logs": logs}


def _swept_again(db: Any, storage: Any, before: Any, spec: dict[str, Any], step: str) -> None:
    report = archive(db, storage, sweep_batch_size=2)
    assert_nothing_lost(db, storage, before)
    assert_archive_consistent(db, storage)
    assert not set(spec["logs"]) & db.ids("log"), "the second run did not sweep the orphans"
    assert report.recovered or report.sweep_batches


def _four_small_batches(db: Any, storage: Any) -> tuple[dict[str, set[str]], dict[str, Any]]:
    for i in range(4):
        factory.make_tree(db, end_time=EXPIRED - timedelta(minutes=i), subflow_depth=i % 2)
    before = {table: db.ids(table) for table in RUN_TABLES}
    archive(db, storage, batch_size=1)
    return before, {"writer": "compact"}


def _compacted_again(db: Any, storage: Any, before: Any, spec: dict[str, Any], step: str) -> None:
    compacted = STEPS.index(step) >= STEPS.index("committed")
    assert len(_batches(storage)) == (1 if STEPS.index(step) >= STEPS.index("manifest") else 4)
    again = asyncio.run(compact(CompactOptions(DatabaseOptions(db.url), storage.url,
                                               storage.options)))  # fmt: skip
    assert again.recovered or not compacted, "the open compaction was not resolved"
    assert_archive_consistent(db, storage)
    assert_nothing_lost(db, storage, before)
    (merged,) = _batches(storage)
    assert len(merged.compacted_from) == 4


def _one_batch_of_two_trees(db: Any, storage: Any) -> tuple[dict[str, set[str]], dict[str, Any]]:
    trees = [factory.make_tree(db, end_time=EXPIRED - timedelta(minutes=i)) for i in range(2)]
    before = {table: db.ids(table) for table in RUN_TABLES}
    archive(db, storage)
    return before, {"writer": "restore", "run_ids": [trees[0].root_id]}


def _restored_then_archived(db: Any, storage: Any, before: Any, spec: Any, step: str) -> None:
    restored = spec["run_ids"][0] in db.ids("flow_run")
    assert restored == (STEPS.index(step) >= STEPS.index("committed")), step

    report = archive(db, storage, batch_size=2)  # recovery, then the restored run again

    assert_nothing_lost(db, storage, before)
    assert_archive_consistent(db, storage)
    assert db.count("flow_run") == 0, "the restored run was not archived again"
    assert bool(report.batches) == restored


WRITERS = {
    "sweep": Writer("sweep", BATCH_STEPS, _orphan_logs, _swept_again, occurrence=2),
    "compaction": Writer("compaction", REWRITE_STEPS, _four_small_batches, _compacted_again),
    "rewrite": Writer("rewrite", REWRITE_STEPS, _one_batch_of_two_trees, _restored_then_archived),
}
WRITER_STEPS = [
    pytest.param(writer, step, id=f"{name}-{step}")
    for name, writer in WRITERS.items()
    for step in writer.steps
    if step != "done"
]


def _batches(storage: Any) -> list[Any]:
    return list_batches(Storage(storage.url, storage.options))


def write_in_process(db: Any, storage: Any, spec: dict[str, Any], step: str) -> None:
    """The writer ``spec`` names, in this process, failing at ``step``."""
    where = (DatabaseOptions(db.url), storage.url, storage.options)
    if spec.get("writer") == "compact":
        asyncio.run(compact(CompactOptions(*where), fail_at(step)))
    elif spec.get("writer") == "restore":
        asyncio.run(restore(RestoreOptions(*where, run_ids=tuple(spec["run_ids"])), fail_at(step)))
    else:
        archive(db, storage, hook=fail_at(step), sweep_batch_size=spec["sweep_batch_size"])


@pytest.mark.parametrize(("writer", "step"), WRITER_STEPS)
def test_sigkill_at_every_step_of_every_writer(
    database: Any, local_storage: Any, writer: Writer, step: str
) -> None:
    before, spec = writer.prepare(database, local_storage)
    child_spec = {key: value for key, value in spec.items() if key != "logs"}

    crash_in_child(database, local_storage, step, writer.occurrence, **child_spec)

    assert_nothing_lost(database, local_storage, before)
    writer.finish(database, local_storage, before, spec, step)


@pytest.mark.parametrize(("writer", "step"), WRITER_STEPS)
def test_exception_at_every_step_of_every_writer(
    database: Any, local_storage: Any, writer: Writer, step: str
) -> None:
    before, spec = writer.prepare(database, local_storage)

    with pytest.raises(RuntimeError, match="injected fault"):
        write_in_process(database, local_storage, spec, step)

    assert_nothing_lost(database, local_storage, before)
    writer.finish(database, local_storage, before, spec, step)


# --- recovery ---------------------------------------------------------------------------------


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
