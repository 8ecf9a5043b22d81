"""Single rows, for the cases a tree does not cover: reference rows (``flow``,
``deployment``) and late or orphaned ``log`` and ``artifact`` rows (these have no FK, so any
ids will do, even of runs already deleted)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from tests.factory.artifacts import add_artifact
from tests.factory.build import Batch, insert, write
from tests.factory.content import dumps, uuid4, uuid7
from tests.factory.database import TestDatabase

DEFAULT_FLOW_NAME = "archiver-factory-flow"


class _SqlNull:
    def __repr__(self) -> str:
        return "SQL_NULL"


#: Pass as ``data`` to :func:`make_artifact` for SQL NULL (``None`` means JSON ``null``).
SQL_NULL: Any = _SqlNull()
_DEFAULT_DATA: Any = {"value": "wörld", "n": 1}


def default_flow(connection: Connection, dialect: str) -> str:
    """The id of the flow trees belong to unless told otherwise (made on first use)."""
    found = connection.execute(
        text("SELECT id FROM flow WHERE name = :name"), {"name": DEFAULT_FLOW_NAME}
    ).scalar()
    if found is not None:
        return str(found).lower()
    return _insert_flow(connection, dialect, DEFAULT_FLOW_NAME)


def _insert_flow(connection: Connection, dialect: str, name: str) -> str:
    flow_id = uuid4()
    at = datetime.now(UTC)
    insert(
        connection,
        dialect,
        "flow",
        [
            {
                "id": flow_id,
                "created": at,
                "updated": at,
                "name": name,
                "tags": dumps(["ünïcode"]),
                "labels": None,
            }
        ],
    )
    return flow_id


def make_flow(db: TestDatabase, name: str | None = None) -> str:
    """Insert a ``flow`` row (names are unique); return its id."""
    with db.engine.begin() as connection:
        return _insert_flow(connection, db.dialect, name or f"flow-{uuid.uuid4().hex[:12]}")


def make_deployment(db: TestDatabase, flow_id: str, name: str | None = None) -> str:
    """Insert a ``deployment`` row for ``flow_id``; return its id."""
    deployment_id = uuid4()
    at = datetime.now(UTC)
    with db.engine.begin() as connection:
        insert(
            connection,
            db.dialect,
            "deployment",
            [
                {
                    "id": deployment_id,
                    "created": at,
                    "updated": at,
                    "name": name or f"deployment-{uuid.uuid4().hex[:12]}",
                    "flow_id": flow_id,
                    "tags": dumps(["nightly"]),
                    "parameters": dumps({"city": "Zürich"}),
                    "work_queue_name": "default",
                    "entrypoint": "flows.py:nightly",
                    "version": "1",
                }
            ],
        )
    return deployment_id


def make_log(
    db: TestDatabase,
    flow_run_id: str | None = None,
    task_run_id: str | None = None,
    timestamp: datetime | None = None,
    *,
    message: str = "late log line ✓",
    level: int = 20,
    name: str = "prefect.flow_runs",
) -> str:
    """Insert one ``log`` row (no FK: any ids, even of deleted runs); return its id."""
    at = timestamp or datetime.now(UTC)
    log_id = uuid7(at)
    row = {
        "id": log_id,
        "created": datetime.now(UTC),
        "updated": datetime.now(UTC),
        "name": name,
        "level": level,
        "flow_run_id": flow_run_id,
        "task_run_id": task_run_id,
        "message": message,
        "timestamp": at,
    }
    with db.engine.begin() as connection:
        insert(connection, db.dialect, "log", [row])
    return log_id


def make_artifact(
    db: TestDatabase,
    flow_run_id: str | None = None,
    task_run_id: str | None = None,
    key: str | None = None,
    data: Any = _DEFAULT_DATA,
    *,
    artifact_type: str | None = "markdown",
    metadata: Any = None,
    description: str | None = None,
    created: datetime | None = None,
    update_collection: bool = True,
) -> str:
    """Insert one ``artifact`` (no FK); return its id.

    ``data``/``metadata`` are Python values stored as JSON text, ``None`` as JSON ``null``
    (like Prefect's ``sa_JSON``) and :data:`SQL_NULL` as SQL NULL. With a ``key`` and
    ``update_collection``, ``artifact_collection`` is upserted so this artifact is the latest.
    """

    def encode(value: Any) -> str | None:
        return None if value is SQL_NULL else dumps(value)

    at = created or datetime.now(UTC)
    batch = Batch()
    artifact_id = add_artifact(
        batch,
        None,
        at=at,
        flow_run_id=flow_run_id,
        task_run_id=task_run_id,
        key=key,
        artifact_type=artifact_type,
        data=encode(data),
        metadata=encode(metadata),
        description=description,
    )
    if not update_collection:
        batch.collections.clear()
    with db.engine.begin() as connection:
        write(connection, db.dialect, batch)
    return artifact_id
