"""``archiver doctor``: is everything in place for ``archiver run`` to work well?

A list of independent checks, each OK, WARN or FAIL with one line of detail and
a hint. FAIL means a run would not work (no database, not a Prefect database,
storage not writable); WARN means it would work, but slowly or with a risk the
operator should know about (a missing index, clocks apart, open batches).

Everything is read-only except two things: a small test object that is
written, read back and deleted under ``_doctor/`` in the archive storage, and,
only with ``create_index``, the indexes selection needs and the database lacks
(CONCURRENTLY on PostgreSQL, so Prefect keeps writing).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from archiver.archive.manifest import PendingMarker
from archiver.archive.storage import PENDING_DIR, Storage
from archiver.errors import ArchiverError, ConfigError, SchemaError, StorageError
from archiver.source.engine import (
    DatabaseOptions,
    create_engine,
    read_only_connection,
    translate_error,
)
from archiver.source.health import database_now, server_version, sqlite_journal_warning
from archiver.source.ledger import LedgerStatus, ledger_status
from archiver.source.maintenance import create_index
from archiver.source.schema import IndexSpec, PrefectSchema, inspect_schema, revision_known

DOCTOR_DIR = "_doctor"


class Status(StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""


@dataclass(frozen=True)
class DoctorOptions:
    database: DatabaseOptions
    storage_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    create_index: bool = False  # build missing indexes selection needs
    max_clock_skew: float = 30.0  # seconds between the database's clock and this host's


@dataclass
class DoctorReport:
    checks: list[Check]

    @property
    def failed(self) -> bool:
        return any(check.status is Status.FAIL for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": not self.failed, "checks": [asdict(check) for check in self.checks]}


async def doctor(options: DoctorOptions) -> DoctorReport:
    """Run every check; never raises for what it checks (a failure is a FAIL check)."""
    checks, source_id = await _database_checks(options)
    checks += await asyncio.to_thread(_storage_checks, options, source_id)
    return DoctorReport(checks)


@dataclass
class _Facts:
    """What one read-only look at the database found."""

    version: str = ""
    schema: PrefectSchema | None = None
    schema_error: SchemaError | None = None
    journal_warning: str | None = None
    skew: float | None = None
    ledger: LedgerStatus | None = None


async def _database_checks(options: DoctorOptions) -> tuple[list[Check], str | None]:
    try:
        engine = create_engine(options.database)
    except ConfigError as exc:
        return [Check("database", Status.FAIL, exc.message, exc.hint)], None
    try:
        try:
            facts = await _look(engine)
        except (SQLAlchemyError, OSError) as exc:
            error = translate_error(exc, options.database.url)
            return [Check("database", Status.FAIL, error.message, error.hint)], None
        checks = [Check("database", Status.OK, f"connected: {facts.version}")]
        checks += _schema_checks(facts)
        if facts.schema is not None:
            checks.append(await _index_check(engine, facts.schema, options.create_index))
        checks.append(_clock_check(facts, engine.dialect.name, options.max_clock_skew))
        checks.append(_ledger_check(facts.ledger))
        return checks, facts.ledger.source_id if facts.ledger else None
    finally:
        await engine.dispose()


async def _look(engine: AsyncEngine) -> _Facts:
    facts = _Facts()
    async with read_only_connection(engine) as conn:
        facts.version = await server_version(conn)
        try:
            facts.schema = await inspect_schema(conn)
        except SchemaError as exc:
            facts.schema_error = exc
        facts.journal_warning = await sqlite_journal_warning(conn)
        before = datetime.now(UTC)
        database_time = await database_now(conn)
        after = datetime.now(UTC)
        facts.skew = (database_time - (before + (after - before) / 2)).total_seconds()
        facts.ledger = await ledger_status(conn)
    return facts


def _schema_checks(facts: _Facts) -> list[Check]:
    checks = []
    if facts.schema_error is not None:
        error = facts.schema_error
        checks.append(Check("schema", Status.FAIL, error.message, error.hint))
    elif facts.schema is not None:
        schema = facts.schema
        if revision_known(schema.dialect, schema.revision):
            detail = f"Prefect schema revision {schema.revision} is one archiver was tested with"
            checks.append(Check("schema", Status.OK, detail))
        else:
            checks.append(Check(
                "schema", Status.WARN,
                f"Prefect schema revision {schema.revision} ({schema.dialect}) is not one "
                "archiver was tested with; columns are reflected, so archives stay complete",
                "upgrade archiver if a newer release supports this Prefect version",
            ))  # fmt: skip
    if facts.journal_warning:
        checks.append(
            Check("journal", Status.WARN, facts.journal_warning, "PRAGMA journal_mode=WAL")
        )
    return checks


async def _index_check(engine: AsyncEngine, schema: PrefectSchema, build: bool) -> Check:
    missing = list(schema.missing_indexes)
    if not missing:
        return Check("indexes", Status.OK, "every lookup of a batch has an index")
    names = ", ".join(str(spec) for spec in missing)
    if not build:
        return Check(
            "indexes", Status.WARN,
            f"no index on {names}: every batch scans these tables",
            "archiver doctor --create-index (CONCURRENTLY on PostgreSQL)",
        )  # fmt: skip
    built: list[IndexSpec] = []
    for spec in missing:
        try:
            await create_index(engine, spec)
        except (SQLAlchemyError, OSError) as exc:
            error = translate_error(exc, str(engine.url))
            done = f"built {', '.join(s.name for s in built)}; " if built else ""
            return Check(
                "indexes", Status.FAIL, f"{done}building {spec.name} failed: {error.message}",
                error.hint or "run archiver doctor --create-index again",
            )  # fmt: skip
        built.append(spec)
    return Check("indexes", Status.OK, f"built {', '.join(s.name for s in built)} on {names}")


def _clock_check(facts: _Facts, dialect: str, limit: float) -> Check:
    if dialect == "sqlite":
        return Check("clock", Status.OK, "SQLite has no server clock; this host's clock is used")
    skew = facts.skew or 0.0
    detail = f"database clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} this host"
    if abs(skew) <= limit:
        return Check("clock", Status.OK, detail)
    return Check(
        "clock", Status.WARN,
        f"{detail} (more than {limit:.0f} s): the retention cutoff is computed on this host, "
        "end times on the server",
        "synchronise both clocks (NTP)",
    )  # fmt: skip


def _ledger_check(ledger: LedgerStatus | None) -> Check:
    if ledger is None:
        return Check("ledger", Status.OK, "no ledger yet: the first `archiver run` creates it")
    last = f", the last at {ledger.last_committed_at:%Y-%m-%d %H:%M} UTC" if ledger.batches else ""
    return Check(
        "ledger",
        Status.OK,
        f"source id {ledger.source_id}; {ledger.batches} batches committed{last}",
    )


def _storage_checks(options: DoctorOptions, source_id: str | None) -> list[Check]:
    try:
        storage = Storage(options.storage_url, options.storage_options)
        storage.check_reachable()
    except ArchiverError as exc:
        return [Check("storage", Status.FAIL, exc.message, exc.hint)]
    key = f"{DOCTOR_DIR}/{socket.gethostname()}-{secrets.token_hex(4)}.txt"
    payload = f"archiver doctor write test {datetime.now(UTC).isoformat()}\n".encode()
    where = storage.describe()
    try:
        storage.put(key, payload)
        readable = storage.get(key) == payload
        storage.delete(key)
    except StorageError as exc:
        return [Check("storage", Status.FAIL, f"{where} is not writable: {exc.message}", exc.hint)]
    if not readable:
        return [Check("storage", Status.FAIL, f"{where} returned other bytes than were written")]
    checks = [Check("storage", Status.OK, f"{where}: wrote, read back and deleted {key}")]
    checks.append(_pending_check(storage, source_id))
    return checks


def _pending_check(storage: Storage, source_id: str | None) -> Check:
    try:
        markers = [
            PendingMarker.from_json(storage.get(key), key)
            for key in storage.list(PENDING_DIR)
            if key.endswith(".json")
        ]
    except ArchiverError as exc:
        return Check("pending", Status.WARN, f"cannot read the pending markers: {exc.message}")
    ours = [marker for marker in markers if marker.source_id == source_id]
    others = len(markers) - len(ours)
    elsewhere = f"; {others} of other databases sharing this storage" if others else ""
    if not ours:
        return Check("pending", Status.OK, f"no batches of this database left open{elsewhere}")
    return Check(
        "pending", Status.WARN,
        f"{len(ours)} batches left open by a crash (or running now){elsewhere}",
        "run `archiver recover` (every `archiver run` also does this first)",
    )  # fmt: skip
