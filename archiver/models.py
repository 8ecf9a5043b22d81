"""Plain data shared by the adapters: column kinds, rows read from a table, run roots."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    """What a column holds, independent of how a database dialect stores it."""

    UUID = "uuid"
    TIMESTAMP = "timestamp"
    INTERVAL = "interval"
    JSON = "json"
    BOOLEAN = "boolean"
    INT16 = "int16"
    INT32 = "int32"
    INT64 = "int64"
    FLOAT = "float"
    STRING = "string"


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    sql_type: str = ""  # the reflected type's name, e.g. JSONB, for writing back


@dataclass(frozen=True)
class TableShape:
    """A reflected table: its name and columns in database order."""

    name: str
    columns: tuple[Column, ...]

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def id_index(self) -> int:
        return self.column_names.index("id")


@dataclass
class TableRows:
    """Rows of one table as the driver returned them (values not yet normalised:
    SQLite hands back text for timestamps and intervals, PostgreSQL Python objects).
    """

    shape: TableShape
    rows: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        index = self.shape.id_index
        return [str(row[index]) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class Root:
    """A top-level flow run chosen for archiving."""

    id: str
    end_time: datetime
    #: the retention rule that selected it (None when selected without a policy)
    rule: str | None = None
