"""Property: for random run trees, batch sizes and crash points, nothing is ever lost.

Each example gets a fresh copy of the Prefect-migrated SQLite file and a fresh folder
(hypothesis cannot reuse pytest's function-scoped fixtures between examples).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archiver.engine.commit import BATCH_STEPS as STEPS
from tests import factory
from tests.helpers import NOW, archive
from tests.oracle import assert_archive_consistent, assert_nothing_lost


@dataclass(frozen=True)
class TreeSpec:
    age_days: int
    subflow_depth: int
    live_subflow: bool
    task_runs: int
    state_type: str


trees = st.builds(
    TreeSpec,
    age_days=st.sampled_from([1, 29, 31, 45, 400]),
    subflow_depth=st.integers(0, 2),
    live_subflow=st.booleans(),
    task_runs=st.integers(0, 3),
    state_type=st.sampled_from(["COMPLETED", "FAILED", "CANCELLED", "CRASHED", "RUNNING"]),
)
crashes = st.none() | st.tuples(st.sampled_from(STEPS), st.integers(1, 3))


def expected_archived(spec: TreeSpec) -> bool:
    terminal = spec.state_type != "RUNNING"
    live = spec.live_subflow and spec.subflow_depth > 0
    return terminal and spec.age_days > 30 and not live


@pytest.mark.sqlite
@pytest.mark.local
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(trees, min_size=1, max_size=6), batch_size=st.integers(1, 4), crash=crashes)
def test_random_trees_and_crashes_lose_nothing(
    sqlite_template: Path,
    specs: list[TreeSpec],
    batch_size: int,
    crash: tuple[str, int] | None,
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prefect.db"
        shutil.copyfile(sqlite_template, path)
        db = factory.TestDatabase.sqlite(path)
        storage = factory.TestStorage("local", str(Path(folder) / "archive"), {})
        try:
            check_one_example(db, storage, specs, batch_size, crash)
        finally:
            db.dispose()


def check_one_example(
    db: factory.TestDatabase,
    storage: factory.TestStorage,
    specs: list[TreeSpec],
    batch_size: int,
    crash: tuple[str, int] | None,
) -> None:
    made = [
        (spec, factory.make_tree(
            db,
            end_time=None if spec.state_type == "RUNNING" else NOW - timedelta(days=spec.age_days),
            state_type=spec.state_type,
            subflow_depth=spec.subflow_depth,
            subflow_state_type="RUNNING" if spec.live_subflow else "COMPLETED",
            task_runs=spec.task_runs,
        ))
        for spec in specs
    ]  # fmt: skip
    before = factory.snapshot_ids(db)
    seen = {"count": 0}

    def hook(step: str, batch_id: str) -> None:
        if crash and step == crash[0]:
            seen["count"] += 1
            if seen["count"] == crash[1]:
                raise RuntimeError("injected")

    try:
        archive(db, storage, hook=hook, batch_size=batch_size, now=NOW)
    except RuntimeError as exc:
        assert str(exc) == "injected"
    assert_nothing_lost(db, storage, before)

    archive(db, storage, batch_size=batch_size, now=NOW)

    assert_nothing_lost(db, storage, before)
    assert_archive_consistent(db, storage)
    flow_runs = db.ids("flow_run")
    for spec, tree in made:
        assert (tree.root_id not in flow_runs) == expected_archived(spec), spec
