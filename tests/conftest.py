"""Real services for the archiver's tests: Prefect-migrated databases and S3 on moto.

Fixtures
--------
Session scope
    ``sqlite_template`` -> Path, ``postgres_template`` -> str (template database name):
    Prefect's schema, built once per session with ``prefect server database upgrade -y``
    (:mod:`tests.schema_templates`).
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

import logging
import shutil
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factory import TestDatabase, TestStorage
from tests.schema_templates import Templates, backends_needed

_MOTO_ENDPOINT = pytest.StashKey[str]()
_TEMPLATE_TIMES = pytest.StashKey[dict[str, float]]()


@pytest.fixture(scope="session")
def _prefect_templates(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Templates]:
    templates = Templates(tmp_path_factory.mktemp("prefect"))
    try:
        templates.start(backends_needed(request.session.items))
        yield templates
    finally:
        request.config.stash[_TEMPLATE_TIMES] = templates.timings()
        templates.close()


@pytest.fixture(scope="session")
def sqlite_template(_prefect_templates: Templates) -> Path:
    """Path of a SQLite file migrated by Prefect (do not write to it; copy it)."""
    return _prefect_templates.sqlite()


@pytest.fixture(scope="session")
def postgres_template(_prefect_templates: Templates) -> str:
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


def _postgres_database(templates: Templates) -> Iterator[TestDatabase]:
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
    request: pytest.FixtureRequest, _prefect_templates: Templates, tmp_path: Path
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
    _prefect_templates: Templates, postgres_template: str
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


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    timings = config.stash.get(_TEMPLATE_TIMES, None)
    if timings:
        text = ", ".join(
            f"{dialect} {seconds:.1f} s" for dialect, seconds in sorted(timings.items())
        )
        terminalreporter.write_line(
            f"Prefect schema templates ready after (concurrent migrations): {text}"
        )
