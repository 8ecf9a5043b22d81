"""Deleting exactly the archived rows, children before parents.

Rows are deleted by the primary keys that were written and verified, never by
re-running the age predicate and never by relying on a cascade: every child
table is emptied of its archived rows before its parent, so the cascades find
nothing left to remove. Each DELETE must remove exactly as many rows as were
archived for its table; any difference raises and the caller rolls back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.errors import ConcurrentChange
from archiver.source.schema import DELETE_ORDER
from archiver.source.selection import CHUNK


class DeleteMismatch(ConcurrentChange):
    """A DELETE removed a different number of rows than were archived."""


async def delete_archived(conn: AsyncConnection, ids_by_table: Mapping[str, Sequence[str]]) -> None:
    """Delete the given ids from each table in dependency order; check every count."""
    unknown = set(ids_by_table) - set(DELETE_ORDER)
    if unknown:
        raise ValueError(f"not archived tables: {sorted(unknown)}")
    for table in DELETE_ORDER:
        ids = list(ids_by_table.get(table, ()))
        removed = await _delete_ids(conn, table, ids)
        if removed != len(ids):
            raise DeleteMismatch(
                f"deleting {table} removed {removed} rows but {len(ids)} were archived "
                "(another process changed them)",
                hint="run archiver again; the batch will be selected afresh",
            )


async def _delete_ids(conn: AsyncConnection, table: str, ids: list[str]) -> int:
    dialect = conn.dialect.name
    if dialect == "postgresql":
        statement = text(f"DELETE FROM {table} WHERE id = ANY(:ids)")
    else:
        statement = text(f"DELETE FROM {table} WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True)
        )
    removed = 0
    size = CHUNK[dialect]
    for start in range(0, len(ids), size):
        result = await conn.execute(statement, {"ids": ids[start : start + size]})
        removed += result.rowcount
    return removed
