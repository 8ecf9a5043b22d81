"""Dump the schema that an older Prefect release's own migrations create, as test fixtures.

Run it from the repository root with the project's venv (PostgreSQL on 127.0.0.1:5432,
user ``postgres``, trust auth, as for the tests; ``pg_dump`` on the PATH)::

    .venv/bin/python -m tests.releases.regenerate 3.4.7 3.6.29

For each version it

1. makes a throwaway venv ``<venvs>/<version>`` OUTSIDE the repository (default
   ``$TMPDIR/archiver-prefect-releases``; ``--venvs DIR`` to choose) and installs
   ``prefect==<version>`` there, unless that venv already has it;
2. runs that release's ``prefect server database upgrade -y`` on a new, empty PostgreSQL
   database and on a new SQLite file;
3. writes ``tests/releases/prefect-<version>/postgresql.sql`` (``pg_dump --no-owner
   --no-privileges --inserts``: the schema, the ``alembic_version`` row and any row the
   migrations seed) and ``sqlite.sql`` (every ``sqlite_master`` statement, tables then
   indexes by name, then the seeded rows as INSERTs), then drops the database and file.
   Both are the same text on every rerun of the same release, so a diff shows real change.

To cover a new release: run the script with its version, add the version to
``RELEASES`` in ``tests/releases/__init__.py`` (with its alembic heads, which the script
prints), run ``pytest tests/releases``, and commit the new folder. Never commit the venv.
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

from tests import factory
from tests.releases import FIXTURES, fixture_path

#: pg_dump lines that change on every dump (PostgreSQL 15.14+ writes a random key to
#: \restrict / \unrestrict, which are psql meta-commands a plain driver cannot run).
_VOLATILE = re.compile(r"^(\\restrict|\\unrestrict|-- Dumped (from|by) ).*\n", re.MULTILINE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="Prefect releases, e.g. 3.4.7")
    parser.add_argument(
        "--venvs",
        type=Path,
        default=Path(tempfile.gettempdir()) / "archiver-prefect-releases",
        help="where the throwaway venvs go (outside the repository)",
    )
    args = parser.parse_args()
    if args.venvs.resolve().is_relative_to(FIXTURES.parent.parent.resolve()):
        parser.error(f"--venvs {args.venvs} is inside the repository; choose a folder outside it")
    for version in args.versions:
        prefect = install(version, args.venvs / version)
        with tempfile.TemporaryDirectory(prefix=f"prefect-{version}-") as work:
            heads = {
                "postgresql": dump_postgres(version, prefect, Path(work)),
                "sqlite": dump_sqlite(version, prefect, Path(work)),
            }
        folder = fixture_path(version, "sqlite").parent
        print(f"prefect {version}: alembic heads {heads} -> {folder}")


def install(version: str, venv: Path) -> Path:
    """The ``prefect`` executable of a venv holding exactly ``prefect==version``."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run(
        [str(python), "-c", "import prefect; print(prefect.__version__)"],
        capture_output=True,
        text=True,
    )
    if installed.stdout.strip() != version:
        # Prefect 3.4.x imports importlib_metadata without declaring it on Python 3.10+.
        packages = [f"prefect=={version}", "importlib_metadata"]
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    return venv / "bin" / "prefect"


def upgrade(prefect: Path, url: str, home: Path) -> None:
    """``prefect server database upgrade -y`` of that release against ``url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    done = subprocess.run(
        [str(prefect), "server", "database", "upgrade", "-y"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"{prefect} server database upgrade failed:\n{done.stdout}{done.stderr}")


def dump_postgres(version: str, prefect: Path, work: Path) -> str:
    name = f"archiver_dump_{version.replace('.', '_')}_{os.getpid()}"
    with psycopg.connect(factory.PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            upgrade(prefect, factory.postgres_url(name), work / "home-postgresql")
            dumped = subprocess.run(
                ["pg_dump", "--no-owner", "--no-privileges", "--inserts",
                 "-h", factory.PG_HOST, "-p", str(factory.PG_PORT), "-U", factory.PG_USER, name],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    write(version, "postgresql", _VOLATILE.sub("", dumped))
    return _head(dumped)


def dump_sqlite(version: str, prefect: Path, work: Path) -> str:
    path = work / "prefect.db"
    upgrade(prefect, f"sqlite+aiosqlite:///{path}", work / "home-sqlite")
    connection = sqlite3.connect(path)
    try:
        # Tables, then indexes, each by name: Alembic's batch mode rebuilds tables (and so
        # reorders sqlite_master) differently from one run to the next.
        statements = [
            f"{_sorted_constraints(sql)};"
            for (sql,) in connection.execute(
                "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"
                " AND name NOT LIKE 'sqlite_%' ORDER BY type != 'table', type, name"
            )
        ]
        tables = [
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        for table in tables:
            statements += _sqlite_inserts(connection, table)
    finally:
        connection.close()
    text = "\n".join(statements) + "\n"
    write(version, "sqlite", text)
    return _head(text)


def _sorted_constraints(sql: str) -> str:
    """A CREATE TABLE with its closing block of one-line constraints in name order.

    Alembic's batch mode writes a rebuilt table's constraints in set order, which changes
    between runs; the order means nothing to SQLite. Other statements come back as given.
    """
    lines = sql.split("\n")
    block = [i for i, line in enumerate(lines) if line.startswith("\tCONSTRAINT ")]
    if not block or block != list(range(block[0], len(lines) - 1)) or lines[-1] != ")":
        return sql
    constraints = sorted(lines[i].rstrip().rstrip(",") for i in block)
    ends = [", "] * (len(constraints) - 1) + [""]
    return "\n".join(lines[: block[0]] + [c + e for c, e in zip(constraints, ends, strict=True)]
                     + [")"])  # fmt: skip


def _sqlite_inserts(connection: sqlite3.Connection, table: str) -> list[str]:
    rows = connection.execute(f'SELECT * FROM "{table}"').fetchall()
    return [
        f'INSERT INTO "{table}" VALUES ({", ".join(_sqlite_literal(v) for v in row)});'
        for row in rows
    ]


def _sqlite_literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, bytes):
        return f"X'{value.hex()}'"
    return "'" + str(value).replace("'", "''") + "'"


def _head(dump: str) -> str:
    found = re.search(r"INSERT INTO \S*alembic_version\S* VALUES \('([0-9a-f]+)'\)", dump)
    if found is None:
        raise SystemExit("the dump has no alembic_version row")
    return found.group(1)


def write(version: str, dialect: str, text: str) -> None:
    target = fixture_path(version, dialect)
    target.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"-- Prefect {version} on {dialect}: what `prefect server database upgrade -y` creates.\n"
        "-- Generated by `python -m tests.releases.regenerate`; do not edit by hand.\n"
    )
    target.write_text(header + text)


if __name__ == "__main__":
    main()
