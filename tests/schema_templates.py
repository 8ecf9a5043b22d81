"""Prefect's schema, built once per test session: the template databases tests copy.

``prefect server database upgrade -y`` migrates an empty SQLite file and an empty PostgreSQL
database in two background processes, started together as soon as the session knows which
backends its tests use (:func:`backends_needed`). A test's database is then a file copy
(SQLite) or ``CREATE DATABASE ... TEMPLATE`` (PostgreSQL); see the fixtures in conftest.py.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.factory import PG_ADMIN_DSN, PG_HOST, PG_PORT, PG_USER, postgres_url

UPGRADE_TIMEOUT = 300  # seconds


def _worker_tag() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"{worker}_{os.getpid()}".lower()


class Upgrade:
    """One ``prefect server database upgrade -y`` running in the background."""

    def __init__(self, dialect: str, url: str, home: Path) -> None:
        self.dialect = dialect
        self.url = url
        self.log_path = home / f"upgrade-{dialect}.log"
        self.started = time.perf_counter()
        self.elapsed: float | None = None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(home / f"home-{dialect}"),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait(self) -> None:
        try:
            code = self.process.wait(timeout=UPGRADE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"Prefect's {self.dialect} migration did not finish in {UPGRADE_TIMEOUT} s;"
                f" output:\n{self._output()}",
                pytrace=False,
            )
        if self.elapsed is None:
            self.elapsed = time.perf_counter() - self.started
        if code != 0:
            pytest.fail(
                f"`prefect server database upgrade -y` failed on {self.dialect} ({self.url}),"
                f" exit code {code}; output:\n{self._output()}",
                pytrace=False,
            )

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def _output(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-40:])


class Templates:
    """Builds the per-session template databases (the ``_prefect_templates`` fixture holds one)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        tag = _worker_tag()
        self.pg_template = f"archiver_tpl_{tag}"
        self.pg_prefix = f"archiver_t_{tag}_"
        self.sqlite_path = home / "template.db"
        self._counter = itertools.count(1)
        self._upgrades: dict[str, Upgrade] = {}
        self._admin: psycopg.Connection[Any] | None = None
        self._pg_error: str | None = None
        self._ready: set[str] = set()

    # -- starting ---------------------------------------------------------------------------
    def start(self, dialects: set[str]) -> None:
        for dialect in sorted(dialects, key=lambda d: d != "postgresql"):  # slower one first
            if dialect in self._upgrades or (dialect == "postgresql" and self._pg_error):
                continue
            if dialect == "postgresql":
                self._start_postgres()
            else:
                url = f"sqlite+aiosqlite:///{self.sqlite_path}"
                self._upgrades["sqlite"] = Upgrade("sqlite", url, self.home)

    def _start_postgres(self) -> None:
        try:
            self._admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            self._pg_error = (
                f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} as user {PG_USER!r} "
                f"(trust auth expected): {str(exc).strip()}\n"
                "The postgres tests need a real server: start PostgreSQL 15 there, or deselect "
                "them with -m 'not postgres'."
            )
            return
        self._drop(self.pg_template)
        self._admin.execute(f'CREATE DATABASE "{self.pg_template}"')
        self._upgrades["postgresql"] = Upgrade(
            "postgresql", postgres_url(self.pg_template), self.home
        )

    # -- waiting ----------------------------------------------------------------------------
    def sqlite(self) -> Path:
        self.start({"sqlite"})
        if "sqlite" not in self._ready:
            self._upgrades["sqlite"].wait()
            # Fold the WAL into the main file so a plain copy of it is complete; the journal
            # mode stays WAL (it is stored in the file header).
            connection = sqlite3.connect(self.sqlite_path)
            try:
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
            finally:
                connection.close()
            if mode != "wal":
                pytest.fail(f"Prefect left journal_mode={mode!r} on the SQLite template")
            for suffix in ("-wal", "-shm"):
                leftover = Path(f"{self.sqlite_path}{suffix}")
                if leftover.exists() and leftover.stat().st_size:
                    pytest.fail(f"{leftover} is not empty after a checkpoint")
            self._ready.add("sqlite")
        return self.sqlite_path

    def postgres(self) -> str:
        self.start({"postgresql"})
        if self._pg_error:
            pytest.fail(self._pg_error, pytrace=False)
        if "postgresql" not in self._ready:
            self._upgrades["postgresql"].wait()
            self._ready.add("postgresql")
        return self.pg_template

    # -- per-test PostgreSQL databases -------------------------------------------------------
    def create_postgres_database(self) -> str:
        template = self.postgres()
        assert self._admin is not None
        name = f"{self.pg_prefix}{next(self._counter)}"
        self._drop(name)
        self._admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def drop_postgres_database(self, name: str) -> None:
        self._drop(name)

    def _drop(self, name: str) -> None:
        assert self._admin is not None
        self._admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # -- teardown ---------------------------------------------------------------------------
    def timings(self) -> dict[str, float]:
        return {d: u.elapsed for d, u in self._upgrades.items() if u.elapsed is not None}

    def close(self) -> None:
        for upgrade in self._upgrades.values():
            upgrade.kill()
        if self._admin is not None:
            try:
                if "postgresql" in self._upgrades:
                    self._drop(self.pg_template)
            finally:
                self._admin.close()


def backends_needed(items: list[pytest.Item]) -> set[str]:
    """The database backends that the collected tests will ask for."""
    needed: set[str] = set()
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"sqlite_database", "sqlite_template"}:
            needed.add("sqlite")
        if names & {"postgres_database", "postgres_template"}:
            needed.add("postgresql")
        if "database" in names:
            callspec = getattr(item, "callspec", None)
            param = callspec.params.get("database") if callspec is not None else None
            needed.update([param] if param else ["sqlite", "postgresql"])
    return needed
