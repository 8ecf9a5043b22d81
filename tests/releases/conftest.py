"""Databases in the schemas of older Prefect releases, next to Prefect 3.9.1's.

Fixtures
--------
Session scope
    ``release_templates`` -> :class:`ReleaseTemplates`: builds one template per release and
    dialect from the dumps in this folder, the first time a test asks for it (milliseconds:
    the dump is replayed, no migration runs), and drops them at the end.

Function scope
    ``release`` -> :class:`tests.releases.Release`: every release in ``RELEASES`` on each
    dialect (marks ``sqlite`` / ``postgres``).
    ``release_database`` -> :class:`tests.factory.TestDatabase`: a fresh copy of that
    release's template (SQLite: a file copy; PostgreSQL: ``CREATE DATABASE ... TEMPLATE``).
    ``current_database`` -> :class:`tests.factory.TestDatabase`: a fresh Prefect 3.9.1
    database of the same dialect, copied from the root conftest's ``sqlite_template`` or
    ``postgres_template`` (built by 3.9.1's own migrations).
    ``release_schema``, ``current_schema`` -> :class:`tests.factory.TestDatabase`: the two
    templates themselves, opened to read their catalogs (no copy; never write to them).
"""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests import factory
from tests.releases import RELEASES, Release


def _worker_tag() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"{worker}_{os.getpid()}".lower()


class ReleaseTemplates:
    """Template databases of older releases, and per-test copies of any template."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.tag = _worker_tag()
        self._counter = itertools.count(1)
        self._sqlite: dict[str, Path] = {}
        self._postgres: dict[str, str] = {}
        self._admin_connection: psycopg.Connection[Any] | None = None

    # -- templates --------------------------------------------------------------------------
    def template(self, release: Release) -> Path | str:
        """The release's template: a SQLite file path or a PostgreSQL database name."""
        if release.dialect == "sqlite":
            if release.version not in self._sqlite:
                self._sqlite[release.version] = self._build_sqlite(release)
            return self._sqlite[release.version]
        if release.version not in self._postgres:
            self._postgres[release.version] = self._build_postgres(release)
        return self._postgres[release.version]

    def _build_sqlite(self, release: Release) -> Path:
        path = self.home / f"prefect-{release.version}.db"
        connection = sqlite3.connect(path)
        try:
            connection.executescript(release.dump)
            # Prefect's server turns WAL on for its file; archiver and the copies expect it.
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            connection.close()
        return path

    def _build_postgres(self, release: Release) -> str:
        name = f"archiver_rel_{release.version.replace('.', '_')}_{self.tag}"
        self._drop(name)
        self._admin().execute(f'CREATE DATABASE "{name}"')
        dsn = f"postgresql://{factory.PG_USER}@{factory.PG_HOST}:{factory.PG_PORT}/{name}"
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(release.dump.encode())  # many statements: fine without params
        return name

    # -- per-test copies --------------------------------------------------------------------
    def sqlite_copy(self, template: Path, folder: Path) -> factory.TestDatabase:
        path = folder / "prefect.db"
        shutil.copyfile(template, path)
        return factory.TestDatabase.sqlite(path)

    def postgres_copy(self, template: str) -> factory.TestDatabase:
        name = f"archiver_r_{self.tag}_{next(self._counter)}"
        self._drop(name)
        self._admin().execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return factory.TestDatabase.postgres(name)

    def drop(self, database: factory.TestDatabase) -> None:
        database.dispose()
        if database.name is not None:
            self._drop(database.name)

    # -- PostgreSQL administration ----------------------------------------------------------
    def _admin(self) -> psycopg.Connection[Any]:
        if self._admin_connection is None:
            try:
                self._admin_connection = psycopg.connect(
                    factory.PG_ADMIN_DSN, autocommit=True, connect_timeout=5
                )
            except psycopg.OperationalError as exc:
                pytest.fail(
                    f"PostgreSQL is not reachable at {factory.PG_HOST}:{factory.PG_PORT}: "
                    f"{str(exc).strip()}; start it, or deselect with -m 'not postgres'",
                    pytrace=False,
                )
        return self._admin_connection

    def _drop(self, name: str) -> None:
        self._admin().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self._admin_connection is None:
            return
        try:
            for name in self._postgres.values():
                self._drop(name)
        finally:
            self._admin_connection.close()


@pytest.fixture(scope="session")
def release_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReleaseTemplates]:
    templates = ReleaseTemplates(tmp_path_factory.mktemp("prefect-releases"))
    try:
        yield templates
    finally:
        templates.close()


@pytest.fixture(
    params=[
        pytest.param(
            Release(version, dialect),
            id=f"{version}-{'postgres' if dialect == 'postgresql' else dialect}",
            marks=pytest.mark.postgres if dialect == "postgresql" else pytest.mark.sqlite,
        )
        for version in RELEASES
        for dialect in ("sqlite", "postgresql")
    ]
)
def release(request: pytest.FixtureRequest) -> Release:
    """An older Prefect release on one dialect."""
    value: Release = request.param
    return value


def _current_template(release: Release, request: pytest.FixtureRequest) -> Path | str:
    """The root conftest's Prefect 3.9.1 template of ``release``'s dialect."""
    name = "sqlite_template" if release.dialect == "sqlite" else "postgres_template"
    template: Path | str = request.getfixturevalue(name)
    return template


def _copy(templates: ReleaseTemplates, template: Path | str, folder: Path) -> factory.TestDatabase:
    if isinstance(template, Path):
        folder.mkdir(exist_ok=True)
        return templates.sqlite_copy(template, folder)
    return templates.postgres_copy(template)


def _opened(template: Path | str) -> Iterator[factory.TestDatabase]:
    database = (
        factory.TestDatabase.sqlite(template)
        if isinstance(template, Path)
        else factory.TestDatabase.postgres(template)
    )
    try:
        yield database
    finally:
        database.dispose()  # PostgreSQL copies nothing from a template while one is connected


@pytest.fixture
def release_database(
    release: Release, release_templates: ReleaseTemplates, tmp_path: Path
) -> Iterator[factory.TestDatabase]:
    """A fresh database in the schema ``release``'s migrations create."""
    database = _copy(release_templates, release_templates.template(release), tmp_path)
    try:
        yield database
    finally:
        release_templates.drop(database)


@pytest.fixture
def current_database(
    release: Release,
    release_templates: ReleaseTemplates,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> Iterator[factory.TestDatabase]:
    """A fresh Prefect 3.9.1 database of ``release``'s dialect."""
    template = _current_template(release, request)
    database = _copy(release_templates, template, tmp_path / "current")
    try:
        yield database
    finally:
        release_templates.drop(database)


@pytest.fixture
def release_schema(
    release: Release, release_templates: ReleaseTemplates
) -> Iterator[factory.TestDatabase]:
    """``release``'s template itself, to read its catalog: never write to it."""
    yield from _opened(release_templates.template(release))


@pytest.fixture
def current_schema(
    release: Release, request: pytest.FixtureRequest
) -> Iterator[factory.TestDatabase]:
    """Prefect 3.9.1's template of ``release``'s dialect, to read its catalog: never write."""
    yield from _opened(_current_template(release, request))
