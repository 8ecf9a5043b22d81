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

from archiver.errors import ArchiverError
from archiver.manifest import BatchManifest
from archiver.storage import Storage
from archiver.verify import list_batches


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
    tables = {
        record.table: pq.read_table(pa.BufferReader(storage.get(record.key))).to_pylist()
        for record in batch.files
        if record.role == "archived"
    }
    return _view(run_id, tables)


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
