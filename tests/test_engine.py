"""archiver's own database sessions: SQLite pragmas as Prefect sets them, PostgreSQL timeouts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from archiver.errors import ConfigError
from archiver.source.engine import DatabaseOptions, create_engine, write_transaction_options
from tests.factory import TestDatabase


async def session_values(url: str, queries: list[str], write: bool = False) -> list[Any]:
    engine = create_engine(DatabaseOptions(url, lock_timeout=7, statement_timeout=600))
    try:
        async with engine.connect() as conn:
            if write:
                await write_transaction_options(conn)
            async with conn.begin():
                return [(await conn.execute(text(query))).scalar() for query in queries]
    finally:
        await engine.dispose()


@pytest.mark.sqlite
def test_sqlite_sessions_enforce_foreign_keys_and_wait_for_prefect(
    sqlite_database: TestDatabase,
) -> None:
    for write in (False, True):  # a pooled connection reused for a write keeps them too
        values = asyncio.run(
            session_values(
                sqlite_database.url,
                ["PRAGMA foreign_keys", "PRAGMA busy_timeout", "PRAGMA journal_mode"],
                write=write,
            )
        )
        assert values == [1, 60000, "wal"]


@pytest.mark.postgres
def test_postgres_sessions_get_maintenance_settings(postgres_database: TestDatabase) -> None:
    values = asyncio.run(
        session_values(
            postgres_database.url,
            [
                "SHOW lock_timeout",
                "SHOW statement_timeout",
                "SHOW idle_in_transaction_session_timeout",
                "SHOW jit",
                "SHOW random_page_cost",
                "SHOW application_name",
            ],
        )
    )
    assert values == ["7s", "10min", "0", "off", "1.1", "archiver"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://root@localhost/prefect", "unsupported database 'mysql'"),
        ("sqlite+aiosqlite://", "no SQLite database"),
        ("::nonsense::", "is not a database URL"),
    ],
)
def test_unusable_urls_are_refused_before_connecting(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_engine(DatabaseOptions(url))
