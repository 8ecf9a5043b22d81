"""Keeping ``artifact_collection`` consistent with the artifacts that remain.

One collection row per artifact key points (``latest_id``, no foreign key) at
the newest artifact with that key and copies its fields (dossier §4.6). When a
batch archives that artifact, the row must follow, in the batch's transaction:

* another artifact with the key remains: the row is re-pointed to the newest
  one (``ORDER BY created DESC``), its fields copied, as Prefect does;
* none remains: the row is archived with the batch and deleted.

:func:`plan_collections` decides this before anything is written (so deleted
rows go into the batch's files); :func:`apply_repoints` runs after the DELETEs
and checks that each row still pointed where the plan saw it. On PostgreSQL the
rows are locked ``FOR UPDATE``: Prefect's upsert of a new artifact's collection
waits for the batch, then lands on a consistent row. :func:`reconcile_keys` is
the same rule applied after a restore.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.errors import ConcurrentChange
from archiver.models import Repoint, TableRows
from archiver.source.dialect import chunks, in_list, list_statement, row_lock, select_column
from archiver.source.schema import PrefectSchema

#: Fields a collection copies from its latest artifact.
COPIED = ("task_run_id", "flow_run_id", "type", "data", "description", "metadata_")
QUOTED_KEY = '"key"'


async def plan_collections(
    conn: AsyncConnection, schema: PrefectSchema, artifacts: TableRows
) -> tuple[TableRows, list[Repoint]]:
    """Collections whose latest artifact is in ``artifacts``: rows to archive, rows to re-point."""
    archived_by_key: dict[str, list[str]] = {}
    # column(): artifacts may be held column-wise (PostgreSQL reads them with COPY)
    for key, row_id in zip(artifacts.column("key"), artifacts.ids, strict=True):
        if key is not None:
            archived_by_key.setdefault(str(key), []).append(row_id)
    collections = await _collections_by_key(conn, schema, sorted(archived_by_key))
    latest = collections.shape.column_names.index("latest_id")
    archived_ids = set(artifacts.ids)
    collections.rows = [row for row in collections.rows if str(row[latest]) in archived_ids]
    return await plan_stale(conn, collections, archived_by_key)


async def plan_stale(
    conn: AsyncConnection,
    collections: TableRows,
    archived_by_key: dict[str, list[str]] | None = None,
) -> tuple[TableRows, list[Repoint]]:
    """For collections losing their latest artifact: rows to archive, rows to re-point.

    ``archived_by_key``: artifacts of each key that are leaving with the batch.
    """
    names = collections.shape.column_names
    key_index, latest_index = names.index("key"), names.index("latest_id")
    archived = TableRows(collections.shape)
    repoints = []
    for row, row_id in zip(collections.rows, collections.ids, strict=True):
        key = str(row[key_index])
        newest = await newest_artifact(conn, key, (archived_by_key or {}).get(key, []))
        if newest is None:
            archived.rows.append(row)
        else:
            repoints.append(Repoint(row_id, str(row[latest_index]), newest))
    return archived, repoints


async def _collections_by_key(
    conn: AsyncConnection, schema: PrefectSchema, keys: list[str]
) -> TableRows:
    dialect = conn.dialect.name
    shape = schema.shape("artifact_collection")
    found = TableRows(shape)
    columns = ", ".join(select_column(dialect, column) for column in shape.columns)
    where = in_list(dialect, QUOTED_KEY)
    sql = f"SELECT {columns} FROM artifact_collection WHERE {where}{row_lock(dialect)}"
    for chunk in chunks(dialect, keys):
        result = await conn.execute(list_statement(sql, dialect, "ids"), {"ids": chunk})
        found.rows.extend(tuple(row) for row in result.all())
    return found


async def newest_artifact(conn: AsyncConnection, key: str, excluding: Sequence[str]) -> str | None:
    """The id of the newest artifact with ``key``, leaving out ``excluding`` (being archived)."""
    dialect = conn.dialect.name
    params: dict[str, object] = {"key": key}
    excluded = ""
    if excluding:
        excluded = f" AND NOT ({in_list(dialect, 'id', 'excluded')})"
        params["excluded"] = list(excluding)
    sql = (
        f'SELECT id FROM artifact WHERE "key" = :key{excluded}'
        " ORDER BY created DESC, id DESC LIMIT 1"
    )
    names = ("excluded",) if excluding else ()
    found = (await conn.execute(list_statement(sql, dialect, *names), params)).scalar()
    return None if found is None else str(found)


async def apply_repoints(conn: AsyncConnection, repoints: Sequence[Repoint]) -> None:
    """Point each collection at its new artifact, copying its fields; exact counts or raise."""
    if not repoints:
        return
    copies = ", ".join(
        f'"{c}" = (SELECT "{c}" FROM artifact WHERE id = :new)'
        for c in (*COPIED, "created", "updated")
    )
    statement = text(
        f"UPDATE artifact_collection SET latest_id = :new, {copies}"
        " WHERE id = :id AND latest_id = :old"
    )
    for repoint in repoints:
        params = {
            "id": repoint.collection_id,
            "old": repoint.old_latest_id,
            "new": repoint.new_latest_id,
        }
        result = await conn.execute(statement, params)
        if result.rowcount != 1:
            raise ConcurrentChange(
                f"artifact collection {repoint.collection_id} changed while its latest "
                "artifact was being archived",
                hint="run archiver again; the batch is retried automatically",
            )


async def reconcile_keys(
    conn: AsyncConnection, keys: dict[str, str | None]
) -> tuple[int, set[str]]:
    """Point each key's collection at its newest artifact, creating the row if needed.

    ``keys`` maps a key to the id to give a new collection row (an archived
    row's id, so the row comes back under its name), or None for a new id.
    Returns how many collection rows were inserted or changed, and the keys
    that now have a collection (a key with no artifact left has none).
    """
    changed, settled = 0, set()
    for key, wanted_id in sorted(keys.items()):
        newest = await newest_artifact(conn, key, ())
        if newest is None:
            continue
        settled.add(key)
        existing = (
            await conn.execute(
                text('SELECT id, latest_id FROM artifact_collection WHERE "key" = :key'),
                {"key": key},
            )
        ).one_or_none()
        if existing is None:
            await _insert_collection(conn, key, newest, wanted_id or str(uuid.uuid4()))
            changed += 1
        elif str(existing[1]) != newest:
            await apply_repoints(conn, [Repoint(str(existing[0]), str(existing[1]), newest)])
            changed += 1
    return changed, settled


async def _insert_collection(
    conn: AsyncConnection, key: str, artifact_id: str, row_id: str
) -> None:
    columns = ", ".join(f'"{c}"' for c in COPIED)
    new_id = "CAST(:row_id AS uuid)" if conn.dialect.name == "postgresql" else ":row_id"
    await conn.execute(
        text(
            f'INSERT INTO artifact_collection (id, created, updated, "key", latest_id, {columns})'
            f" SELECT {new_id}, created, updated, :key, id, {columns}"
            " FROM artifact WHERE id = :artifact"
        ),
        {"row_id": row_id, "key": key, "artifact": artifact_id},
    )
