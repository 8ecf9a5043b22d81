"""Real services for the archiver's tests: Prefect-migrated databases and S3 on moto.

Fixtures
--------
Session scope
    ``sqlite_template`` -> Path, ``postgres_template`` -> str (template database name):
    Prefect's schema, built once per session with ``prefect server database upgrade -y``.
    Both upgrades start together (two processes) as soon as the first test needs either
    template; only the backends that the collected tests use are built.
    ``moto_server`` -> str: ``http://127.0.0.1:<port>`` of a threaded moto server; sets
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` = ``testing`` and
    ``AWS_DEFAULT_REGION`` = ``us-east-1`` for the session.

Function scope
    ``database`` (params sqlite/postgres, marks ``sqlite``/``postgres``),
    ``sqlite_database``, ``postgres_database`` -> :class:`tests.factory.TestDatabase`: a fresh copy
    of the template (SQLite: file copy into ``tmp_path``; PostgreSQL:
    ``CREATE DATABASE ... TEMPLATE ...``, dropped afterwards).
    ``storage`` (params local/s3, marks ``local``/``s3``), ``local_storage``,
    ``s3_storage`` -> :class:`tests.factory.TestStorage`.
    Moto's state is reset after every test once the server runs.

PostgreSQL must listen on 127.0.0.1:5432 (user ``postgres``, trust auth). If it does not,
the PostgreSQL fixtures fail; they never skip.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.factory import (
    PG_ADMIN_DSN,
    PG_HOST,
    PG_PORT,
    PG_USER,
    TestDatabase,
    TestStorage,
    postgres_url,
)

_UPGRADE_TIMEOUT = 300  # seconds
_MOTO_ENDPOINT = pytest.StashKey[str]()
_TEMPLATE_TIMES = pytest.StashKey[dict[str, float]]()


def _worker_tag() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"{worker}_{os.getpid()}".lower()


# --------------------------------------------------------------------------------------------
# Prefect schema templates
# --------------------------------------------------------------------------------------------


class _Upgrade:
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
            code = self.process.wait(timeout=_UPGRADE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"Prefect's {self.dialect} migration did not finish in {_UPGRADE_TIMEOUT} s;"
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


class _Templates:
    """Builds the per-session template databases; created by ``_prefect_templates``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        tag = _worker_tag()
        self.pg_template = f"archiver_tpl_{tag}"
        self.pg_prefix = f"archiver_t_{tag}_"
        self.sqlite_path = home / "template.db"
        self._counter = itertools.count(1)
        self._upgrades: dict[str, _Upgrade] = {}
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
                self._upgrades["sqlite"] = _Upgrade("sqlite", url, self.home)

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
        self._upgrades["postgresql"] = _Upgrade(
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


def _backends_needed(items: list[pytest.Item]) -> set[str]:
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


@pytest.fixture(scope="session")
def _prefect_templates(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[_Templates]:
    templates = _Templates(tmp_path_factory.mktemp("prefect"))
    try:
        templates.start(_backends_needed(request.session.items))
        yield templates
    finally:
        request.config.stash[_TEMPLATE_TIMES] = templates.timings()
        templates.close()


@pytest.fixture(scope="session")
def sqlite_template(_prefect_templates: _Templates) -> Path:
    """Path of a SQLite file migrated by Prefect (do not write to it; copy it)."""
    return _prefect_templates.sqlite()


@pytest.fixture(scope="session")
def postgres_template(_prefect_templates: _Templates) -> str:
    """Name of a PostgreSQL database migrated by Prefect (used as CREATE DATABASE TEMPLATE)."""
    return _prefect_templates.postgres()


def _sqlite_database(template: Path, tmp_path: Path) -> Iterator[TestDatabase]:
    path = tmp_path / "prefect.db"
    shutil.copyfile(template, path)
    database = TestDatabase.sqlite(path)
    try:
        yield database
    finally:
        database.dispose()


def _postgres_database(templates: _Templates) -> Iterator[TestDatabase]:
    name = templates.create_postgres_database()
    database = TestDatabase.postgres(name)
    try:
        yield database
    finally:
        database.dispose()
        templates.drop_postgres_database(name)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgresql", id="postgres", marks=pytest.mark.postgres),
    ]
)
def database(
    request: pytest.FixtureRequest, _prefect_templates: _Templates, tmp_path: Path
) -> Iterator[TestDatabase]:
    """A fresh Prefect database, once per backend."""
    if request.param == "sqlite":
        yield from _sqlite_database(_prefect_templates.sqlite(), tmp_path)
    else:
        yield from _postgres_database(_prefect_templates)


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite", marks=pytest.mark.sqlite)])
def sqlite_database(sqlite_template: Path, tmp_path: Path) -> Iterator[TestDatabase]:
    """A fresh SQLite Prefect database (the test carries the ``sqlite`` mark)."""
    yield from _sqlite_database(sqlite_template, tmp_path)


