"""Writing restored rows back into a Prefect database, in foreign-key order.

``archiver.engine.restore`` chooses the rows (Arrow tables read from the
archive); :func:`insert_restored` puts them in, inside the caller's transaction,
in the order of shared/prefect-schema.md §4.8: artifacts; flow runs without
their ``state_id`` and ``parent_task_run_id``; task runs; states; then those two
links; then inputs, logs, cache entries and events. A flow the runs name that is
gone from the target comes back from the archive's snapshot first.

Rows that already exist are skipped (``ON CONFLICT DO NOTHING``) or, with
``on_conflict="error"``, refused before anything of their table is written.
Columns are matched by name against the target's reflected columns: a column
the target lacks is reported and left out; a column the archive lacks takes the
target's default. Values go back in the target dialect's storage conventions
(SQLite: naive UTC text for timestamps, epoch plus duration for intervals).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import pyarrow as pa
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.errors import ArchiverError
from archiver.models import Column, Kind, TableShape
from archiver.source.dialect import EPOCH, chunks, in_list, list_statement, to_db_time
from archiver.source.schema import PrefectSchema

INSERT_ORDER = (
    "artifact",
    "flow_run",
    "task_run",
    "flow_run_state",
    "task_run_state",
    "flow_run_input",
    "log",
    "task_run_state_cache",
    "events",
    "event_resources",
)
_DEFERRED_LINKS = ("state_id", "parent_task_run_id")  # flow_run columns set after states


@dataclass
class RestoredRows:
    """What a restore wrote, per table: rows inserted, rows already there, columns left out."""

    inserted: dict[str, int] = field(default_factory=dict)
    existing: dict[str, int] = field(default_factory=dict)
    dropped_columns: dict[str, list[str]] = field(default_factory=dict)


async def insert_restored(
    conn: AsyncConnection,
    schema: PrefectSchema,
    tables: Mapping[str, pa.Table],
    flows: pa.Table,
    on_conflict: Literal["skip", "error"],
) -> RestoredRows:
    """Insert ``tables`` (one per name in ``INSERT_ORDER``) in foreign-key order.

    ``flows``: the archived flow rows, one per id, to put back any the runs name
    and the target lacks. Raises ArchiverError for a flow that is in neither, or
    (``on_conflict="error"``) for rows that already exist; the caller rolls back.
    """
    writer = RowWriter(conn, schema, on_conflict)
    await writer.ensure_flows(flows, tables["flow_run"])
    for name in INSERT_ORDER:
        held_back = _DEFERRED_LINKS if name == "flow_run" else ()
        await writer.insert(name, tables[name], held_back)
    await writer.link_flow_runs(tables["flow_run"])
    return writer.written


class RowWriter:
    """Inserts archived rows into one connection's database, counting what it wrote."""

    def __init__(
        self, conn: AsyncConnection, schema: PrefectSchema, on_conflict: Literal["skip", "error"]
    ) -> None:
        self.conn = conn
        self.schema = schema
        self.dialect = conn.dialect.name
        self.on_conflict = on_conflict
        self.quote = conn.dialect.identifier_preparer.quote
        self.written = RestoredRows()
        self.inserted_runs: set[str] = set()

    async def existing_ids(self, table: str, ids: list[str]) -> set[str]:
        """Which of ``ids`` are already rows of ``table``."""
        sql = f"SELECT id FROM {table} WHERE {in_list(self.dialect, 'id')}"
        found: set[str] = set()
        for chunk in chunks(self.dialect, ids):
            statement = list_statement(sql, self.dialect, "ids")
            result = await self.conn.execute(statement, {"ids": chunk})
            found.update(str(row[0]) for row in result.all())
        return found

    async def ensure_flows(self, flows: pa.Table, runs: pa.Table) -> None:
        """flow_run.flow_id must exist: put back archived flow rows that are gone."""
        if runs.num_rows == 0:
            return
        needed = {r["flow_id"] for r in runs.select(["flow_id"]).to_pylist()}
        snapshot = _with_ids(flows, needed)
        missing = needed - await self.existing_ids("flow", sorted(needed))
        if missing - set(snapshot.column("id").to_pylist() if snapshot.num_rows else []):
            raise ArchiverError(
                f"flow {sorted(missing)[0]} is neither in the target database nor in the archive",
                hint="create the flow in the target first (any name), then restore again",
            )
        await self.insert("flow", _with_ids(snapshot, missing), (), count=False)

    async def insert(
        self, table: str, rows: pa.Table, held_back: Sequence[str], *, count: bool = True
    ) -> None:
        """Insert the rows of ``table`` that are not there yet, without ``held_back`` columns."""
        shape = self.schema.shape(table) if table in self.schema.tables else None
        if shape is None or rows.num_rows == 0:
            return
        ids = [str(i) for i in rows.column("id").to_pylist()]
        existing = await self.existing_ids(table, ids)
        if existing and self.on_conflict == "error":
            raise ArchiverError(
                f"{len(existing)} {table} rows already exist in the target (e.g. {min(existing)})",
                hint="restore without --error-on-existing to skip them, or into another database",
            )
        columns = self._columns(table, shape, rows, held_back)
        new_rows = [r for r in rows.to_pylist() if str(r["id"]) not in existing]
        if table == "flow_run":
            self.inserted_runs = {str(r["id"]) for r in new_rows}
            await self._drop_missing_references(new_rows)
        if count:
            self.written.inserted[table] = len(new_rows)
            self.written.existing[table] = len(existing)
        if new_rows:
            await self.conn.execute(self._statement(table, columns), [
                {c.name: self._value(c.kind, r.get(c.name)) for c in columns}
                for r in new_rows
            ])  # fmt: skip

    async def link_flow_runs(self, runs: pa.Table) -> None:
        """Set the links held back from the inserted flow runs, now that their targets exist."""
        if runs.num_rows == 0:
            return
        statement = text(
            "UPDATE flow_run SET state_id = :state_id, parent_task_run_id = :parent WHERE id = :id"
        )
        params = [
            {"id": r["id"], "state_id": r["state_id"], "parent": r["parent_task_run_id"]}
            for r in runs.select(["id", "state_id", "parent_task_run_id"]).to_pylist()
            if r["id"] in self.inserted_runs and (r["state_id"] or r["parent_task_run_id"])
        ]
        if params:
            await self.conn.execute(statement, params)

    async def _drop_missing_references(self, runs: list[dict[str, Any]]) -> None:
        """A work queue or legacy infrastructure block that is gone becomes NULL (§4.8)."""
        for column, table in (
            ("work_queue_id", "work_queue"),
            ("infrastructure_document_id", "block_document"),
        ):
            named = sorted({str(r[column]) for r in runs if r.get(column)})
            present = await self.existing_ids(table, named) if named else set()
            for run in runs:
                if run.get(column) and str(run[column]) not in present:
                    run[column] = None

    def _columns(
        self, table: str, shape: TableShape, rows: pa.Table, held_back: Sequence[str]
    ) -> list[Column]:
        archived = set(rows.column_names) - {"month"}
        dropped = sorted(archived - set(shape.column_names))
        if dropped:
            self.written.dropped_columns[table] = dropped
        return [c for c in shape.columns if c.name in archived and c.name not in held_back]

    def _statement(self, table: str, columns: Sequence[Column]) -> TextClause:
        names = ", ".join(self.quote(c.name) for c in columns)
        values = ", ".join(self._placeholder(c) for c in columns)
        return text(f"INSERT INTO {table} ({names}) VALUES ({values}) ON CONFLICT DO NOTHING")

    def _placeholder(self, column: Column) -> str:
        if self.dialect == "postgresql" and column.kind is Kind.JSON:
            # bind the document as text so the driver's own JSON codec never re-encodes it
            cast = "jsonb" if column.sql_type == "JSONB" else "json"
            return f"CAST(CAST(:{column.name} AS text) AS {cast})"
        return f":{column.name}"

    def _value(self, kind: Kind, value: Any) -> Any:
        """SQLite stores timestamps as naive UTC text and intervals as epoch plus duration."""
        if value is None or self.dialect != "sqlite":
            return value
        if kind is Kind.TIMESTAMP:
            return to_db_time("sqlite", value)
        if kind is Kind.INTERVAL:
            assert isinstance(value, timedelta)
            return to_db_time("sqlite", EPOCH + value)
        return value


def _with_ids(table: pa.Table, ids: set[str]) -> pa.Table:
    if table.num_rows == 0:
        return table
    return table.filter(pa.array([value in ids for value in table.column("id").to_pylist()]))
