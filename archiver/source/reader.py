"""Set-based reads of one batch: rows by a list of ids, chunked for the dialect.

A batch reads each table by the ids it already knows (a run tree's flow runs,
their task runs, their states ...), one statement per chunk of ids, every
lookup on an index led by the column it looks up (see
``archiver.source.schema.SELECTION_INDEXES``). On PostgreSQL rows are read with
COPY straight into Arrow (``archiver.source.copy_csv``) until a value the CSV
text cannot carry turns the reader to plain rows; on SQLite the statements run
on the aiosqlite connection itself.

Tree gathering (``archiver.source.trees``) and the sweeps' gatherers
(``archiver.source.sweep_rows``) read through one :class:`Reader` per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.errors import ConcurrentChange
from archiver.models import TableRows, TableShape
from archiver.source.copy_csv import CopyReader
from archiver.source.dialect import (
    chunks,
    has_tag_sql,
    in_list,
    list_statement,
    row_lock,
    select_column,
    sqlite_driver_execute,
)
from archiver.source.schema import PrefectSchema

#: ``extra`` for a lookup by task run: only the rows that name no flow run. A task run's
#: logs and artifacts normally carry its flow run id too, and are read by that.
WITHOUT_FLOW_RUN = " AND flow_run_id IS NULL"


class Reader:
    """Runs the set-based reads of one batch on one connection, chunking id lists."""

    def __init__(self, conn: AsyncConnection, schema: PrefectSchema) -> None:
        self.conn = conn
        self.schema = schema
        self.dialect = conn.dialect.name
        self.quote = conn.dialect.identifier_preparer.quote
        #: PostgreSQL reads with COPY until a value does not parse (then rows, for good)
        self.column_wise = True
        self._copy = CopyReader(conn) if self.dialect == "postgresql" else None

    async def tree_of(self, root_ids: list[str]) -> dict[str, str]:
        """Map every flow run in the trees (roots included) to its root id."""
        sql = f"""
            WITH RECURSIVE tree(id, root_id) AS (
                SELECT id, id FROM flow_run WHERE {self._in("id")}
                UNION ALL
                SELECT child.id, tree.root_id FROM tree
                JOIN task_run ON task_run.flow_run_id = tree.id
                JOIN flow_run AS child ON child.parent_task_run_id = task_run.id
            )
            SELECT id, root_id FROM tree"""
        tree: dict[str, str] = {}
        for chunk in chunks(self.dialect, root_ids):
            found = await self._fetch(sql, chunk)
            tree.update((str(run_id), str(root_id)) for run_id, root_id in found)
        return tree

    async def statuses(
        self, run_ids: list[str], hold_tag: str | None
    ) -> dict[str, tuple[str | None, bool]]:
        """Each run's state type, and whether it carries ``hold_tag``."""
        held = f"CASE WHEN {has_tag_sql(self.dialect, 'flow_run', ':tag')} THEN 1 ELSE 0 END"
        sql = (
            f"SELECT id, state_type, {held if hold_tag else 0} FROM flow_run WHERE {self._in('id')}"
        )
        found: dict[str, tuple[str | None, bool]] = {}
        for chunk in chunks(self.dialect, run_ids):
            params = {"ids": chunk, "tag": hold_tag} if hold_tag else {"ids": chunk}
            result = await self.conn.execute(self._statement(sql), params)
            found.update(
                (str(run_id), (state, bool(on_hold))) for run_id, state, on_hold in result.all()
            )
        return found

    async def refuse_new_subflows(self, task_ids: list[str], known_runs: set[str]) -> None:
        """Raise if a subflow appeared under these task runs after the tree was walked.

        Deleting its parent task run would silently detach it (ON DELETE SET NULL).
        """
        sql = f"SELECT id FROM flow_run WHERE {self._in('parent_task_run_id')}"
        for chunk in chunks(self.dialect, task_ids):
            if any(str(run_id) not in known_runs for (run_id,) in await self._fetch(sql, chunk)):
                raise ConcurrentChange(
                    "a subflow was added to a run tree while it was being archived",
                    hint="run archiver again; the batch is retried automatically",
                )

    async def rows(
        self,
        table: str,
        column: str,
        ids: Sequence[str],
        *,
        lock: bool = False,
        extra: str = "",
    ) -> TableRows:
        """Every column of the rows of ``table`` whose ``column`` is in ``ids``.

        ``extra``: more SQL conditions (`` AND ...``); ``lock``: ``FOR UPDATE`` on
        PostgreSQL (SQLite's batch holds the write lock).
        """
        shape = self.schema.shape(table)
        if self._copy is not None and self.column_wise:
            try:
                found = await self._copy.rows(shape, column, ids, lock=lock, extra=extra)
                return TableRows(shape, table=found)
            except pa.ArrowInvalid:
                self.column_wise = False  # a value COPY's text cannot carry: read rows
        rows = TableRows(shape)
        suffix = row_lock(self.dialect) if lock else ""
        where = f"{self._in(column)}{extra}"
        sql = f"SELECT {self._columns(shape)} FROM {table} WHERE {where}{suffix}"
        for chunk in chunks(self.dialect, ids):
            rows.rows.extend(await self._fetch(sql, chunk))
        return rows

    async def rows_by_any(
        self, table: str, lookups: list[tuple[str, Sequence[str], str]], *, lock: bool = False
    ) -> TableRows:
        """Rows matching any of several indexed lookups ``(column, ids, extra)``, each row
        once (no OR scans)."""
        parts = [
            await self.rows(table, column, ids, lock=lock, extra=extra)
            for column, ids, extra in lookups
        ]
        shape = self.schema.shape(table)
        if all(part.table is not None for part in parts):
            combined = TableRows(shape, table=pa.concat_tables([part.table for part in parts]))
        else:
            rows = [row for part in parts for row in _as_rows(part)]
            combined = TableRows(shape, rows)
        if combined.table is not None and len(pc.unique(combined.table["id"])) == len(combined):
            return combined
        first: dict[str, int] = {}
        for index, row_id in enumerate(combined.ids):
            first.setdefault(row_id, index)
        if len(first) == len(combined):
            return combined
        return combined.take(list(first.values()))

    async def pairs(
        self, table: str, value: str, column: str, ids: Sequence[str], extra: str = ""
    ) -> list[tuple[str, str | None]]:
        """(id, ``value``) of the rows whose ``column`` is in ``ids``."""
        sql = f"SELECT id, {self.quote(value)} FROM {table} WHERE {self._in(column)}{extra}"
        found: list[tuple[str, str | None]] = []
        for chunk in chunks(self.dialect, ids):
            result = await self.conn.execute(self._statement(sql), {"ids": chunk})
            found.extend((str(row[0]), None if row[1] is None else str(row[1])) for row in result)
        return found

    async def ids(self, table: str, column: str, ids: Sequence[str], extra: str = "") -> list[str]:
        """The ids of the rows whose ``column`` is in ``ids``."""
        return [found for found, _ in await self.pairs(table, "id", column, ids, extra)]

    async def count(self, table: str, column: str, ids: Sequence[str], extra: str = "") -> int:
        """How many rows have ``column`` in ``ids``, counted in the database."""
        sql = f"SELECT count(*) FROM {table} WHERE {self._in(column)}{extra}"
        total = 0
        for chunk in chunks(self.dialect, ids):
            total += int(
                (await self.conn.execute(self._statement(sql), {"ids": chunk})).scalar_one()
            )
        return total

    def _in(self, column: str) -> str:
        return in_list(self.dialect, self.quote(column))

    def _statement(self, sql: str) -> Any:
        """``sql`` with ``:ids`` expanding on SQLite, for statements with other parameters too."""
        return list_statement(sql, self.dialect, "ids")

    async def _fetch(self, sql: str, ids: list[str]) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` with ``:ids`` bound to ``ids``, as plain tuples."""
        if self.dialect == "sqlite":
            rows: list[tuple[Any, ...]] = await sqlite_driver_execute(
                self.conn, sql, ids, fetch=True
            )
            return rows
        result = await self.conn.execute(text(sql), {"ids": ids})
        return [tuple(row) for row in result.all()]

    def _columns(self, shape: TableShape) -> str:
        return ", ".join(select_column(self.dialect, column) for column in shape.columns)


def linked_ids(rows: TableRows, column: str) -> set[str]:
    """The ids that ``rows`` name in ``column`` (NULLs left out), as text."""
    return {str(value) for value in rows.column(column) if value is not None}


def _as_rows(part: TableRows) -> list[tuple[Any, ...]]:
    if part.table is None:
        return part.rows
    columns = [part.table.column(i).to_pylist() for i in range(part.table.num_columns)]
    return list(zip(*columns, strict=True))
