"""The keyset walk every sweep uses: one pass over a table in ``(time column, id)`` order.

Each sweep (orphans, standalone task runs, stale collections, events; see
``archiver.source.sweep_rows``) is a :class:`Walk` over one table.

Prefect's older vacuum re-ran ``NOT EXISTS (SELECT … FROM flow_run …)`` over the
whole log table for every batch of 200, so a full sweep cost O(N²/200) (Prefect
issues #22874, #23079). Here each sweep walks its table **once**, in key order,
through an index on its time column, and only below the cutoff (sweep rows
must be old):

1. A window opens at the first row at or after the last window's end
   (``min(time)``, one index probe) and runs to the end of that calendar
   month, so each batch fills exactly one ``month=`` partition.
2. Chunks are read in ``(time, id)`` order after a cursor: ``time >= :t AND
   (time > :t OR id > :id)``, so every statement is an index range scan that
   starts where the last one stopped.
3. In the same statement, the parent each row of the chunk names is looked up
   by primary key (``NOT EXISTS (SELECT 1 FROM flow_run WHERE id = chunk.flow_run_id)``
   over the chunk only, not an anti-join over the table): the cost of a chunk
   does not depend on the size of any table, and only the qualifying rows and
   the chunk's last key (the next cursor) come back.

The walk runs outside the batch transaction and only proposes ids.
:func:`lock_rows` then locks those ids (PostgreSQL ``FOR UPDATE SKIP LOCKED``)
and re-checks every condition in SQL, so a row that gained a parent, got
younger or was taken by another archiver in between is simply left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.models import TableRows
from archiver.source.dialect import (
    chunks,
    from_db_time,
    in_list,
    list_statement,
    month_start,
    next_month,
    row_lock,
    select_column,
    to_db_time,
)
from archiver.source.schema import PrefectSchema


@dataclass(frozen=True)
class Link:
    """``column`` names a row of ``parent`` (by id), without a foreign key."""

    column: str
    parent: str


@dataclass(frozen=True)
class Walk:
    """Which rows of ``table`` a sweep takes.

    A row qualifies when its ``time_column`` is older than the cutoff, ``where``
    (SQL on the table's own columns; may use ``:cutoff``) holds, and, if there
    are ``links``, the first of them that is not NULL names a missing parent.
    """

    table: str
    time_column: str
    links: tuple[Link, ...] = ()
    where: str = ""

    def orphan_sql(self, alias: str = "") -> str:
        """The links condition as SQL, checked by primary key for each row."""
        if not self.links:
            return "1 = 1"
        alias = alias or self.table
        cases = []
        for index, link in enumerate(self.links):
            earlier = [f"{alias}.{prior.column} IS NULL" for prior in self.links[:index]]
            missing = (
                f"{alias}.{link.column} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM "
                f"{link.parent} AS parent WHERE parent.id = {alias}.{link.column})"
            )
            cases.append("(" + " AND ".join([*earlier, missing]) + ")")
        return "(" + " OR ".join(cases) + ")"

    def conditions(self) -> str:
        where = f" AND ({self.where})" if self.where else ""
        return f"{self.table}.{self.time_column} < :cutoff{where} AND {self.orphan_sql()}"


@dataclass
class Slice:
    """Ids the walk proposes for one batch, all in one month."""

    ids: list[str]
    partition: str


class Walker:
    """One pass over a table in ``(time, id)`` order; :meth:`next_slice` resumes it."""

    def __init__(self, walk: Walk, cutoff: datetime, chunk: int) -> None:
        self.walk = walk
        self.cutoff = cutoff
        self.chunk = chunk
        self.lower: datetime | None = None  # start of the next window
        self.upper: datetime | None = None  # end of the open window (exclusive)
        self.after: tuple[Any, str] | None = None  # last (time, id) read in the window
        self.partition = ""

    async def next_slice(self, conn: AsyncConnection, want: int) -> Slice | None:
        """Up to ``want`` candidate ids of one month; None when the table is done."""
        found: list[str] = []
        while True:
            if self.upper is None and not await self._open_window(conn):
                return None
            partition = self.partition
            rows = await self._chunk(conn)
            if not rows:
                self.lower, self.upper, self.after = self.upper, None, None
                if found:
                    return Slice(found, partition)
                continue
            for time_value, row_id, qualifies in rows:
                self.after = (time_value, str(row_id))
                if qualifies:
                    found.append(str(row_id))
                    if len(found) >= want:
                        return Slice(found, partition)

    async def _open_window(self, conn: AsyncConnection) -> bool:
        dialect = conn.dialect.name
        table, column = self.walk.table, self.walk.time_column
        lower = "" if self.lower is None else f" AND {column} >= :lower"
        params: dict[str, Any] = {"cutoff": to_db_time(dialect, self.cutoff)}
        if self.lower is not None:
            params["lower"] = to_db_time(dialect, self.lower)
        sql = f"SELECT min({column}) FROM {table} WHERE {column} < :cutoff{lower}"
        first = (await conn.execute(text(sql), params)).scalar()
        if first is None:
            return False
        self.upper = min(self.cutoff, next_month(from_db_time(first)))
        self.lower = month_start(from_db_time(first))
        self.partition = f"month={self.lower:%Y-%m}"
        return True

    async def _chunk(self, conn: AsyncConnection) -> Sequence[Any]:
        """The next chunk in key order: its qualifying rows, and its last row (the cursor).

        Parents are looked up by primary key for the chunk's rows only, inside
        the statement, so only qualifying rows cross the wire.
        """
        dialect = conn.dialect.name
        walk = self.walk
        column = f"{walk.table}.{walk.time_column}"
        assert self.upper is not None and self.lower is not None
        params: dict[str, Any] = {
            "upper": to_db_time(dialect, self.upper),
            "limit": self.chunk,
            "cutoff": to_db_time(dialect, self.cutoff),
        }
        if self.after is None:
            keyset = f"{column} >= :lower"
            params["lower"] = to_db_time(dialect, self.lower)
        else:
            keyset = f"{column} >= :t AND ({column} > :t OR {walk.table}.id > :id)"
            params["t"], params["id"] = self.after
        where = f" AND ({walk.where})" if walk.where else ""
        links = "".join(f", {walk.table}.{link.column}" for link in walk.links)
        sql = f"""
            WITH chunk AS (
                SELECT {column} AS walked, {walk.table}.id{links} FROM {walk.table}
                WHERE {keyset} AND {column} < :upper{where}
                ORDER BY {column}, {walk.table}.id LIMIT :limit
            ), marked AS (
                SELECT walked, id, {walk.orphan_sql("chunk")} AS qualifies,
                       row_number() OVER (ORDER BY walked DESC, id DESC) AS from_end
                FROM chunk
            )
            SELECT walked, CAST(id AS text), qualifies FROM marked
            WHERE qualifies OR from_end = 1 ORDER BY walked, id"""
        return (await conn.execute(text(sql), params)).all()


async def lock_rows(
    conn: AsyncConnection,
    schema: PrefectSchema,
    walk: Walk,
    ids: Sequence[str],
    cutoff: datetime,
) -> TableRows:
    """Lock and read the rows of ``ids`` that still qualify for ``walk``.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so two archivers never take the same
    row and Prefect's writes to other rows go on. SQLite: the caller holds the
    write lock (``BEGIN IMMEDIATE``).
    """
    dialect = conn.dialect.name
    shape = schema.shape(walk.table)
    columns = ", ".join(select_column(dialect, column) for column in shape.columns)
    lock = row_lock(dialect, "FOR UPDATE SKIP LOCKED")
    sql = (
        f"SELECT {columns} FROM {walk.table}"
        f" WHERE {in_list(dialect, walk.table + '.id')} AND {walk.conditions()}{lock}"
    )
    found = TableRows(shape)
    for chunk in chunks(dialect, ids):
        params = {"ids": chunk, "cutoff": to_db_time(dialect, cutoff)}
        result = await conn.execute(list_statement(sql, dialect, "ids"), params)
        found.rows.extend(tuple(row) for row in result.all())
    return found


async def count_rows(conn: AsyncConnection, walk: Walk, cutoff: datetime) -> int:
    """How many rows ``walk`` would take now: one statement, one pass (for plans)."""
    sql = f"SELECT count(*) FROM {walk.table} WHERE {walk.conditions()}"
    params = {"cutoff": to_db_time(conn.dialect.name, cutoff)}
    return int((await conn.execute(text(sql), params)).scalar() or 0)


def time_range(rows: TableRows, column: str) -> tuple[datetime, datetime]:
    """Oldest and newest value of ``column`` among ``rows`` (which must not be empty)."""
    index = rows.shape.column_names.index(column)
    values = [from_db_time(row[index]) for row in rows.rows if row[index] is not None]
    return min(values), max(values)
