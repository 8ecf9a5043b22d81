"""Artifacts of a flow run, and the ``artifact_collection`` upsert a keyed artifact brings."""

from __future__ import annotations

from datetime import datetime, timedelta

from tests.factory.build import Batch, Tree
from tests.factory.content import dumps, result_reference, uuid4

# Variants for artifacts after the first (result) artifact of a flow run:
# (type, data as JSON text or None for SQL NULL, metadata_ JSON text or None, description)
ARTIFACT_VARIANTS: tuple[tuple[str, str | None, str | None, str | None], ...] = (
    ("progress", "1", dumps({"unit": "percent"}), "bare JSON number: SQLite stores INTEGER"),
    ("markdown", "null", None, None),  # JSON null data, SQL NULL metadata_
    (
        "table",
        dumps([{"city": "Zürich", "n": 1}, {"city": "東京", "n": 2.5, "ok": None}]),
        dumps({}),
        "a table ✓",
    ),
    ("markdown", dumps('# Report\n\nünïcode ✓ "quoted"'), dumps({"k": "v"}), "markdown"),
    ("progress", "0.25", "null", "bare JSON float: SQLite stores REAL"),
    ("link", dumps("https://example.com/ü?x=1&y=2"), None, None),
)


def add_artifact(
    batch: Batch,
    tree: Tree | None,
    *,
    at: datetime,
    flow_run_id: str | None,
    task_run_id: str | None,
    key: str | None,
    artifact_type: str | None,
    data: str | None,
    metadata: str | None,
    description: str | None,
) -> str:
    artifact_id = uuid4()
    batch.add(
        "artifact",
        {
            "id": artifact_id,
            "created": at,
            "updated": at,
            "key": key,
            "type": artifact_type,
            "data": data,
            "metadata_": metadata,
            "task_run_id": task_run_id,
            "flow_run_id": flow_run_id,
            "description": description,
        },
    )
    if tree is not None:
        tree.artifact_ids.append(artifact_id)
    if key is not None:
        batch.collections.append(
            {
                "id": uuid4(),
                "created": at,
                "updated": at,
                "key": key,
                "latest_id": artifact_id,
                "task_run_id": task_run_id,
                "flow_run_id": flow_run_id,
                "type": artifact_type,
                "data": data,
                "description": description,
                "metadata_": metadata,
            }
        )
    return artifact_id


def add_result_artifact(batch: Batch, tree: Tree, *, flow_run_id: str, at: datetime) -> str:
    """A ``result`` artifact as Prefect writes it (``metadata_`` JSON ``null``); its id."""
    return add_artifact(
        batch,
        tree,
        at=at,
        flow_run_id=flow_run_id,
        task_run_id=None,
        key=None,
        artifact_type="result",
        data=result_reference(),
        metadata="null",  # Prefect passes None: sa_JSON stores JSON null
        description=None,
    )


def add_flow_artifacts(
    batch: Batch, tree: Tree, *, flow_run_id: str, final_time: datetime, count: int
) -> list[str]:
    """``count`` artifacts of a flow run: its result artifact, then the variants in turn."""
    artifact_ids: list[str] = []
    for position in range(count):
        if position == 0:
            artifact_ids.append(
                add_result_artifact(batch, tree, flow_run_id=flow_run_id, at=final_time)
            )
            continue
        kind, data, metadata, description = ARTIFACT_VARIANTS[
            (position - 1) % len(ARTIFACT_VARIANTS)
        ]
        artifact_ids.append(
            add_artifact(
                batch,
                tree,
                at=final_time - timedelta(milliseconds=5 * position),
                flow_run_id=flow_run_id,
                task_run_id=None,  # the caller sets it on the first one if a task exists
                key=None,
                artifact_type=kind,
                data=data,
                metadata=metadata,
                description=description,
            )
        )
    return artifact_ids


def add_keyed_artifact(
    batch: Batch,
    tree: Tree,
    *,
    key: str,
    flow_run_id: str,
    task_run_id: str | None,
    at: datetime,
) -> str:
    """A markdown artifact with ``key``: the newest of its key once the batch is written."""
    return add_artifact(
        batch,
        tree,
        at=at,
        flow_run_id=flow_run_id,
        task_run_id=task_run_id,
        key=key,
        artifact_type="markdown",
        data=dumps(f"# {key}\n\nlatest ✓"),
        metadata=dumps({"owner": "ünïcode"}),
        description="keyed artifact",
    )
