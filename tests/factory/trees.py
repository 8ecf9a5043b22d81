"""Prefect-shaped run trees: a root flow run, nested subflows, and every row that hangs on them.

The rows follow the schema dossier (``/work/shared/prefect-schema.md``, sections 1, 2, 4 and 5):
every FK is respected (SQLite runs with ``PRAGMA foreign_keys=ON``), and values are bound the
way Prefect stores them (:mod:`tests.factory.values`). :func:`make_trees` builds many trees
into one :class:`~tests.factory.build.Batch` and writes it in one transaction; the pieces of
one flow run come from :mod:`~tests.factory.flow_runs`, :mod:`~tests.factory.tasks`,
:mod:`~tests.factory.states`, :mod:`~tests.factory.logs` and :mod:`~tests.factory.artifacts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tests.factory.artifacts import add_flow_artifacts, add_keyed_artifact
from tests.factory.build import Batch, Tree, write
from tests.factory.content import slug, uuid4
from tests.factory.database import TestDatabase
from tests.factory.flow_runs import add_flow_run, add_inputs
from tests.factory.logs import add_flow_logs
from tests.factory.rows import default_flow
from tests.factory.schema import STATE_TYPES, TERMINAL_STATE_TYPES
from tests.factory.states import Timeline, build_timeline
from tests.factory.tasks import TaskRun, add_cache_rows, add_parent_task_run, add_task_runs

FLOW_STEP = timedelta(seconds=7, microseconds=123_457)
SUBFLOW_STEP = timedelta(seconds=1, microseconds=250_001)


@dataclass(frozen=True)
class Shape:
    """What every tree of one :func:`make_trees` call looks like (its keyword arguments)."""

    state_type: str
    task_runs: int
    states_per_run: int
    logs_per_run: int
    artifacts: int
    keyed_artifact_key: str | None
    inputs: int
    subflow_depth: int
    subflow_state_type: str
    deployment_id: str | None
    task_run_state_cache: bool


@dataclass
class Level:
    """One flow run of a tree: the root (level 0) or the subflow that many levels down."""

    flow_run_id: str
    timeline: Timeline
    end_time: datetime | None


def levels(shape: Shape, end_time: datetime | None, now: datetime) -> list[Level]:
    """The root and its subflows. Middle subflows are COMPLETED, the deepest one is
    ``subflow_state_type``; each ends a little before its parent."""
    if end_time is not None and end_time.tzinfo is None:
        raise ValueError("end_time must be an aware (UTC) datetime")
    if shape.state_type not in STATE_TYPES or shape.subflow_state_type not in STATE_TYPES:
        raise ValueError(f"unknown state type {shape.state_type!r} / {shape.subflow_state_type!r}")
    root_type = shape.state_type
    if end_time is None and root_type in TERMINAL_STATE_TYPES:
        root_type = "RUNNING"  # no end time: the run is not terminal
    anchor = end_time if end_time is not None else now
    found = [
        Level(uuid4(), build_timeline(shape.states_per_run, root_type, anchor, FLOW_STEP), end_time)
    ]
    for level in range(1, shape.subflow_depth + 1):
        level_type = shape.subflow_state_type if level == shape.subflow_depth else "COMPLETED"
        level_anchor = anchor - SUBFLOW_STEP * level
        level_end = level_anchor if level_type in TERMINAL_STATE_TYPES else None
        level_timeline = build_timeline(shape.states_per_run, level_type, level_anchor, FLOW_STEP)
        found.append(Level(uuid4(), level_timeline, level_end))
    return found


def add_level(
    batch: Batch,
    tree: Tree,
    shape: Shape,
    level: Level,
    *,
    index: int,
    flow_id: str,
    is_root: bool,
    parent_task_run_id: str | None,
) -> list[TaskRun]:
    """One flow run and everything on it except the parent task run of its subflow; returns
    its ordinary task runs."""
    run_id, run_timeline = level.flow_run_id, level.timeline
    tree.flow_run_ids.append(run_id)
    run_name = slug()
    artifact_ids = add_flow_artifacts(
        batch, tree, flow_run_id=run_id, final_time=run_timeline.final_time, count=shape.artifacts
    )
    add_flow_run(
        batch,
        tree,
        flow_run_id=run_id,
        run_name=run_name,
        index=index,
        timeline=run_timeline,
        end_time=level.end_time,
        flow_id=flow_id,
        deployment_id=shape.deployment_id if is_root else None,
        parent_task_run_id=parent_task_run_id,
        result_artifact_id=artifact_ids[0] if artifact_ids and run_timeline.terminal else None,
    )
    task_runs = add_task_runs(
        batch,
        tree,
        flow_run_id=run_id,
        flow_timeline=run_timeline,
        count=shape.task_runs,
        states_per_run=shape.states_per_run,
        logs_per_run=shape.logs_per_run,
        cache=shape.task_run_state_cache,
    )
    if len(artifact_ids) > 1 and task_runs:  # made by a task inside the flow: both ids
        batch.update("artifact", artifact_ids[1], task_run_id=task_runs[0].id)
    if shape.task_run_state_cache:
        add_cache_rows(batch, tree, task_runs=task_runs, final_at=run_timeline.final_time)
    add_flow_logs(
        batch,
        tree,
        flow_run_id=run_id,
        run_name=run_name,
        final_time=run_timeline.final_time,
        count=shape.logs_per_run,
        is_root=is_root,
    )
    add_inputs(
        batch, tree, flow_run_id=run_id, final_time=run_timeline.final_time, count=shape.inputs
    )
    return task_runs


def build_tree(
    batch: Batch,
    shape: Shape,
    *,
    index: int,
    flow_id: str,
    end_time: datetime | None,
    now: datetime,
) -> Tree:
    """Add one tree's rows to ``batch``, level by level; its ids."""
    tree_levels = levels(shape, end_time, now)
    tree = Tree(root_id=tree_levels[0].flow_run_id, end_time=end_time)
    parent_task_run_id: str | None = None
    root_first_task: str | None = None
    for number, level in enumerate(tree_levels):
        task_runs = add_level(
            batch,
            tree,
            shape,
            level,
            index=index,
            flow_id=flow_id,
            is_root=number == 0,
            parent_task_run_id=parent_task_run_id,
        )
        if number == 0 and task_runs:
            root_first_task = task_runs[0].id
        if number < shape.subflow_depth:
            child = tree_levels[number + 1]
            parent_task_run_id = add_parent_task_run(
                batch,
                tree,
                flow_run_id=level.flow_run_id,
                level=number,
                child_flow_run_id=child.flow_run_id,
                child_timeline=child.timeline,
                with_result=shape.artifacts >= 1,
            )
    if shape.keyed_artifact_key is not None:  # extra, not counted in ``artifacts``
        root = tree_levels[0]
        tree.keyed_artifact_id = add_keyed_artifact(
            batch,
            tree,
            key=shape.keyed_artifact_key,
            flow_run_id=root.flow_run_id,
            task_run_id=root_first_task,
            at=root.timeline.final_time + timedelta(microseconds=17),
        )
    return tree