@pytest.fixture(params=[pytest.param("postgresql", id="postgres", marks=pytest.mark.postgres)])
def postgres_database(
    _prefect_templates: _Templates, postgres_template: str
) -> Iterator[TestDatabase]:
    """A fresh PostgreSQL Prefect database (the test carries the ``postgres`` mark)."""
    yield from _postgres_database(_prefect_templates)


# --------------------------------------------------------------------------------------------
# S3 on moto
# --------------------------------------------------------------------------------------------

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_AWS_ENV_CLEARED = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


@pytest.fixture(scope="session")
def moto_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a moto server (S3 over real HTTP) for the session."""
    from moto.server import ThreadedMotoServer

    werkzeug_log = logging.getLogger("werkzeug")  # one INFO line per request otherwise
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(werkzeug_log, "level", max(werkzeug_log.level, logging.WARNING))
        for key, value in _AWS_ENV.items():
            patch.setenv(key, value)
        for key in _AWS_ENV_CLEARED:
            patch.delenv(key, raising=False)
        # Port 0: the OS picks a free port while binding, so no other process can race us.
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        _host, port = server.get_host_and_port()
        endpoint = f"http://127.0.0.1:{port}"
        request.config.stash[_MOTO_ENDPOINT] = endpoint
        try:
            yield endpoint
        finally:
            del request.config.stash[_MOTO_ENDPOINT]
            server.stop()
            werkzeug_server = getattr(server, "_server", None)
            if werkzeug_server is not None:
                werkzeug_server.server_close()  # stop() leaves the listening socket open


def _reset_moto(endpoint: str) -> None:
    call = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(call, timeout=30) as response:
        response.read()


@pytest.fixture(autouse=True)
def _moto_reset_between_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    endpoint = request.config.stash.get(_MOTO_ENDPOINT, None)
    if endpoint is not None:
        _reset_moto(endpoint)


def _local_storage(tmp_path: Path) -> Iterator[TestStorage]:
    storage = TestStorage("local", str(tmp_path / "archive"), {})
    try:
        yield storage
    finally:
        storage.close()


def _s3_storage(endpoint: str) -> Iterator[TestStorage]:
    import boto3

    bucket = f"archiver-test-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    try:
        client.create_bucket(Bucket=bucket)
    finally:
        client.close()
    options = {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    storage = TestStorage("s3", f"s3://{bucket}/archive", options, endpoint_url=endpoint)
    try:
        yield storage
    finally:
        storage.close()


@pytest.fixture(
    params=[
        pytest.param("local", id="local", marks=pytest.mark.local),
        pytest.param("s3", id="s3", marks=pytest.mark.s3),
    ]
)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestStorage]:
    """An empty archive root, once on a local folder and once on S3 (moto)."""
    if request.param == "local":
        yield from _local_storage(tmp_path)
    else:
        yield from _s3_storage(request.getfixturevalue("moto_server"))


@pytest.fixture(params=[pytest.param("local", id="local", marks=pytest.mark.local)])
def local_storage(tmp_path: Path) -> Iterator[TestStorage]:
    """An empty local archive root (the test carries the ``local`` mark)."""
    yield from _local_storage(tmp_path)


@pytest.fixture(params=[pytest.param("s3", id="s3", marks=pytest.mark.s3)])
def s3_storage(moto_server: str) -> Iterator[TestStorage]:
    """An empty S3 archive root on moto (the test carries the ``s3`` mark)."""
    yield from _s3_storage(moto_server)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    timings = config.stash.get(_TEMPLATE_TIMES, None)
    if timings:
        text = ", ".join(
            f"{dialect} {seconds:.1f} s" for dialect, seconds in sorted(timings.items())
        )
        terminalreporter.write_line(
            f"Prefect schema templates ready after (concurrent migrations): {text}"
        )
