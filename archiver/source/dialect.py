"""What differs between Prefect's two databases, written once for every statement.

PostgreSQL (asyncpg) and SQLite (aiosqlite) differ in how a statement binds a
list of ids, how many parameters it may take, how times are stored, how a JSON
tag array is searched and how a column must be read to keep its value exact.
Every module of ``archiver.source`` builds its SQL with these helpers, so each
difference is handled here and nowhere else. Everything is string building,
except :func:`sqlite_driver_execute`, which runs a statement.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import TextClause, bindparam, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.models import Column, Kind
from archiver.policy import TERMINAL_STATES

#: Prefect's terminal state types as a SQL list of literals: ``IN ({TERMINAL_STATES_SQL})``.
TERMINAL_STATES_SQL = ", ".join(f"'{state}'" for state in TERMINAL_STATES)
#: How Prefect stores a timestamp on SQLite: naive UTC text.
SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
#: Before any run: the lower bound of a walk, and the cutoff under which nothing expires.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Ids bound per statement. SQLite allows 999 bound parameters by default;
#: PostgreSQL gets one array parameter.
CHUNK = {"sqlite": 900, "postgresql": 20_000}

_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_CANONICAL_UUIDS = re.compile(f"(?:{_UUID},)*{_UUID}")


def to_db_time(dialect: str, value: datetime) -> Any:
    """Bind a UTC datetime the way Prefect stores it (naive text on SQLite)."""
    value = value.astimezone(UTC)
    return value.replace(tzinfo=None).strftime(SQLITE_TIME_FORMAT) if dialect == "sqlite" else value


def from_db_time(value: Any) -> datetime:
    """A timestamp as either driver returns it (aware, naive UTC, or SQLite text), aware UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)


def month_start(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month(value: datetime) -> datetime:
    start = month_start(value)
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )


def has_tag_sql(dialect: str, alias: str, tag: str) -> str:
    """SQL: the JSON array ``<alias>.tags`` contains the string bound as ``tag`` (":name")."""
    if dialect == "postgresql":
        return f"({alias}.tags ? {tag})"
    return f"EXISTS (SELECT 1 FROM json_each({alias}.tags) WHERE json_each.value = {tag})"


def in_list(dialect: str, column: str, name: str = "ids") -> str:
    """``column`` is one of the list bound as ``name`` (an array on PostgreSQL)."""
    return f"{column} = ANY(:{name})" if dialect == "postgresql" else f"{column} IN :{name}"


def list_statement(sql: str, dialect: str, *names: str) -> TextClause:
    """``sql`` with the lists bound as ``names`` expanding on SQLite.

    Names the statement does not use are left out, so a caller may pass every
    list it bound.
    """
    statement = text(sql)
    if dialect == "sqlite":
        used = [name for name in names if re.search(rf":{name}\b", sql)]
        statement = statement.bindparams(*(bindparam(name, expanding=True) for name in used))
    return statement


def row_lock(dialect: str, clause: str = "FOR UPDATE") -> str:
    """`` FOR UPDATE`` (or another locking ``clause``) to end a SELECT with, on PostgreSQL.

    Nothing on SQLite, which has no row locks: a batch holds its write lock.
    """
    return f" {clause}" if dialect == "postgresql" else ""


def chunks(dialect: str, ids: Sequence[str]) -> Iterator[list[str]]:
    """``ids`` in lists of at most ``CHUNK[dialect]``, in order: one statement each."""
    size = CHUNK[dialect]
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def select_column(dialect: str, column: Column) -> str:
    """A column as archiver reads it: JSON and UUIDs as text on PostgreSQL.

    asyncpg via SQLAlchemy decodes json, which would turn JSON null into SQL NULL;
    text keeps the document exactly. UUIDs as text skip a per-value conversion.
    """
    quoted = f'"{column.name}"'
    if dialect == "postgresql" and column.kind in (Kind.JSON, Kind.UUID):
        return f"CAST({quoted} AS text) AS {quoted}"
    return quoted


def uuid_array_literal(ids: Sequence[str]) -> str:
    """A PostgreSQL ``uuid[]`` literal, for statements that take no parameters (COPY).

    Raises ValueError unless every id is a UUID, so nothing else is ever inlined.
    """
    joined = ",".join(ids)
    if not _CANONICAL_UUIDS.fullmatch(joined):  # one regex pass; ids from PostgreSQL match
        joined = ",".join(str(UUID(str(value))) for value in ids)
    return "'{" + joined + "}'::uuid[]"


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
