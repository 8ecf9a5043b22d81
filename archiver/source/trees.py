"""Selecting expired top-level runs and gathering everything that belongs to them.

One batch works inside one transaction on one connection:

1. :func:`lock_roots` takes the oldest expired top-level runs of one calendar
   month (so a batch fills exactly one Hive partition), by keyset on
   ``(end_time, id)`` through ``ix_flow_run__end_time_desc``. On PostgreSQL the
   rows are locked ``FOR NO KEY UPDATE SKIP LOCKED``, so concurrent archivers take
   disjoint runs; on SQLite the batch holds the write lock (``BEGIN IMMEDIATE``).
2. :func:`gather` walks subflows at any depth, locks every flow run and task run
   of the trees ``FOR UPDATE`` (PostgreSQL), which stops Prefect from adding
   states, task runs or inputs under them until we commit (their foreign-key
   checks need a KEY SHARE lock), then reads every row that belongs to them.
   A root whose tree holds a non-terminal run is skipped whole, and so is one
   whose tree holds a flow run with the legal-hold tag (checked before the lock,
   and again on the locked rows, so a tag added meanwhile still protects it).

Retention policies (``archiver.source.retention``) reach :func:`lock_roots` and
:func:`count_expired` as a :class:`~archiver.source.retention.Selection`: extra
SQL conditions on the same keyset walk, which also name each root's rule.

:func:`count_trees` is the same walk and lookups, reading only ids and counting,
without locks: what ``archiver plan`` reports.

Logs and artifacts have no foreign keys and can still arrive; they are deleted
by the ids read here, so a late row stays in the database for a later sweep.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import TextClause, bindparam, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.archive import codec
from archiver.errors import ConcurrentChange
from archiver.models import Column, Kind, Root, TableRows, TableShape
from archiver.source.schema import REFERENCE_TABLES, TREE_TABLES, PrefectSchema

if TYPE_CHECKING:
    from archiver.source.retention import Selection

TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
#: SQLite allows 999 bound parameters by default; PostgreSQL gets one array parameter.
CHUNK = {"sqlite": 900, "postgresql": 20_000}

_EXPIRED = (
    "parent_task_run_id IS NULL AND end_time IS NOT NULL AND end_time < :cutoff"
    " AND state_type IN ('COMPLETED', 'FAILED', 'CANCELLED', 'CRASHED')"
)
#: SQLite's planner (with or without ANALYZE) took ix_flow_run__parent_task_run_id for
#: ``parent_task_run_id IS NULL`` (or the state_type index) and sorted every top-level
#: run per batch; a unary + keeps those terms off indexes, so the walk uses the end_time
#: index (measured 52 ms -> 1 ms per batch at 10k runs) and still runs without it.
_EXPIRED_BY_DIALECT = {
    "postgresql": _EXPIRED,
    "sqlite": _EXPIRED.replace("parent_task_run_id IS", "+parent_task_run_id IS").replace(
        "AND state_type IN", "AND +state_type IN"
    ),
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_FLOW_RUN = " AND flow_run_id IS NULL"
#: The first term only bounds the index range (the OR alone is no index condition, so
#: each batch re-read every run before the keyset position that is still present).
_AFTER = (
    " AND end_time >= :after_time"
    " AND (end_time > :after_time OR (end_time = :after_time AND id > :after_id))"
)
_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_CANONICAL_UUIDS = re.compile(f"(?:{_UUID},)*{_UUID}")
#: COPY output larger than this is parsed in a thread (Arrow releases the GIL), so the
#: event loop keeps serving the other batch's connection meanwhile.
_PARSE_IN_THREAD = 1 << 20


@dataclass
class Gathered:
    """Everything one batch read: rows to archive and delete, and reference snapshots."""

    roots: list[Root]
    skipped_roots: list[str]
    tables: dict[str, TableRows]
    references: dict[str, TableRows] = field(default_factory=dict)
    #: roots whose tree carries the legal-hold tag: left alone
    held_roots: list[str] = field(default_factory=list)

    @property
    def row_count(self) -> int:
        return sum(len(rows) for rows in self.tables.values())


def to_db_time(dialect: str, value: datetime) -> Any:
    """Bind a UTC datetime the way Prefect stores it (naive text on SQLite)."""
    value = value.astimezone(UTC)
    return value.replace(tzinfo=None).strftime(SQLITE_TIME_FORMAT) if dialect == "sqlite" else value


def from_db_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)


def has_tag_sql(dialect: str, alias: str, tag: str) -> str:
    """SQL: the JSON array ``<alias>.tags`` contains the string bound as ``tag`` (":name")."""
    if dialect == "postgresql":
        return f"({alias}.tags ? {tag})"
    return f"EXISTS (SELECT 1 FROM json_each({alias}.tags) WHERE json_each.value = {tag})"


def in_list(dialect: str, column: str, name: str = "ids") -> str:
    """``column`` is one of the list bound as ``name`` (an array on PostgreSQL)."""
    return f"{column} = ANY(:{name})" if dialect == "postgresql" else f"{column} IN :{name}"


def list_statement(sql: str, dialect: str, *names: str) -> TextClause:
    """``sql`` with the lists bound as ``names`` expanding on SQLite."""
    statement = text(sql)
    if dialect == "sqlite":
        statement = statement.bindparams(*(bindparam(name, expanding=True) for name in names))
    return statement


def month_start(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month(value: datetime) -> datetime:
    start = month_start(value)
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )


async def count_expired(
    conn: AsyncConnection, cutoff: datetime, selection: Selection | None = None
) -> tuple[int, datetime | None, datetime | None]:
    """How many top-level runs are expired, with the oldest and newest end_time.

    ``cutoff``: no run that ended at or after it counts; ``selection``: retention
    rules and legal hold that narrow the runs before it further.
    """
    where, params, statement = _narrowed(conn, selection)
    sql = (
        f"SELECT count(*), min(end_time), max(end_time)"
        f" FROM flow_run WHERE {_EXPIRED_BY_DIALECT[conn.dialect.name]}{where}"
    )
    params["cutoff"] = to_db_time(conn.dialect.name, cutoff)
    count, oldest, newest = (await conn.execute(statement(sql), params)).one()
    return (
        int(count),
        from_db_time(oldest) if oldest else None,
        from_db_time(newest) if newest else None,
    )


def _narrowed(
    conn: AsyncConnection, selection: Selection | None
) -> tuple[str, dict[str, Any], Any]:
    """The extra WHERE, its parameters, and how to build the statement."""
    if selection is None:
        return "", {}, text
    assert selection.dialect == conn.dialect.name, "a selection compiled for another dialect"
    where = f" AND {selection.where}" if selection.where else ""
    return where, dict(selection.params), selection.statement


async def lock_roots(
    conn: AsyncConnection,
    cutoff: datetime,
    limit: int,
    after: Root | None = None,
    selection: Selection | None = None,
    *,
    lock: bool = True,
) -> list[Root]:
    """Lock up to ``limit`` expired top-level runs after ``after``, oldest first, in one month.

    ``selection`` narrows them by retention rules and legal hold, and names each
    root's rule. A month whose remaining runs are all locked by other archivers is
    passed over. ``lock=False`` reads the same runs without locking them (for
    ``archiver plan``).
    """
    dialect = conn.dialect.name
    narrowed, params, statement = _narrowed(conn, selection)
    params |= {"limit": limit, "lower": to_db_time(dialect, _EPOCH)}
    keyset = " AND end_time >= :lower"
    if after is not None:
        keyset += _AFTER
        params |= {"after_time": to_db_time(dialect, after.end_time), "after_id": after.id}
    # NO KEY UPDATE: enough to keep other archivers (and Prefect's UPDATEs) off these
    # runs, while Prefect may still add rows under a root that turns out to be live.
    # gather() upgrades the roots it keeps to FOR UPDATE.
    suffix = " FOR NO KEY UPDATE SKIP LOCKED" if lock and dialect == "postgresql" else ""
    rule = selection.rule_index if selection else "NULL"
    where = f"{_EXPIRED_BY_DIALECT[dialect]}{keyset}{narrowed}"
    first_sql = f"SELECT end_time FROM flow_run WHERE {where} ORDER BY end_time LIMIT 1"
    sql = (
        f"SELECT id, end_time, {rule} FROM flow_run WHERE {where}"
        f" ORDER BY end_time, id LIMIT :limit{suffix}"
    )
    while True:
        params["cutoff"] = to_db_time(dialect, cutoff)
        first = (await conn.execute(statement(first_sql), params)).scalar()
        if first is None:
            return []
        upper = min(cutoff, next_month(from_db_time(first)))
        params["cutoff"] = to_db_time(dialect, upper)
        rows = (await conn.execute(statement(sql), params)).all()
        if rows:
            return [
                Root(
                    str(row[0]),
                    from_db_time(row[1]),
                    selection.rule_name(int(row[2])) if selection else None,
                )
                for row in rows
            ]
        params["lower"] = params["cutoff"]


async def gather(
    conn: AsyncConnection,
    schema: PrefectSchema,
    roots: Sequence[Root],
    *,
    legal_hold_tag: str | None = None,
    lock: bool = True,
) -> Gathered:
    """Read the whole tree of every root; skip roots whose tree is not all terminal,
    and leave alone those whose tree has a flow run tagged ``legal_hold_tag``.

    ``lock=False`` reads without row locks (a read-only sample for ``archiver plan``).
    """
    reader = _Reader(conn, schema)
    tree, skipped, held, kept = await _walk(reader, roots, legal_hold_tag)
    flow_runs = await reader.rows("flow_run", "id", kept, lock=lock)
    held |= _roots_on_hold(flow_runs, tree, legal_hold_tag)
    changed = _roots_with_live_runs(flow_runs, tree) - held
    if changed or held:
        skipped |= changed
        flow_runs = flow_runs.take(
            [i for i, run_id in enumerate(flow_runs.ids) if tree[run_id] not in skipped | held]
        )
    run_ids = flow_runs.ids
    task_runs = await reader.rows("task_run", "flow_run_id", run_ids, lock=lock)
    task_ids = task_runs.ids
    await reader.refuse_new_subflows(task_ids, set(tree))
    flow_states = await reader.rows("flow_run_state", "flow_run_id", run_ids)
    task_states = await reader.rows("task_run_state", "task_run_id", task_ids)
    result_artifacts = _column_values(flow_states, "result_artifact_id") | _column_values(
        task_states, "result_artifact_id"
    )
    tables = {
        "flow_run": flow_runs,
        "task_run": task_runs,
        "flow_run_state": flow_states,
        "task_run_state": task_states,
        "flow_run_input": await reader.rows("flow_run_input", "flow_run_id", run_ids),
        # A task run's logs and artifacts normally carry its flow run id too, so the
        # task-run lookup only takes those without one (it would read most logs twice).
        # One that names a flow run outside the tree is left in the database, not lost.
        "log": await reader.rows_by_any(
            "log", [("flow_run_id", run_ids, ""), ("task_run_id", task_ids, _NO_FLOW_RUN)]
        ),
        "artifact": await reader.rows_by_any(  # locked: users may edit artifacts
            "artifact",
            [
                ("flow_run_id", run_ids, ""),
                ("task_run_id", task_ids, _NO_FLOW_RUN),
                ("id", sorted(result_artifacts), ""),
            ],
            lock=lock,
        ),
        "task_run_state_cache": await reader.rows(
            "task_run_state_cache", "task_run_state_id", task_states.ids
        ),
    }
    references = {
        "flow": await reader.rows("flow", "id", sorted(_column_values(flow_runs, "flow_id"))),
        "deployment": await reader.rows(
            "deployment", "id", sorted(_column_values(flow_runs, "deployment_id"))
        ),
    }
    assert set(tables) == set(TREE_TABLES) and set(references) == set(REFERENCE_TABLES)
    kept_roots = [root for root in roots if root.id not in skipped | held]
    return Gathered(kept_roots, sorted(skipped), tables, references, sorted(held))


async def _walk(
    reader: _Reader, roots: Sequence[Root], legal_hold_tag: str | None
) -> tuple[dict[str, str], set[str], set[str], list[str]]:
    """Walk the trees: (run id -> root id, roots with a live run, roots on legal hold,
    the runs of the other trees).

    Which trees are live or held is decided without locks, so that Prefect can go
    on working on their runs; gather() locks only the trees it keeps, then checks
    them again.
    """
    tree = await reader.tree_of([root.id for root in roots])
    statuses = await reader.statuses(list(tree), legal_hold_tag)
    held = {tree[run] for run, (_, on_hold) in statuses.items() if on_hold}
    skipped = {tree[run] for run, (state, _) in statuses.items() if state not in TERMINAL_STATES}
    skipped -= held
    kept = [run for run, root in tree.items() if root not in skipped | held]
    return tree, skipped, held, kept


async def count_trees(
    conn: AsyncConnection,
    schema: PrefectSchema,
    roots: Sequence[Root],
    *,
    legal_hold_tag: str | None = None,
) -> tuple[int, dict[str, int]]:
    """What gather() would take for these roots, as (roots kept, rows per tree table).

    The same walk and the same lookups as gather(), through the same indexes, but
    reading only ids and link columns (and counting logs, the largest table, in
    SQL), and locking nothing.
    """
    reader = _Reader(conn, schema)
    _, skipped, held, run_ids = await _walk(reader, roots, legal_hold_tag)
    task_ids = await reader.ids("task_run", "flow_run_id", run_ids)
    flow_states = await reader.pairs("flow_run_state", "result_artifact_id", "flow_run_id", run_ids)
    task_states = await reader.pairs(
        "task_run_state", "result_artifact_id", "task_run_id", task_ids
    )
    results = sorted({value for _, value in flow_states + task_states if value is not None})
    artifacts = {
        *await reader.ids("artifact", "flow_run_id", run_ids),
        *await reader.ids("artifact", "task_run_id", task_ids, _NO_FLOW_RUN),
        *await reader.ids("artifact", "id", results),
    }
    state_ids = [state_id for state_id, _ in task_states]
    counts = {
        "flow_run": len(run_ids),
        "task_run": len(task_ids),
        "flow_run_state": len(flow_states),
        "task_run_state": len(task_states),
        "flow_run_input": await reader.count("flow_run_input", "flow_run_id", run_ids),
        "log": await reader.count("log", "flow_run_id", run_ids)
        + await reader.count("log", "task_run_id", task_ids, _NO_FLOW_RUN),
        "artifact": len(artifacts),
        "task_run_state_cache": await reader.count(
            "task_run_state_cache", "task_run_state_id", state_ids
        ),
    }
    assert set(counts) == set(TREE_TABLES)
    return len({root.id for root in roots} - skipped - held), counts


def _roots_with_live_runs(flow_runs: TableRows, tree: dict[str, str]) -> set[str]:
    states = flow_runs.column("state_type")
    return {
        tree[run_id]
        for run_id, state in zip(flow_runs.ids, states, strict=True)
        if state not in TERMINAL_STATES
    }


def _roots_on_hold(flow_runs: TableRows, tree: dict[str, str], tag: str | None) -> set[str]:
    if not tag:
        return set()
    tags = flow_runs.column("tags")  # rows or column-wise (COPY): JSON text or decoded
    return {
        tree[run_id]
        for run_id, value in zip(flow_runs.ids, tags, strict=True)
        if tag in _tags(value)
    }


def _tags(value: Any) -> list[Any]:
    tags = json.loads(value) if isinstance(value, str | bytes) else value
    return tags if isinstance(tags, list) else []


def _column_values(rows: TableRows, column: str) -> set[str]:
    return {str(value) for value in rows.column(column) if value is not None}


async def sqlite_driver_execute(
    conn: AsyncConnection, sql: str, ids: list[str], *, fetch: bool
) -> Any:
    """Run ``sql`` with ``:ids`` as ``(?, ?, ...)`` on the aiosqlite connection itself.

    Inside the batch's transaction (the same sqlite3 connection), without
    SQLAlchemy compiling an expanding parameter per statement, which cost about
    as much as SQLite's own work. Returns the rows (``fetch``) or the rowcount;
    sqlite3 errors come out wrapped as SQLAlchemy's, like every other statement.
    """
    statement = sql.replace(":ids", "(" + ",".join("?" * len(ids)) + ")")
    driver: Any = (await conn.get_raw_connection()).driver_connection
    try:
        async with driver.execute(statement, ids) as cursor:
            return list(await cursor.fetchall()) if fetch else cursor.rowcount
    except sqlite3.Error as exc:
        raise DBAPIError(statement[:200], None, exc) from exc


def _uuid_array(ids: Sequence[str]) -> str:
    """A ``uuid[]`` literal; raises ValueError unless every id is a UUID (nothing else inlined)."""
    joined = ",".join(ids)
    if not _CANONICAL_UUIDS.fullmatch(joined):  # one regex pass; ids from PostgreSQL match
        joined = ",".join(str(UUID(str(value))) for value in ids)
    return "'{" + joined + "}'::uuid[]"


def _as_rows(part: TableRows) -> list[tuple[Any, ...]]:
    if part.table is None:
        return part.rows
    columns = [part.table.column(i).to_pylist() for i in range(part.table.num_columns)]
    return list(zip(*columns, strict=True))


class _Reader:
    """Runs the set-based reads of one batch, chunking id lists for the dialect."""

    def __init__(self, conn: AsyncConnection, schema: PrefectSchema) -> None:
        self.conn = conn
        self.schema = schema
        self.dialect = conn.dialect.name
        self.quote = conn.dialect.identifier_preparer.quote
        self.column_wise = True
        self._asyncpg: Any = None

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

    def _chunks(self, ids: Sequence[str]) -> Iterable[list[str]]:
        size = CHUNK[self.dialect]
        for start in range(0, len(ids), size):
            yield list(ids[start : start + size])

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
        for chunk in self._chunks(root_ids):
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
        for chunk in self._chunks(run_ids):
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
        for chunk in self._chunks(task_ids):
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
        shape = self.schema.shape(table)
        if self.dialect == "postgresql" and self.column_wise:
            try:
                return await self._copy_rows(shape, column, ids, lock=lock, extra=extra)
            except pa.ArrowInvalid:
                self.column_wise = False  # a value COPY's text cannot carry: read rows
        found = TableRows(shape)
        suffix = " FOR UPDATE" if lock and self.dialect == "postgresql" else ""
        where = f"{self._in(column)}{extra}"
        sql = f"SELECT {self._columns(shape)} FROM {table} WHERE {where}{suffix}"
        for chunk in self._chunks(ids):
            found.rows.extend(await self._fetch(sql, chunk))
        return found

    async def pairs(
        self, table: str, value: str, column: str, ids: Sequence[str], extra: str = ""
    ) -> list[tuple[str, str | None]]:
        """(id, ``value``) of the rows whose ``column`` is in ``ids``."""
        sql = f"SELECT id, {self.quote(value)} FROM {table} WHERE {self._in(column)}{extra}"
        found: list[tuple[str, str | None]] = []
        for chunk in self._chunks(ids):
            result = await self.conn.execute(self._statement(sql), {"ids": chunk})
            found.extend((str(row[0]), None if row[1] is None else str(row[1])) for row in result)
        return found

    async def ids(self, table: str, column: str, ids: Sequence[str], extra: str = "") -> list[str]:
        """The ids of the rows whose ``column`` is in ``ids``."""
        return [found for found, _ in await self.pairs(table, "id", column, ids, extra)]

    async def count(self, table: str, column: str, ids: Sequence[str], extra: str = "") -> int:
        sql = f"SELECT count(*) FROM {table} WHERE {self._in(column)}{extra}"
        total = 0
        for chunk in self._chunks(ids):
            total += int(
                (await self.conn.execute(self._statement(sql), {"ids": chunk})).scalar_one()
            )
        return total

    async def _copy_rows(
        self, shape: TableShape, column: str, ids: Sequence[str], *, lock: bool, extra: str
    ) -> TableRows:
        """PostgreSQL: ``COPY (SELECT ...) TO STDOUT`` as CSV, parsed column-wise into Arrow.

        The same connection and transaction as every other statement of the batch,
        so the rows are read under the batch's locks. COPY takes no parameters; the
        ids are inlined as one uuid[] literal after being checked to be UUIDs.
        """
        driver = await self._driver()
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(data)

        suffix = " FOR UPDATE" if lock else ""
        select = ", ".join(self._copy_column(c) for c in shape.columns)
        for chunk in self._chunks(ids):
            where = f"{self.quote(column)} = ANY({_uuid_array(chunk)}){extra}"
            sql = f"SELECT {select} FROM {shape.name} WHERE {where}{suffix}"
            try:
                await driver.copy_from_query(sql, output=sink, format="csv", force_quote=True)
            except Exception as exc:  # asyncpg's own errors: wrap them as SQLAlchemy would
                raise DBAPIError(f"COPY ({sql[:200]}...)", None, exc) from exc
        data = b"".join(chunks)
        if len(data) > _PARSE_IN_THREAD:
            return TableRows(shape, table=await asyncio.to_thread(codec.from_csv, data, shape))
        return TableRows(shape, table=codec.from_csv(data, shape))

    async def _driver(self) -> Any:
        """The asyncpg connection under the SQLAlchemy one, with ISO UTC text output."""
        if self._asyncpg is None:
            raw = await self.conn.get_raw_connection()
            self._asyncpg = raw.driver_connection
            # Only until the batch's transaction ends; binary reads are unaffected.
            await self.conn.execute(text("SET LOCAL TimeZone = 'UTC'"))
            await self.conn.execute(text("SET LOCAL DateStyle = 'ISO'"))
        return self._asyncpg

    def _copy_column(self, column: Column) -> str:
        name = self.quote(column.name)
        if column.kind is Kind.INTERVAL:
            return f"(extract(epoch FROM {name}) * 1000000)::int8 AS {name}"
        return name

    async def rows_by_any(
        self, table: str, lookups: list[tuple[str, Sequence[str], str]], *, lock: bool = False
    ) -> TableRows:
        """Rows matching any of several indexed lookups, each row once (no OR scans)."""
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

    def _columns(self, shape: TableShape) -> str:
        return ", ".join(self._column(column) for column in shape.columns)

    def _column(self, column: Column) -> str:
        name = self.quote(column.name)
        # asyncpg via SQLAlchemy decodes json, which would turn JSON null into SQL NULL;
        # text keeps the document exactly. UUIDs as text skip a per-value conversion.
        if self.dialect == "postgresql" and column.kind in (Kind.JSON, Kind.UUID):
            return f"CAST({name} AS text) AS {name}"
        return name
