"""One archived run, straight from the archive, without a database.

The run is found through the manifests (a top-level run's batch is named there)
or, for a subflow, with a filter on the ``flow_run`` dataset, which pyarrow
answers from Parquet statistics without reading every file in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from archiver.archive.catalog import list_batches
from archiver.archive.manifest import BatchManifest
from archiver.archive.storage import Storage
from archiver.errors import ArchiverError


@dataclass
class RunView:
    """A flow run with its states, task runs, logs and subflows, as archived."""

    run: dict[str, Any]
    states: list[dict[str, Any]] = field(default_factory=list)
    task_runs: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    subflows: list[RunView] = field(default_factory=list)


def show_run(storage: Storage, run_id: str) -> RunView:
    """The archived tree under ``run_id``; raises ArchiverError if it is not archived."""
    batch = _batch_of(storage, run_id)
    keys = {record.table: record.key for record in batch.files if record.role == "archived"}

    files: dict[str, bytes] = {}

    def read(table: str, where: ds.Expression | None = None) -> list[dict[str, Any]]:
        if table not in keys:
            return []
        if table not in files:
            files[table] = storage.get(keys[table])
        return list(pq.read_table(pa.BufferReader(files[table]), filters=where).to_pylist())

    # Only this tree's rows become Python objects: a compacted batch holds many trees.
    runs = read("flow_run")
    task_parents = read("task_run", ds.field("flow_run_id").isin(_tree_runs(run_id, runs, read)))
    run_ids = sorted({t["flow_run_id"] for t in task_parents} | {run_id})
    task_ids = sorted(t["id"] for t in task_parents)
    tables = {
        "flow_run": [r for r in runs if r["id"] in set(run_ids)],
        "task_run": task_parents,
        "flow_run_state": read("flow_run_state", ds.field("flow_run_id").isin(run_ids)),
        "log": read("log", ds.field("flow_run_id").isin(run_ids)
                    | ds.field("task_run_id").isin(task_ids)),
    }  # fmt: skip
    return _view(run_id, tables)


def _tree_runs(run_id: str, runs: list[dict[str, Any]], read: Any) -> list[str]:
    """``run_id`` and its subflows at any depth (a subflow's parent is a task run)."""
    tree, frontier = {run_id}, [run_id]
    while frontier:
        tasks = read("task_run", ds.field("flow_run_id").isin(frontier))
        task_ids = {t["id"] for t in tasks}
        frontier = [r["id"] for r in runs if r["parent_task_run_id"] in task_ids]
        tree.update(frontier)
    return sorted(tree)


def _batch_of(storage: Storage, run_id: str) -> BatchManifest:
    batches = list_batches(storage)
    for batch in batches:
        if run_id in batch.root_ids:
            return batch
    batch_of_key = {record.key: batch for batch in batches for record in batch.files}
    if batches:  # a subflow: Parquet statistics on id let pyarrow skip most row groups
        runs = ds.dataset(storage.path("flow_run"), filesystem=storage.fs, partitioning="hive")
        for fragment in runs.get_fragments():
            key = storage.key_of(fragment.path)
            if key in batch_of_key and fragment.count_rows(filter=ds.field("id") == run_id):
                return batch_of_key[key]
    raise ArchiverError(
        f"flow run {run_id} is not in the archive at {storage.describe()}",
        hint="check the id, or list the batches with `archiver ls`",
    )


def _view(run_id: str, tables: dict[str, list[dict[str, Any]]]) -> RunView:
    runs = {r["id"]: r for r in tables.get("flow_run", [])}
    task_runs = [t for t in tables.get("task_run", []) if t["flow_run_id"] == run_id]
    task_ids = {t["id"] for t in task_runs}
    view = RunView(
        run=runs[run_id],
        states=sorted(
            (s for s in tables.get("flow_run_state", []) if s["flow_run_id"] == run_id),
            key=lambda s: s["timestamp"],
        ),
        task_runs=sorted(task_runs, key=lambda t: (t["start_time"] is None, t["start_time"])),
        logs=sorted(
            (lg for lg in tables.get("log", []) if lg["flow_run_id"] == run_id
             or lg["task_run_id"] in task_ids),
            key=lambda lg: lg["timestamp"],
        ),
    )  # fmt: skip
    view.subflows = [
        _view(child_id, tables)
        for child_id, child in runs.items()
        if child["parent_task_run_id"] in task_ids
    ]
    return view
