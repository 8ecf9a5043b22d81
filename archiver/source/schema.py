"""Reflection of the Prefect schema, and the checks that make it safe to delete from.

Columns are reflected at run time, so a column a newer Prefect adds is archived
too. What is *not* reflected is which tables belong to a run: that is Prefect
knowledge (see shared/prefect-schema.md §4). To stay safe when Prefect adds a
table, :func:`inspect_schema` refuses a database where any foreign key points
at a run table from a table archiver does not know: deleting a flow run would
cascade into rows archiver never read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, inspect, text, types
from sqlalchemy.exc import SAWarning
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.errors import SchemaError
from archiver.models import Column, Kind, TableShape

#: Tables whose rows belong to a run tree, children before parents (delete order).
TREE_TABLES = (
    "task_run_state_cache",
    "log",
    "flow_run_input",
    "task_run_state",
    "flow_run_state",
    "artifact",
    "task_run",
    "flow_run",
)
#: Rows the runs name, copied into each batch but never deleted.
REFERENCE_TABLES = ("flow", "deployment")
#: Tables only sweeps archive (no foreign keys; reflected when present).
SWEEP_TABLES = ("event_resources", "events", "artifact_collection")
#: Every table archiver deletes from, children before parents.
DELETE_ORDER = (*SWEEP_TABLES, *TREE_TABLES)

#: Every enforced foreign key into a run table that archiver accounts for
#: (child table, child column). Anything else referencing these tables is unknown.
KNOWN_RUN_REFERENCES = {
    ("flow_run", "parent_task_run_id"),
    ("flow_run", "state_id"),
    ("flow_run_state", "flow_run_id"),
    ("flow_run_state", "result_artifact_id"),
    ("task_run", "flow_run_id"),
    ("task_run", "state_id"),
    ("task_run_state", "task_run_id"),
    ("task_run_state", "result_artifact_id"),
    ("flow_run_input", "flow_run_id"),
}
RUN_TABLES = set(TREE_TABLES)

#: SQLite declares Prefect's Interval columns as DATETIME (epoch + duration as text),
#: so reflection alone cannot tell them from timestamps.
SQLITE_INTERVAL_COLUMNS = {"total_run_time"}

#: Alembic heads archiver was tested against (dossier §7); others get a warning.
KNOWN_REVISIONS = {
    "postgresql": {
        "3b86c5ea017a", "9e83011d1f2a", "a1b2c3d4e5f6", "09a9e091e578", "7218aad17905",
        "bad1e352c597", "50737cdaee36", "9e9dadc36797", "91e2b8f3d6a4",
    },
    "sqlite": {
        "8bb517bae6f9", "9e83011d1f2a", "a1b2c3d4e5f7", "4dfa692e02a7", "2095de406cbe",
        "79e7a60e43d8", "14806cb26270", "f416ea180ae1", "27d8f4e1a6c9",
    },
}  # fmt: skip


@dataclass(frozen=True)
class IndexSpec:
    """An index that a lookup of a batch needs (trees.py, reader.py): any index led by
    ``column`` will do.

    ``name`` is what Prefect's migrations call it, or, where Prefect covers the
    column with a unique constraint, the name archiver gives a plain replacement.
    """

    table: str
    column: str
    name: str
    descending: bool = False

    def create_sql(self, dialect: str) -> str:
        """CREATE INDEX, CONCURRENTLY on PostgreSQL (which must run outside a transaction)."""
        concurrently = " CONCURRENTLY" if dialect == "postgresql" else ""
        order = " DESC" if self.descending else ""
        return (
            f"CREATE INDEX{concurrently} IF NOT EXISTS {self.name}"
            f" ON {self.table} ({self.column}{order})"
        )

    def __str__(self) -> str:
        return f"{self.table}({self.column})"


#: Every lookup that selecting and gathering a batch makes (trees.py), in the order
#: of a batch. Without these, each batch scans a whole table.
SELECTION_INDEXES = (
    IndexSpec("flow_run", "end_time", "ix_flow_run__end_time_desc", descending=True),
    IndexSpec("flow_run", "parent_task_run_id", "ix_flow_run__parent_task_run_id"),
    IndexSpec("task_run", "flow_run_id", "ix_task_run__flow_run_id"),
    IndexSpec("flow_run_state", "flow_run_id", "ix_flow_run_state__flow_run_id"),
    IndexSpec("task_run_state", "task_run_id", "ix_task_run_state__task_run_id"),
    IndexSpec("flow_run_input", "flow_run_id", "ix_flow_run_input__flow_run_id"),
    IndexSpec("log", "flow_run_id", "ix_log__flow_run_id"),
    IndexSpec("log", "task_run_id", "ix_log__task_run_id"),
    IndexSpec("artifact", "flow_run_id", "ix_artifact__flow_run_id"),
    IndexSpec("artifact", "task_run_id", "ix_artifact__task_run_id"),
)


@dataclass(frozen=True)
class PrefectSchema:
    """What archiver learned about one Prefect database."""

    dialect: str
    revision: str
    tables: dict[str, TableShape]
    warnings: list[str] = field(default_factory=list)
    missing_indexes: tuple[IndexSpec, ...] = ()

    def shape(self, table: str) -> TableShape:
        return self.tables[table]


async def inspect_schema(conn: AsyncConnection) -> PrefectSchema:
    """Reflect the run tables; raise SchemaError if this is not a usable Prefect database."""
    dialect = conn.dialect.name
    revision = await _alembic_revision(conn)
    tables, missing = await conn.run_sync(_reflect)
    warnings = [_missing_index_warning(spec) for spec in missing]
    if not revision_known(dialect, revision):
        warnings.append(
            f"Prefect schema revision {revision} ({dialect}) is newer or older than the ones "
            "archiver was tested with; columns are reflected, so archives stay complete"
        )
    return PrefectSchema(dialect, revision, tables, warnings, tuple(missing))


def revision_known(dialect: str, revision: str) -> bool:
    return revision in KNOWN_REVISIONS.get(dialect, set())


def _missing_index_warning(spec: IndexSpec) -> str:
    if spec.column == "end_time":
        return (
            "flow_run has no index on end_time; selecting expired runs will scan the table "
            "(Prefect's migrations create ix_flow_run__end_time_desc; "
            "`archiver doctor --create-index` builds it)"
        )
    return (
        f"{spec.table} has no index on {spec.column}; every batch will scan the table "
        "(`archiver doctor --create-index` builds it)"
    )


async def _alembic_revision(conn: AsyncConnection) -> str:
    has_table = await conn.run_sync(lambda sync: inspect(sync).has_table("alembic_version"))
    if not has_table:
        raise SchemaError(
            "this database has no alembic_version table, so it is not a Prefect database",
            hint="point database_url at the database your Prefect server uses",
        )
    revision = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    if not revision:
        raise SchemaError(
            "alembic_version is empty: the Prefect schema was never migrated",
            hint="run `prefect server database upgrade` first",
        )
    return str(revision)


def _reflect(sync: Connection) -> tuple[dict[str, TableShape], list[IndexSpec]]:
    inspector = inspect(sync)
    existing = set(inspector.get_table_names())
    missing = sorted(set(TREE_TABLES + REFERENCE_TABLES) - existing)
    if missing:
        raise SchemaError(
            f"not a Prefect 3 database: tables {', '.join(missing)} are missing",
            hint="point database_url at the database your Prefect server uses",
        )
    _refuse_unknown_references(inspector, existing)
    dialect = sync.dialect.name
    tables = {
        name: TableShape(name, tuple(_column(col, dialect) for col in inspector.get_columns(name)))
        for name in TREE_TABLES + REFERENCE_TABLES + SWEEP_TABLES
        if name in existing
    }
    return tables, missing_indexes(inspector)


def _refuse_unknown_references(inspector: Any, tables: set[str]) -> None:
    for table in sorted(tables):
        for fk in inspector.get_foreign_keys(table):
            if fk["referred_table"] not in RUN_TABLES:
                continue
            for column in fk["constrained_columns"]:
                if (table, column) not in KNOWN_RUN_REFERENCES:
                    raise SchemaError(
                        f"{table}.{column} references {fk['referred_table']}, which archiver "
                        "does not know; deleting runs could remove rows it never archived",
                        hint="upgrade archiver to a release that supports this Prefect version",
                    )


def missing_indexes(inspector: Any) -> list[IndexSpec]:
    """The SELECTION_INDEXES no index, unique constraint or primary key leads with."""
    leading: dict[str, set[str]] = {}
    for table in sorted({spec.table for spec in SELECTION_INDEXES}):
        leading[table] = _leading_columns(inspector, table)
    return [spec for spec in SELECTION_INDEXES if spec.column not in leading[spec.table]]


def _leading_columns(inspector: Any, table: str) -> set[str]:
    with warnings.catch_warnings():
        # PostgreSQL expression indexes cannot be reflected; they do not matter here.
        warnings.simplefilter("ignore", SAWarning)
        column_lists = [ix.get("column_names") or [] for ix in inspector.get_indexes(table)]
        column_lists += [uq["column_names"] for uq in inspector.get_unique_constraints(table)]
        column_lists.append(inspector.get_pk_constraint(table).get("constrained_columns") or [])
    return {columns[0] for columns in column_lists if columns and columns[0]}


def _column(col: Any, dialect: str) -> Column:
    sql_type = type(col["type"]).__name__.upper()
    return Column(col["name"], _kind(col["name"], col["type"], dialect), sql_type)


def _kind(name: str, sa_type: types.TypeEngine[Any], dialect: str) -> Kind:
    type_name = type(sa_type).__name__.upper()
    if isinstance(sa_type, types.Uuid) or type_name == "UUID":
        return Kind.UUID
    if isinstance(sa_type, types.Interval) or type_name == "INTERVAL":
        return Kind.INTERVAL
    if isinstance(sa_type, types.DateTime | types.Date):
        is_interval = dialect == "sqlite" and name in SQLITE_INTERVAL_COLUMNS
        return Kind.INTERVAL if is_interval else Kind.TIMESTAMP
    if isinstance(sa_type, types.JSON) or type_name in {"JSON", "JSONB"}:
        return Kind.JSON
    if isinstance(sa_type, types.Boolean):
        return Kind.BOOLEAN
    if isinstance(sa_type, types.SmallInteger):
        return Kind.INT16
    if isinstance(sa_type, types.BigInteger):
        return Kind.INT64
    if isinstance(sa_type, types.Integer):
        return Kind.INT32
    if isinstance(sa_type, types.Float | types.Numeric):
        return Kind.FLOAT
    if isinstance(sa_type, types.CHAR) and sa_type.length == 36:
        return Kind.UUID  # Prefect's UUID type on SQLite
    return Kind.STRING
