"""Older Prefect releases: their migrated schemas as fixtures, and the tests that use them.

``prefect-<version>/<dialect>.sql`` holds what ``prefect server database upgrade -y`` of
that release creates (the schema and the ``alembic_version`` row; the migrations seed no
other row), dumped once by :mod:`tests.releases.regenerate`, whose docstring says how to
add a release. ``conftest.py`` here builds one template per release and dialect from those
files, once per session, and hands each test a fresh copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent

#: Release -> dialect -> the alembic head its migrations end at (what the dump holds).
RELEASES: dict[str, dict[str, str]] = {
    "3.4.7": {"postgresql": "3b86c5ea017a", "sqlite": "8bb517bae6f9"},
    "3.6.29": {"postgresql": "09a9e091e578", "sqlite": "4dfa692e02a7"},
}


def fixture_path(version: str, dialect: str) -> Path:
    """Where the dump of ``version`` on ``dialect`` (``postgresql`` or ``sqlite``) lives."""
    return FIXTURES / f"prefect-{version}" / f"{dialect}.sql"


@dataclass(frozen=True)
class Release:
    """One older Prefect release on one dialect."""

    version: str
    dialect: str  # "postgresql" or "sqlite"

    @property
    def revision(self) -> str:
        return RELEASES[self.version][self.dialect]

    @property
    def dump(self) -> str:
        return fixture_path(self.version, self.dialect).read_text()
