"""Deleting exactly the archived rows.

Rows are deleted by the primary keys that were written and verified, never by
re-running the age predicate, and every count must match what was archived;
any difference raises and the caller rolls back.

SQLite, and every sweep batch, delete by primary key, children before parents
(``DELETE_ORDER``), so the cascades find nothing left to remove (measured faster
on SQLite than the cascade).

For a batch of whole run trees (``cascade=True``) PostgreSQL lets the foreign
keys do the work, as a bare delete would: deleting children first costs far
more there (each ``flow_run_state`` deleted before its flow run fires
``ON DELETE SET NULL`` on ``flow_run.state_id``, and 100k primary key probes on
``task_run_state`` cost more than the cascade's lookups by ``task_run_id``).
The cascade stays exact because:

* gather read each cascaded table by the very key the cascade follows
  (``task_run``, ``flow_run_state`` and ``flow_run_input`` by ``flow_run_id``,
  ``task_run_state`` by ``task_run_id``), and locked every flow run and task run
  ``FOR UPDATE``: no row can be added under them until COMMIT (the foreign-key
  check of an INSERT, or of an UPDATE that moves a row in, needs a KEY SHARE
  lock on the parent);
* right before the DELETE, one statement counts those children again; the
  counts must equal the archived counts. A row that left (or any other change)
  makes them differ, and with nothing able to arrive, equal counts mean the
  cascade removes exactly the archived rows;
* the flow runs themselves, logs, artifacts and caches (no foreign keys; new
  ones may arrive at any time) are deleted by id with checked counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.errors import ConcurrentChange
from archiver.source.dialect import chunks, sqlite_driver_execute
from archiver.source.schema import DELETE_ORDER, TREE_TABLES

#: PostgreSQL: tables the flow_run DELETE cascades into, with the parent key and parent table.
CASCADED = {
    "task_run": ("flow_run_id", "flow_run"),
    "flow_run_state": ("flow_run_id", "flow_run"),
    "flow_run_input": ("flow_run_id", "flow_run"),
    "task_run_state": ("task_run_id", "task_run"),
}
#: PostgreSQL: deleted by id, in this order. Artifacts after flow runs: by then the
#: states that name them (``result_artifact_id ON DELETE SET NULL``) are gone.
BY_ID_FIRST = (*(t for t in DELETE_ORDER if t not in TREE_TABLES), "task_run_state_cache", "log")
BY_ID_LAST = ("artifact",)


class DeleteMismatch(ConcurrentChange):
    """A DELETE removed (or would cascade to) a different number of rows than were archived."""


async def delete_archived(
    conn: AsyncConnection, ids_by_table: Mapping[str, Sequence[str]], *, cascade: bool = False
) -> None:
    """Delete exactly the given ids of each table; check every count.

    ``cascade``: the ids are whole run trees, as gather() read them under its
    locks, so PostgreSQL may let the flow_run DELETE cascade (checked by count).
    Raises DeleteMismatch (the caller rolls back) if any count differs.
    """
    unknown = set(ids_by_table) - set(DELETE_ORDER)
    if unknown:
        raise ValueError(f"not archived tables: {sorted(unknown)}")
    if cascade and conn.dialect.name == "postgresql":
        await _delete_postgres(conn, ids_by_table)
        return
    for table in DELETE_ORDER:
        ids = list(ids_by_table.get(table, ()))
        _check(table, await _delete_ids(conn, table, ids), len(ids))


async def _delete_postgres(
    conn: AsyncConnection, ids_by_table: Mapping[str, Sequence[str]]
) -> None:
    def ids(table: str) -> list[str]:
        return list(ids_by_table.get(table, ()))

    for table in BY_ID_FIRST:
        _check(table, await _delete_ids(conn, table, ids(table)), len(ids(table)))
    counts = await _count_children(conn, ids("flow_run"), ids("task_run"))
    for table, found in counts.items():
        _check(table, found, len(ids(table)), cascade=True)
    _check("flow_run", await _delete_ids(conn, "flow_run", ids("flow_run")), len(ids("flow_run")))
    for table in BY_ID_LAST:
        _check(table, await _delete_ids(conn, table, ids(table)), len(ids(table)))


async def _count_children(
    conn: AsyncConnection, run_ids: list[str], task_ids: list[str]
) -> dict[str, int]:
    """The rows the flow_run DELETE will cascade into, counted in one statement."""
    params = {"flow_run": run_ids, "task_run": task_ids}
    counts = ", ".join(
        f"(SELECT count(*) FROM {table} WHERE {key} = ANY(CAST(:{parent} AS uuid[])))"
        for table, (key, parent) in CASCADED.items()
    )
    row = (await conn.execute(text(f"SELECT {counts}"), params)).one()
    return {table: int(count) for table, count in zip(CASCADED, row, strict=True)}


def _check(table: str, removed: int, archived: int, *, cascade: bool = False) -> None:
    if removed == archived:
        return
    what = "the flow_run DELETE would cascade to" if cascade else "deleting it removed"
    raise DeleteMismatch(
        f"{table}: {what} {removed} rows but {archived} were archived "
        "(another process changed them)",
        hint="run archiver again; the batch will be selected afresh",
    )


async def _delete_ids(conn: AsyncConnection, table: str, ids: list[str]) -> int:
    if not ids:
        return 0
    dialect = conn.dialect.name
    removed = 0
    for chunk in chunks(dialect, ids):
        if dialect == "postgresql":
            statement = text(f"DELETE FROM {table} WHERE id = ANY(:ids)")
            removed += (await conn.execute(statement, {"ids": chunk})).rowcount
        else:
            sql = f"DELETE FROM {table} WHERE id IN :ids"
            removed += int(await sqlite_driver_execute(conn, sql, chunk, fetch=False))
    return removed