def make_trees(
    db: TestDatabase,
    count: int,
    *,
    flow_id: str | None = None,
    end_time: datetime | Sequence[datetime | None] | None,
    state_type: str = "COMPLETED",
    task_runs: int = 2,
    states_per_run: int = 3,
    logs_per_run: int = 2,
    artifacts: int = 1,
    keyed_artifact_key: str | None = None,
    inputs: int = 1,
    subflow_depth: int = 0,
    subflow_state_type: str = "COMPLETED",
    deployment_id: str | None = None,
    task_run_state_cache: bool = False,
) -> list[Tree]:
    """``count`` trees in one transaction, one executemany per table (fast).

    ``end_time`` is one value for all trees or a sequence of ``count`` values.
    Other arguments as for :func:`make_tree`.
    """
    if isinstance(end_time, datetime) or end_time is None:
        end_times: list[datetime | None] = [end_time] * count
    else:
        end_times = list(end_time)
        if len(end_times) != count:
            raise ValueError(f"{len(end_times)} end times for {count} trees")
    shape = Shape(
        state_type=state_type,
        task_runs=task_runs,
        states_per_run=states_per_run,
        logs_per_run=logs_per_run,
        artifacts=artifacts,
        keyed_artifact_key=keyed_artifact_key,
        inputs=inputs,
        subflow_depth=subflow_depth,
        subflow_state_type=subflow_state_type,
        deployment_id=deployment_id,
        task_run_state_cache=task_run_state_cache,
    )
    now = datetime.now(UTC)
    batch = Batch()
    with db.engine.begin() as connection:
        flow = flow_id or default_flow(connection, db.dialect)
        trees = [
            build_tree(batch, shape, index=index, flow_id=flow, end_time=end, now=now)
            for index, end in enumerate(end_times)
        ]
        collections = write(connection, db.dialect, batch)
    for tree in trees:
        for artifact_id in tree.artifact_ids:
            if artifact_id in collections:
                tree.artifact_collection_ids.append(collections[artifact_id])
    return trees


