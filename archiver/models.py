"""Plain data shared by the adapters: column kinds, rows read from a table, run roots."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

#: What a batch archives: expired run trees, or the rows of one sweep.
BatchKind = Literal["runs", "orphans", "standalone_tasks", "collections", "events"]
#: What a file's rows are to the database: ``archived`` rows were deleted from it;
#: ``reference`` rows are snapshots (flow, deployment) written beside them and kept.
Role = Literal["archived", "reference"]


@dataclass(frozen=True)
class Backoff:
    """How long to wait before each retry of an operation that failed for a transient reason.

    ``first`` seconds before the second try, doubling with every try, never longer
    than ``longest``. :data:`NO_BACKOFF` retries at once (for tests that inject
    failures: they have nothing to wait for).
    """

    first: float
    longest: float


NO_BACKOFF = Backoff(0.0, 0.0)


@dataclass(frozen=True)
class RetryPolicy:
    """How often an operation that failed for a transient reason is tried, and the waits."""

    attempts: int
    backoff: Backoff

    def at_once(self) -> RetryPolicy:
        """The same number of attempts, without waiting between them."""
        return replace(self, backoff=NO_BACKOFF)


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
    """Rows of one table, held one of two ways.

    ``rows``: tuples as the driver returned them (values not yet normalised: SQLite
    hands back text for timestamps and intervals). ``table``: a pyarrow Table
    already in the archive's types, for sources read column-wise (PostgreSQL COPY);
    then ``rows`` stays empty.
    """

    shape: TableShape
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    table: Any = None  # pyarrow.Table | None (models stays free of pyarrow)

    @property
    def ids(self) -> list[str]:
        return [str(value) for value in self.column("id")]

    def column(self, name: str) -> list[Any]:
        """One column's values as Python objects."""
        if self.table is not None:
            values: list[Any] = self.table.column(name).to_pylist()
            return values
        index = self.shape.column_names.index(name)
        return [row[index] for row in self.rows]

    def take(self, indices: list[int]) -> TableRows:
        """The rows at ``indices``, in that order."""
        if self.table is not None:
            if not indices:  # pyarrow types an empty index list as null, which take() refuses
                return TableRows(self.shape, table=self.table.slice(0, 0))
            return TableRows(self.shape, table=self.table.take(indices))
        return TableRows(self.shape, [self.rows[i] for i in indices])

    def keep_only_ids(self) -> None:
        """Let go of every column but ``id`` (once encoded, only the keys are needed)."""
        if self.table is not None:
            self.table = self.table.select(["id"])

    def __len__(self) -> int:
        return int(self.table.num_rows) if self.table is not None else len(self.rows)


@dataclass(frozen=True)
class Root:
    """A top-level flow run chosen for archiving."""

    id: str
    end_time: datetime
    #: the retention rule that selected it (None when selected without a policy)
    rule: str | None = None


@dataclass(frozen=True)
class Repoint:
    """An ``artifact_collection`` row to point at another artifact of its key.

    Applied after the batch's DELETEs, in the same transaction; ``old_latest_id``
    must still be the row's ``latest_id`` or the batch rolls back.
    """

    collection_id: str
    old_latest_id: str
    new_latest_id: str


@dataclass
class BatchContent:
    """Everything one batch archives, whatever selected it (run trees or a sweep).

    ``tables`` are written, verified and then deleted; ``references`` are
    snapshots written beside them and never deleted. All rows fall in one
    ``partition`` (``month=YYYY-MM``), and ``time_range`` is the span of the
    time column that selected them (runs: ``end_time``).
    """

    kind: BatchKind
    partition: str
    time_range: tuple[datetime, datetime]
    tables: dict[str, TableRows]
    references: dict[str, TableRows] = field(default_factory=dict)
    roots: list[Root] = field(default_factory=list)
    skipped_roots: list[str] = field(default_factory=list)
    repoints: list[Repoint] = field(default_factory=list)

    @property
    def row_count(self) -> int:
        return sum(len(rows) for rows in self.tables.values())
