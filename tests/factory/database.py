"""The test side of one Prefect database: sync engines, URLs, and the :class:`TestDatabase` handle.

On PostgreSQL the test-side engine loads ``uuid``, ``json`` and ``jsonb`` columns as text (see
:func:`postgres_engine`), so :meth:`TestDatabase.rows` returns the same Python types for ids and
JSON on both dialects (SQLite may still return an ``int``/``float`` for a JSON document that is
a bare number).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from tests.factory.values import Params, adapt, adapt_params

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
PG_ADMIN_DSN = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"


def sqlite_engine(path: Path | str) -> Engine:
    """A sync engine on a SQLite file, with the pragmas a tool next to Prefect must set."""
    engine = sa.create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA synchronous=NORMAL")  # as Prefect; WAL keeps it durable
            cursor.execute("PRAGMA foreign_keys")
            if cursor.fetchone()[0] != 1:
                raise RuntimeError("PRAGMA foreign_keys=ON did not take effect")
        finally:
            cursor.close()

    return engine


def postgres_engine(database: str) -> Engine:
    """A sync psycopg engine; uuid/json/jsonb load as text, sessions run in UTC."""
    from psycopg.types.string import TextLoader

    engine = sa.create_engine(
        postgres_url(database, driver="psycopg"),
        connect_args={"options": "-c TimeZone=UTC"},
    )

    @event.listens_for(engine, "connect")
    def _loaders(dbapi_connection: Any, _record: Any) -> None:
        for type_name in ("uuid", "json", "jsonb"):
            dbapi_connection.adapters.register_loader(type_name, TextLoader)

    return engine


def postgres_url(database: str, driver: str = "asyncpg") -> str:
    return f"postgresql+{driver}://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


class TestDatabase:
    """One Prefect database for one test.

    ``url`` is the async URL for the library under test; ``engine`` is a sync engine for the
    test side. The SQL helpers adapt parameters with :func:`tests.factory.values.adapt`, so
    tests may pass aware datetimes, timedeltas, bools and UUIDs on both dialects.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        dialect: str,
        url: str,
        engine: Engine,
        *,
        path: Path | None = None,
        name: str | None = None,
    ) -> None:
        self.dialect = dialect
        self.url = url
        self.engine = engine
        self.path = path  # SQLite file
        self.name = name  # PostgreSQL database name

    @classmethod
    def sqlite(cls, path: Path) -> TestDatabase:
        return cls("sqlite", f"sqlite+aiosqlite:///{path}", sqlite_engine(path), path=path)

    @classmethod
    def postgres(cls, name: str) -> TestDatabase:
        return cls("postgresql", postgres_url(name), postgres_engine(name), name=name)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def sqlite_file(self) -> Path:
        """The SQLite database file (a TypeError on PostgreSQL, which has none)."""
        if self.path is None:
            raise TypeError(f"{self!r} is not a SQLite database")
        return self.path

    def adapt(self, value: Any) -> Any:
        return adapt(value, self.dialect)

    def execute(self, sql: str, params: Params = None) -> int:
        """Run one statement (executemany if ``params`` is a list) and commit; the rowcount."""
        with self.engine.begin() as connection:
            result = connection.execute(text(sql), adapt_params(params, self.dialect))
            return int(result.rowcount)

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        with self.engine.connect() as connection:
            return connection.execute(text(sql), adapt_params(params, self.dialect)).scalar()

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            result = connection.execute(text(sql), adapt_params(params, self.dialect))
            return [dict(row) for row in result.mappings()]

    def count(self, table: str, where: str = "1=1", params: Mapping[str, Any] | None = None) -> int:
        return int(self.scalar(f"SELECT count(*) FROM {table} WHERE {where}", params))

    def ids(
        self, table: str, where: str = "1=1", params: Mapping[str, Any] | None = None
    ) -> set[str]:
        """The ``id`` values of matching rows, as lowercase strings."""
        rows = self.rows(f"SELECT id FROM {table} WHERE {where}", params)
        return {str(row["id"]).lower() for row in rows}

    def dispose(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"TestDatabase({self.dialect!r}, {self.url!r})"
