"""Every row of some tables, read into dicts to compare before and after.

:func:`snapshot` is the one way a test reads tables whole: ``table -> id -> column -> value``.
By default values are as the sync driver returns them (JSON as its text, never parsed), so
comparing two snapshots of one database catches any change, even to a JSON document's text.
With ``normalise=True`` they are made comparable across dialects.
:func:`snapshot_ids` is the cheap form when only which rows exist matters, and
:func:`snapshot_diff` says what changed between two snapshots.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tests.factory.database import TestDatabase
from tests.factory.schema import INTERVAL_COLUMNS, RUN_TABLES
from tests.factory.values import normalize

#: id -> column -> value
Rows = dict[str, dict[str, Any]]
#: table -> id -> column -> value
Snapshot = dict[str, Rows]

_PG_KINDS = {
    "uuid": "uuid",
    "timestamptz": "timestamp",
    "timestamp": "timestamp",
    "interval": "interval",
    "json": "json",
    "jsonb": "json",
    "bool": "bool",
    "int2": "int",
    "int4": "int",
    "int8": "int",
    "float4": "float",
    "float8": "float",
    "numeric": "float",
}


def column_kinds(db: TestDatabase, table: str) -> dict[str, str]:
    """Column -> kind (uuid, timestamp, interval, json, bool, int, float, str), in order."""
    if db.dialect == "postgresql":
        rows = db.rows(
            "SELECT column_name, udt_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = :t ORDER BY ordinal_position",
            {"t": table},
        )
        return {row["column_name"]: _PG_KINDS.get(row["udt_name"], "str") for row in rows}
    kinds: dict[str, str] = {}
    for row in db.rows(f"PRAGMA table_info({table})"):
        declared = str(row["type"]).upper()
        name = row["name"]
        if declared.startswith("CHAR(36)"):
            kinds[name] = "uuid"
        elif declared.startswith("DATETIME"):
            kinds[name] = "interval" if name in INTERVAL_COLUMNS else "timestamp"
        elif declared.startswith("JSON"):
            kinds[name] = "json"
        elif declared.startswith("BOOLEAN"):
            kinds[name] = "bool"
        elif declared in ("INTEGER", "SMALLINT", "BIGINT"):
            kinds[name] = "int"
        elif declared in ("FLOAT", "REAL"):
            kinds[name] = "float"
        else:
            kinds[name] = "str"
    return kinds


def db_rows(db: TestDatabase, table: str) -> Rows:
    """Every row of ``table`` as the sync driver returns it, by id; JSON always as its text."""
    if db.dialect == "postgresql":
        columns = db.rows(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = :t AND table_schema = 'public'",
            {"t": table},
        )
        select = ", ".join(
            f'"{c["column_name"]}"::text AS "{c["column_name"]}"'
            if c["data_type"] in ("json", "jsonb")
            else f'"{c["column_name"]}"'
            for c in columns
        )
    else:
        select = "*"
    return {str(row["id"]): row for row in db.rows(f"SELECT {select} FROM {table}")}


def snapshot(
    db: TestDatabase, tables: Iterable[str] = RUN_TABLES, *, normalise: bool = False
) -> Snapshot:
    """Every row of ``tables``: table -> id -> column -> value.

    Values are as :func:`db_rows` reads them. With ``normalise``: ids lowercase ``str``;
    timestamps aware UTC ``datetime``; intervals ``timedelta``; JSON as
    :func:`~tests.factory.values.canonical_json` text (JSON ``null`` is ``"null"``, SQL NULL
    is ``None``); booleans ``bool``; equal on both dialects for the same logical data.
    """
    result: Snapshot = {}
    for table in tables:
        rows = db_rows(db, table)
        if normalise:
            kinds = column_kinds(db, table)
            rows = {
                row_id.lower(): {column: normalize(kinds[column], row[column]) for column in kinds}
                for row_id, row in rows.items()
            }
        result[table] = rows
    return result


def snapshot_ids(db: TestDatabase, tables: Iterable[str] = RUN_TABLES) -> dict[str, set[str]]:
    """The ids in each of ``tables`` (lowercase): which rows exist, without reading them."""
    return {table: db.ids(table) for table in tables}


@dataclass
class TableDiff:
    """The ids of one table that :func:`snapshot_diff` found added, removed or changed."""

    added: set[str]
    removed: set[str]
    changed: set[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def snapshot_diff(before: Snapshot, after: Snapshot) -> dict[str, TableDiff]:
    """Per table: ids added, removed, and changed in any column (tables with no change left out)."""
    diffs: dict[str, TableDiff] = {}
    for table in sorted(set(before) | set(after)):
        old, new = before.get(table, {}), after.get(table, {})
        diff = TableDiff(
            added=set(new) - set(old),
            removed=set(old) - set(new),
            changed={key for key in set(old) & set(new) if old[key] != new[key]},
        )
        if diff:
            diffs[table] = diff
    return diffs
