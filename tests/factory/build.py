"""The two records a factory call fills, and how one is written.

A :class:`Batch` collects the rows of one or many trees, table by table, in the order they
were built; :func:`write` inserts it in foreign-key order with one executemany per table.
A :class:`Tree` is what the caller gets back: the ids of every row of one tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import text
from sqlalchemy.engine import Connection

from tests.factory.schema import RUN_TABLES
from tests.factory.values import adapt


@dataclass
class Tree:
    """Ids (as lowercase strings) of every row one :func:`make_tree` call wrote."""

    root_id: str
    end_time: datetime | None
    flow_run_ids: list[str] = field(default_factory=list)  # root first, then deeper subflows
    task_run_ids: list[str] = field(default_factory=list)
    parent_task_run_ids: list[str] = field(default_factory=list)  # subflow links (subset)
    flow_run_state_ids: list[str] = field(default_factory=list)
    task_run_state_ids: list[str] = field(default_factory=list)
    log_ids: list[str] = field(default_factory=list)
    artifact_ids: list[str] = field(default_factory=list)
    flow_run_input_ids: list[str] = field(default_factory=list)
    task_run_state_cache_ids: list[str] = field(default_factory=list)
    artifact_collection_ids: list[str] = field(default_factory=list)
    keyed_artifact_id: str | None = None

    @property
    def subflow_ids(self) -> list[str]:
        return self.flow_run_ids[1:]

    def rows_by_table(self) -> dict[str, set[str]]:
        """Table -> ids. ``artifact_collection`` holds the rows whose ``latest_id`` was one of
        this tree's artifacts when the tree was written (a later tree with the same key takes
        the row over)."""
        return {
            "flow_run": set(self.flow_run_ids),
            "task_run": set(self.task_run_ids),
            "flow_run_state": set(self.flow_run_state_ids),
            "task_run_state": set(self.task_run_state_ids),
            "flow_run_input": set(self.flow_run_input_ids),
            "log": set(self.log_ids),
            "artifact": set(self.artifact_ids),
            "artifact_collection": set(self.artifact_collection_ids),
            "task_run_state_cache": set(self.task_run_state_cache_ids),
        }

    def counts(self) -> dict[str, int]:
        return {table: len(ids) for table, ids in self.rows_by_table().items()}


@dataclass
class Batch:
    """Rows to write: per run table in build order, then the ``flow_run`` links (its
    ``state_id`` and ``parent_task_run_id``, set once the rows they name exist) and the
    ``artifact_collection`` upserts in order (a later one of the same key wins)."""

    rows: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {table: [] for table in RUN_TABLES}
    )
    links: list[dict[str, Any]] = field(default_factory=list)  # flow_run state/parent update
    collections: list[dict[str, Any]] = field(default_factory=list)  # upserts, in order

    def add(self, table: str, row: dict[str, Any]) -> None:
        self.rows[table].append(row)

    def update(self, table: str, row_id: str, **changes: Any) -> None:
        for row in reversed(self.rows[table]):
            if row["id"] == row_id:
                row.update(changes)
                return
        raise KeyError(f"{table} {row_id} not in batch")


def _quote(column: str) -> str:
    return f'"{column}"'


def insert(connection: Connection, dialect: str, table: str, rows: list[dict[str, Any]]) -> None:
    """One executemany of ``rows`` (all with the columns of the first) into ``table``."""
    if not rows:
        return
    columns = list(rows[0])
    sql = (
        f"INSERT INTO {table} ({', '.join(_quote(c) for c in columns)}) "
        f"VALUES ({', '.join(':' + c for c in columns)})"
    )
    connection.execute(text(sql), [{c: adapt(row[c], dialect) for c in columns} for row in rows])


_COLLECTION_UPSERT = """
INSERT INTO artifact_collection
    (id, created, updated, "key", latest_id, task_run_id, flow_run_id, type, data,
     description, metadata_)
VALUES (:id, :created, :updated, :key, :latest_id, :task_run_id, :flow_run_id, :type, :data,
        :description, :metadata_)
ON CONFLICT ("key") DO UPDATE SET
    updated = excluded.updated, latest_id = excluded.latest_id,
    task_run_id = excluded.task_run_id, flow_run_id = excluded.flow_run_id,
    type = excluded.type, data = excluded.data, description = excluded.description,
    metadata_ = excluded.metadata_
"""


def write(connection: Connection, dialect: str, batch: Batch) -> dict[str, str]:
    """Insert a batch in FK order; return ``latest_id -> collection id`` for touched keys."""
    for table in ("artifact", "flow_run", "task_run", "flow_run_state", "task_run_state"):
        insert(connection, dialect, table, batch.rows[table])
    if batch.links:
        connection.execute(
            text(
                "UPDATE flow_run SET state_id = :state_id, parent_task_run_id = :parent_task_run_id"
                " WHERE id = :id"
            ),
            batch.links,
        )
    for table in ("flow_run_input", "log", "task_run_state_cache"):
        insert(connection, dialect, table, batch.rows[table])
    if not batch.collections:
        return {}
    for row in batch.collections:  # one at a time: later rows of the same key must win
        connection.execute(text(_COLLECTION_UPSERT), {c: adapt(v, dialect) for c, v in row.items()})
    keys = sorted({row["key"] for row in batch.collections})
    result = connection.execute(
        text('SELECT id, latest_id FROM artifact_collection WHERE "key" IN :keys').bindparams(
            sa.bindparam("keys", expanding=True)
        ),
        {"keys": keys},
    )
    return {str(latest).lower(): str(row_id).lower() for row_id, latest in result}