def make_tree(
    db: TestDatabase,
    *,
    flow_id: str | None = None,
    end_time: datetime | None,
    state_type: str = "COMPLETED",
    task_runs: int = 2,
    states_per_run: int = 3,
    logs_per_run: int = 2,
    artifacts: int = 1,
    keyed_artifact_key: str | None = None,
    inputs: int = 1,
    subflow_depth: int = 0,
    subflow_state_type: str = "COMPLETED",
    deployment_id: str | None = None,
    task_run_state_cache: bool = False,
) -> Tree:
    """One root flow run and ``subflow_depth`` nested subflows, as Prefect would store them.

    Every flow run in the tree (root and each subflow) gets ``states_per_run`` states,
    ``task_runs`` task runs (each with ``states_per_run`` states and ``logs_per_run`` logs
    carrying both ids), ``logs_per_run`` flow-level logs, ``artifacts`` artifacts and
    ``inputs`` flow_run_input rows. Details:

    * ``end_time=None`` means not terminal: a terminal ``state_type`` becomes RUNNING (a
      non-terminal one such as PAUSED is kept). A non-terminal ``state_type`` with an
      ``end_time`` is written as given (a raw/legacy row).
    * Artifact 0 of each flow run is its result artifact (type ``result``, ``metadata_`` JSON
      ``null``), referenced by the final state's ``result_artifact_id`` when the run is
      terminal. Artifacts 1.. cycle through variants: a bare JSON number ``1``, JSON ``null``
      data with SQL NULL metadata, a unicode table, a markdown string, ``0.25``, a link.
      Artifact 1 also carries the first task run's id.
    * Level k+1 is a subflow whose ``parent_task_run_id`` is an extra task run of level k.
      That task run mirrors the subflow's states (``state_details.child_flow_run_id``) and,
      when the subflow is terminal and ``artifacts >= 1``, its final state points at one more
      result artifact (``task_run_id`` = parent task run, ``flow_run_id`` = level k). Middle
      subflows are COMPLETED; the deepest one is ``subflow_state_type`` (end_time NULL if
      that is not terminal).
    * ``keyed_artifact_key`` adds one more artifact with that key on the root and upserts
      ``artifact_collection`` so that it becomes the key's latest.
    * ``task_run_state_cache=True`` adds a cache row per ordinary task run that points at the
      task run's final state.
    * The root's first flow-level log is 20 000 characters long.
    """
    return make_trees(
        db,
        1,
        flow_id=flow_id,
        end_time=end_time,
        state_type=state_type,
        task_runs=task_runs,
        states_per_run=states_per_run,
        logs_per_run=logs_per_run,
        artifacts=artifacts,
        keyed_artifact_key=keyed_artifact_key,
        inputs=inputs,
        subflow_depth=subflow_depth,
        subflow_state_type=subflow_state_type,
        deployment_id=deployment_id,
        task_run_state_cache=task_run_state_cache,
    )[0]
