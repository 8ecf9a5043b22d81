"""Test harness objects and Prefect-shaped run data written with plain SQL.

The rows follow the schema dossier (``/work/shared/prefect-schema.md``, sections 1, 2, 4 and 5):
every FK is respected (SQLite runs with ``PRAGMA foreign_keys=ON``). Values are bound the way
Prefect stores them:

* SQLite: UUIDs as lowercase hyphenated text, timestamps as naive UTC text
  ``'%Y-%m-%d %H:%M:%S.%f'``, intervals as ``1970-01-01 HH:MM:SS.ffffff`` text (epoch plus the
  duration), booleans as 0/1, JSON as text (SQLite's NUMERIC affinity turns a bare JSON number
  into INTEGER/REAL, exactly as it does for Prefect).
* PostgreSQL: aware UTC datetimes, timedeltas, and JSON/enum/uuid values as strings; psycopg
  sends ``str`` with the *unknown* type, so PostgreSQL types them from the target column
  (``jsonb``, ``json``, ``uuid``, the ``state_type`` enum) without casts.

Ids handed back by this module are always ``str``. On PostgreSQL the test-side engine loads
``uuid``, ``json`` and ``jsonb`` columns as text (see :func:`postgres_engine`), so
:meth:`TestDatabase.rows` returns the same Python types for ids and JSON on both dialects
(SQLite may still return an ``int``/``float`` for a JSON document that is a bare number).

Import it as ``from tests import factory`` (``tests`` is a package).
"""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
PG_ADMIN_DSN = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"

SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
_EPOCH_NAIVE = datetime(1970, 1, 1)

#: The tables that hold a run's data (dossier section 2), in restore order.
RUN_TABLES: tuple[str, ...] = (
    "artifact",
    "flow_run",
    "task_run",
    "flow_run_state",
    "task_run_state",
    "flow_run_input",
    "log",
    "task_run_state_cache",
    "artifact_collection",
)

TERMINAL_STATE_TYPES: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
STATE_TYPES: tuple[str, ...] = (
    "SCHEDULED",
    "PENDING",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "CRASHED",
    "PAUSED",
    "CANCELLING",
)
STATE_NAMES: dict[str, str] = {
    "SCHEDULED": "Scheduled",
    "PENDING": "Pending",
    "RUNNING": "Running",
    "COMPLETED": "Completed",
    "FAILED": "Failed",
    "CANCELLED": "Cancelled",
    "CRASHED": "Crashed",
    "PAUSED": "Paused",
    "CANCELLING": "Cancelling",
}

#: Columns whose SQLite declaration is DATETIME but which hold an interval.
INTERVAL_COLUMNS = frozenset({"total_run_time"})

#: Length of the one long log message written for every root flow run.
LONG_LOG_LENGTH = 20_000

DEFAULT_FLOW_NAME = "archiver-factory-flow"

# --------------------------------------------------------------------------------------------
# Value adaptation
# --------------------------------------------------------------------------------------------


def sqlite_time(value: datetime) -> str:
    """Prefect's SQLite text for a timestamp: naive UTC, always six fraction digits."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
    return value.astimezone(UTC).strftime(SQLITE_TIME_FORMAT)


def sqlite_interval(value: timedelta) -> str:
    """Prefect's SQLite text for an interval: the epoch plus the duration."""
    return (_EPOCH_NAIVE + value).strftime(SQLITE_TIME_FORMAT)


def adapt(value: Any, dialect: str) -> Any:
    """Turn a Python value into what Prefect binds for ``dialect``.

    datetimes must be aware; on SQLite they become Prefect's text, timedeltas become
    epoch-plus-duration text and booleans 0/1. UUID objects become lowercase strings.
    """
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
        return sqlite_time(value) if dialect == "sqlite" else value.astimezone(UTC)
    if isinstance(value, timedelta):
        return sqlite_interval(value) if dialect == "sqlite" else value
    if isinstance(value, bool):
        return int(value) if dialect == "sqlite" else value
    return value


def _adapt_params(params: Any, dialect: str) -> Any:
    if params is None:
        return None
    if isinstance(params, Mapping):
        return {key: adapt(value, dialect) for key, value in params.items()}
    return [{key: adapt(value, dialect) for key, value in row.items()} for row in params]


def canonical_json(value: Any) -> str | None:
    """A comparable text for a JSON document as any driver returns it.

    SQL NULL stays ``None``; JSON ``null`` becomes the text ``"null"``. Text is parsed and
    re-dumped with sorted keys and no whitespace, so jsonb's normalisation, SQLite's bare
    numbers (``1`` as an int) and Parquet strings all compare equal.
    """
    if value is None:
        return None
    parsed = json.loads(value) if isinstance(value, str | bytes) else value
    return json.dumps(parsed, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def normalize(kind: str, value: Any) -> Any:
    """Normalise a raw driver value of a column ``kind`` (see :func:`column_kinds`)."""
    if value is None:
        return None
    if kind == "uuid":
        return str(value).lower()
    if kind == "timestamp":
        return _to_utc(value)
    if kind == "interval":
        return _to_interval(value)
    if kind == "json":
        return canonical_json(value)
    if kind == "bool":
        return bool(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return value


def _to_utc(value: Any) -> datetime:
    if not isinstance(value, datetime):
        value = datetime.fromisoformat(str(value))
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _to_interval(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):  # SQLite server default '0' (NUMERIC affinity)
        return timedelta(seconds=value)
    textual = str(value)
    try:
        return timedelta(seconds=float(textual))
    except ValueError:
        return datetime.fromisoformat(textual).replace(tzinfo=None) - _EPOCH_NAIVE


# --------------------------------------------------------------------------------------------
# Engines and the TestDatabase handle
# --------------------------------------------------------------------------------------------


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
    test side. The SQL helpers adapt parameters with :func:`adapt`, so tests may pass aware
    datetimes, timedeltas, bools and UUIDs on both dialects.
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

    def adapt(self, value: Any) -> Any:
        return adapt(value, self.dialect)

    def execute(self, sql: str, params: Any = None) -> int:
        """Run one statement (executemany if ``params`` is a list) and commit; the rowcount."""
        with self.engine.begin() as connection:
            result = connection.execute(text(sql), _adapt_params(params, self.dialect))
            return int(result.rowcount)

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        with self.engine.connect() as connection:
            return connection.execute(text(sql), _adapt_params(params, self.dialect)).scalar()

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            result = connection.execute(text(sql), _adapt_params(params, self.dialect))
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


# --------------------------------------------------------------------------------------------
# Storage handle (local folder or S3 on moto)
# --------------------------------------------------------------------------------------------


_AIOBOTOCORE_SESSION: Any = None


def _aiobotocore_session() -> Any:
    global _AIOBOTOCORE_SESSION
    if _AIOBOTOCORE_SESSION is None:
        from aiobotocore.session import AioSession

        _AIOBOTOCORE_SESSION = AioSession()
    return _AIOBOTOCORE_SESSION


class TestStorage:
    """An archive root for one test: ``url`` and ``options`` are what the archiver gets."""

    __test__ = False  # not a pytest test class

    def __init__(
        self, kind: str, url: str, options: dict[str, Any], endpoint_url: str | None = None
    ) -> None:
        self.kind = kind
        self.url = url
        self.options = options
        self.endpoint_url = endpoint_url
        self._clients: list[Any] = []

    @property
    def protocol(self) -> str:
        return "s3" if self.kind == "s3" else "file"

    @property
    def root(self) -> str:
        """The root as an fsspec path of :meth:`fs` (no ``s3://``)."""
        return self.url.removeprefix("s3://").rstrip("/")

    @property
    def root_path(self) -> str:
        """Alias of :attr:`root`."""
        return self.root

    @property
    def bucket(self) -> str | None:
        return self.root.split("/", 1)[0] if self.kind == "s3" else None

    def fs(self) -> Any:
        """A fresh filesystem: no instance cache, and on S3 no listings cache.

        On S3 each call makes a new S3FileSystem with its own client and connections; only the
        aiobotocore session (botocore's parsed service models, no connection or listing
        state) is shared, which takes a fresh filesystem's first call from ~0.2 s to ~0.04 s.
        """
        import fsspec

        if self.kind == "s3":
            return fsspec.filesystem(
                "s3",
                skip_instance_cache=True,
                use_listings_cache=False,
                session=_aiobotocore_session(),
                **self.options,
            )
        return fsspec.filesystem("file", skip_instance_cache=True, **self.options)

    def list_files(self, suffix: str = ".parquet") -> list[str]:
        """Every file under the root ending in ``suffix``, as full fsspec paths, sorted."""
        fs = self.fs()
        if not fs.exists(self.root):
            return []
        return sorted(str(p) for p in fs.find(self.root) if str(p).endswith(suffix))

    def keys(self, suffix: str = "") -> list[str]:
        """Like :meth:`list_files` but relative to the root (the archiver's keys)."""
        prefix = self.root + "/"
        return [p.removeprefix(prefix) for p in self.list_files(suffix)]

    def read_bytes(self, key: str) -> bytes:
        data: bytes = self.fs().cat_file(f"{self.root}/{key}")
        return data

    def write_bytes(self, key: str, data: bytes) -> None:
        fs = self.fs()
        path = f"{self.root}/{key}"
        if self.kind == "local":
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)

    def break_writes(self) -> None:
        """Make every later write under the root fail for real (no mock).

        S3: every object and then the bucket itself are deleted, so a PUT gets NoSuchBucket.
        Local: the root folder is moved aside (to ``<root>.broken``) and a plain file takes its
        place, so creating folders or files below it fails with an OSError even as root.
        """
        if self.kind == "s3":
            client = self.boto_client()
            bucket = self.bucket
            paginator = client.get_paginator("list_object_versions")
            for page in paginator.paginate(Bucket=bucket):
                doomed = [
                    {"Key": item["Key"], "VersionId": item["VersionId"]}
                    for item in page.get("Versions", []) + page.get("DeleteMarkers", [])
                ]
                if doomed:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": doomed})
            client.delete_bucket(Bucket=bucket)
            return
        root = Path(self.root)
        if root.exists():
            root.rename(root.with_name(root.name + ".broken"))
        root.parent.mkdir(parents=True, exist_ok=True)
        root.write_bytes(b"not a folder: writes below this path must fail\n")

    def boto_client(self) -> Any:
        """A boto3 S3 client on the moto endpoint (closed when the test ends)."""
        if self.kind != "s3":
            raise TypeError("boto_client() is only available for s3 storage")
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        self._clients.append(client)
        return client

    def close(self) -> None:
        while self._clients:
            self._clients.pop().close()

    def __repr__(self) -> str:
        return f"TestStorage({self.kind!r}, {self.url!r})"


# --------------------------------------------------------------------------------------------
# Ids and realistic values
# --------------------------------------------------------------------------------------------


def uuid4() -> str:
    return str(uuid.uuid4())


def uuid7(at: datetime) -> str:
    """A UUIDv7-shaped id for ``at`` (Prefect's state, log and client task-run ids)."""
    milliseconds = int(at.timestamp() * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = (rand >> 62) & 0xFFF
    rand_b = rand & ((1 << 62) - 1)
    value = (milliseconds << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


_ADJECTIVES = ("crimson", "amber", "silent", "brave", "lucid", "witty", "mellow", "rapid")
_ANIMALS = ("otter", "heron", "lynx", "marmot", "ibis", "gecko", "tapir", "quokka")


def _slug() -> str:
    return f"{random.choice(_ADJECTIVES)}-{random.choice(_ANIMALS)}-{random.randrange(10**6)}"


def _parameters(index: int) -> str:
    return _dumps(
        {
            "run_index": index,
            "city": "Zürich",
            "greeting": "こんにちは 🦆",
            "nested": {
                "list": [1, 2.5, None, True, "x"],
                "deep": {"empty": {}, "quote": 'say "hi"\n\ttab'},
            },
            "ratio": 0.1,
        }
    )


def _empirical_policy_flow() -> str:
    return _dumps(
        {
            "max_retries": 0,
            "retry_delay_seconds": 0.0,
            "retries": 0,
            "retry_delay": 0,
            "pause_keys": [],
            "resuming": False,
            "retry_type": None,
        }
    )


def _empirical_policy_task() -> str:
    return _dumps(
        {
            "max_retries": 0,
            "retry_delay_seconds": 0.0,
            "retries": 0,
            "retry_delay": 0,
            "retry_jitter_factor": None,
        }
    )


def _state_details(
    *,
    flow_run_id: str | None,
    task_run_id: str | None = None,
    child_flow_run_id: str | None = None,
    scheduled_time: datetime | None = None,
    cache_key: str | None = None,
    cache_expiration: datetime | None = None,
) -> str:
    return _dumps(
        {
            "flow_run_id": flow_run_id,
            "task_run_id": task_run_id,
            "child_flow_run_id": child_flow_run_id,
            "scheduled_time": scheduled_time.isoformat() if scheduled_time else None,
            "cache_key": cache_key,
            "cache_expiration": cache_expiration.isoformat() if cache_expiration else None,
            "deferred": False,
            "untrackable_result": False,
            "pause_timeout": None,
            "pause_reschedule": False,
            "pause_key": None,
            "run_input_keyset": None,
            "refresh_cache": None,
            "retriable": None,
            "transition_id": uuid4(),
            "task_parameters_id": None,
            "traceparent": None,
            "deployment_concurrency_lease_id": None,
        }
    )


def _result_reference() -> str:
    return _dumps(
        {
            "storage_key": f"/root/.prefect/storage/{uuid.uuid4().hex}",
            "expiration": None,
            "serializer": {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None},
            "storage_block_id": None,
            "prefect_version": "3.9.1",
        }
    )


_STATE_MESSAGES: dict[str, str | None] = {
    "COMPLETED": "All states completed.",
    "FAILED": "Flow run encountered an exception: ValueError('ünïcode ✗ \"boom\"')",
    "CANCELLED": "Cancelled by the user ✋",
    "CRASHED": "Execution was interrupted by an unexpected exception: SIGTERM",
}

# Variants for artifacts after the first (result) artifact of a flow run:
# (type, data as JSON text or None for SQL NULL, metadata_ JSON text or None, description)
_ARTIFACT_VARIANTS: tuple[tuple[str, str | None, str | None, str | None], ...] = (
    ("progress", "1", _dumps({"unit": "percent"}), "bare JSON number: SQLite stores INTEGER"),
    ("markdown", "null", None, None),  # JSON null data, SQL NULL metadata_
    (
        "table",
        _dumps([{"city": "Zürich", "n": 1}, {"city": "東京", "n": 2.5, "ok": None}]),
        _dumps({}),
        "a table ✓",
    ),
    ("markdown", _dumps('# Report\n\nünïcode ✓ "quoted"'), _dumps({"k": "v"}), "markdown"),
    ("progress", "0.25", "null", "bare JSON float: SQLite stores REAL"),
    ("link", _dumps("https://example.com/ü?x=1&y=2"), None, None),
)


def _long_message(run_id: str) -> str:
    head = f"Long log for {run_id}: ünïcode ✓ 🦆 "
    body = "0123456789abcdef" * (LONG_LOG_LENGTH // 16 + 1)
    return (head + body)[:LONG_LOG_LENGTH]


# --------------------------------------------------------------------------------------------
# Timelines
# --------------------------------------------------------------------------------------------


def _prefix(count: int) -> list[tuple[str, str]]:
    """``count`` states that lead up to a final state (ending in RUNNING when possible)."""
    if count <= 0:
        return []
    base = [("SCHEDULED", "Scheduled"), ("PENDING", "Pending"), ("RUNNING", "Running")]
    if count <= 3:
        return base[3 - count :]
    extra = count - 3
    seq = [base[0]] + ([("SCHEDULED", "Late")] if extra % 2 else []) + base[1:]
    seq += [("SCHEDULED", "AwaitingRetry"), ("RUNNING", "Retrying")] * (extra // 2)
    return seq


@dataclass
class _Timeline:
    states: list[tuple[str, str, datetime]]  # (type, name, timestamp), oldest first

    @property
    def final_type(self) -> str:
        return self.states[-1][0]

    @property
    def final_name(self) -> str:
        return self.states[-1][1]

    @property
    def final_time(self) -> datetime:
        return self.states[-1][2]

    @property
    def first_time(self) -> datetime:
        return self.states[0][2]

    @property
    def terminal(self) -> bool:
        return self.final_type in TERMINAL_STATE_TYPES

    @property
    def run_count(self) -> int:
        return sum(1 for state in self.states if state[0] == "RUNNING")

    @property
    def start_time(self) -> datetime | None:
        for state_type, _name, at in self.states:
            if state_type == "RUNNING":
                return at
        return self.final_time if self.terminal else None

    @property
    def total_run_time(self) -> timedelta:
        total = timedelta(0)
        for (state_type, _n, at), (_t, _n2, after) in zip(
            self.states, self.states[1:], strict=False
        ):
            if state_type == "RUNNING":
                total += after - at
        return total


def _timeline(count: int, final_type: str, anchor: datetime, step: timedelta) -> _Timeline:
    count = max(1, count)
    if final_type in TERMINAL_STATE_TYPES:
        seq = [*_prefix(count - 1), (final_type, STATE_NAMES[final_type])]
    else:
        name = "Late" if final_type == "SCHEDULED" and count > 1 else STATE_NAMES[final_type]
        seq = [*_prefix(count)[: count - 1], (final_type, name)]
    times = [anchor - step * (count - 1 - i) for i in range(count)]
    if count > 1:  # the first state lands on a whole second: microsecond 0 is exercised
        times[0] = times[0].replace(microsecond=0)
    return _Timeline([(t, n, at) for (t, n), at in zip(seq, times, strict=True)])


# --------------------------------------------------------------------------------------------
# Trees
# --------------------------------------------------------------------------------------------


@dataclass
class Tree:
    """Ids (as lowercase strings) of every row one :func:`make_tree` call wrote."""

    root_id: str
    end_time: datetime | None
    flow_run_ids: list[str] = field(default_factory=list)  # root first, then deeper subflows
    task_run_ids: list[str] = field(default_factory=list)
    parent_task_run_ids: list[str] = field(default_factory=list)  # subflow links (subset)
    flow_run_state_ids: list[str] = field(default_factory=list)
    task_run_state_ids: list[str] = field(default_factory=list)
    log_ids: list[str] = field(default_factory=list)
    artifact_ids: list[str] = field(default_factory=list)
    flow_run_input_ids: list[str] = field(default_factory=list)
    task_run_state_cache_ids: list[str] = field(default_factory=list)
    artifact_collection_ids: list[str] = field(default_factory=list)
    keyed_artifact_id: str | None = None

    @property
    def subflow_ids(self) -> list[str]:
        return self.flow_run_ids[1:]

    def rows_by_table(self) -> dict[str, set[str]]:
        """Table -> ids. ``artifact_collection`` holds the rows whose ``latest_id`` was one of
        this tree's artifacts when the tree was written (a later tree with the same key takes
        the row over)."""
        return {
            "flow_run": set(self.flow_run_ids),
            "task_run": set(self.task_run_ids),
            "flow_run_state": set(self.flow_run_state_ids),
            "task_run_state": set(self.task_run_state_ids),
            "flow_run_input": set(self.flow_run_input_ids),
            "log": set(self.log_ids),
            "artifact": set(self.artifact_ids),
            "artifact_collection": set(self.artifact_collection_ids),
            "task_run_state_cache": set(self.task_run_state_cache_ids),
        }

    def counts(self) -> dict[str, int]:
        return {table: len(ids) for table, ids in self.rows_by_table().items()}


@dataclass
class _Batch:
    rows: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {table: [] for table in RUN_TABLES}
    )
    links: list[dict[str, Any]] = field(default_factory=list)  # flow_run state/parent update
    collections: list[dict[str, Any]] = field(default_factory=list)  # upserts, in order

    def add(self, table: str, row: dict[str, Any]) -> None:
        self.rows[table].append(row)

    def update(self, table: str, row_id: str, **changes: Any) -> None:
        for row in reversed(self.rows[table]):
            if row["id"] == row_id:
                row.update(changes)
                return
        raise KeyError(f"{table} {row_id} not in batch")


def _task_final_types(count: int, flow_type: str) -> list[str]:
    finals = ["COMPLETED"] * count
    if count:
        if flow_type in ("FAILED", "CANCELLED", "CRASHED"):
            finals[-1] = flow_type
        elif flow_type not in TERMINAL_STATE_TYPES:
            finals[-1] = "RUNNING"
    return finals


_FLOW_STEP = timedelta(seconds=7, microseconds=123_457)
_TASK_STEP = timedelta(seconds=1, microseconds=250_003)


def _add_run_states(
    batch: _Batch,
    tree: Tree,
    table: str,
    parent_column: str,
    parent_id: str,
    timeline: _Timeline,
    *,
    flow_run_id: str,
    task_run_id: str | None = None,
    child_flow_run_id: str | None = None,
    final_data: str | None = None,
    final_result_artifact_id: str | None = None,
    cache_key: str | None = None,
    cache_expiration: datetime | None = None,
) -> list[str]:
    ids: list[str] = []
    last = len(timeline.states) - 1
    for index, (state_type, name, at) in enumerate(timeline.states):
        state_id = uuid7(at)
        ids.append(state_id)
        is_final = index == last
        batch.add(
            table,
            {
                "id": state_id,
                "created": at + timedelta(microseconds=731),
                "updated": at + timedelta(microseconds=731),
                "type": state_type,
                "timestamp": at,
                "name": name,
                "message": _STATE_MESSAGES.get(state_type) if is_final else None,
                "state_details": _state_details(
                    flow_run_id=flow_run_id,
                    task_run_id=task_run_id,
                    child_flow_run_id=child_flow_run_id,
                    scheduled_time=at if state_type == "SCHEDULED" else None,
                    cache_key=cache_key if is_final else None,
                    cache_expiration=cache_expiration if is_final else None,
                ),
                "data": final_data if is_final else None,
                parent_column: parent_id,
                "result_artifact_id": final_result_artifact_id if is_final else None,
            },
        )
    (tree.flow_run_state_ids if table == "flow_run_state" else tree.task_run_state_ids).extend(ids)
    return ids


def _add_task_run(
    batch: _Batch,
    tree: Tree,
    *,
    flow_run_id: str,
    name: str,
    task_key: str,
    dynamic_key: str,
    timeline: _Timeline,
    task_inputs: str,
    child_flow_run_id: str | None = None,
    final_data: str | None = None,
    final_result_artifact_id: str | None = None,
    cache: bool = False,
) -> tuple[str, list[str], str | None]:
    task_run_id = uuid7(timeline.first_time)
    cache_key = f"cache-{task_key}-{uuid.uuid4().hex[:12]}" if cache else None
    cache_expiration = timeline.final_time + timedelta(days=1) if cache else None
    state_ids = _add_run_states(
        batch,
        tree,
        "task_run_state",
        "task_run_id",
        task_run_id,
        timeline,
        flow_run_id=flow_run_id,
        task_run_id=task_run_id,
        child_flow_run_id=child_flow_run_id,
        final_data=final_data,
        final_result_artifact_id=final_result_artifact_id,
        cache_key=cache_key,
        cache_expiration=cache_expiration,
    )
    batch.add(
        "task_run",
        {
            "id": task_run_id,
            "created": timeline.first_time - timedelta(microseconds=1_001),
            "updated": timeline.final_time + timedelta(microseconds=2_002),
            "name": name,
            "state_type": timeline.final_type,
            "run_count": timeline.run_count,
            "expected_start_time": timeline.first_time,
            "next_scheduled_start_time": None,
            "start_time": timeline.start_time,
            "end_time": timeline.final_time if timeline.terminal else None,
            "total_run_time": timeline.total_run_time,
            "task_key": task_key,
            "dynamic_key": dynamic_key,
            "cache_key": cache_key,
            "cache_expiration": cache_expiration,
            "task_version": "1.2.3",
            "empirical_policy": _empirical_policy_task(),
            "task_inputs": task_inputs,
            "tags": _dumps(["etl", "ünïcode"]),
            "flow_run_id": flow_run_id,
            "state_id": state_ids[-1],
            "state_name": timeline.final_name,
            "state_timestamp": timeline.final_time,
            "flow_run_run_count": 1,
            "labels": _dumps({"prefect.flow-run.id": flow_run_id}),
        },
    )
    tree.task_run_ids.append(task_run_id)
    return task_run_id, state_ids, cache_key


def _add_artifact(
    batch: _Batch,
    tree: Tree | None,
    *,
    at: datetime,
    flow_run_id: str | None,
    task_run_id: str | None,
    key: str | None,
    artifact_type: str | None,
    data: str | None,
    metadata: str | None,
    description: str | None,
) -> str:
    artifact_id = uuid4()
    batch.add(
        "artifact",
        {
            "id": artifact_id,
            "created": at,
            "updated": at,
            "key": key,
            "type": artifact_type,
            "data": data,
            "metadata_": metadata,
            "task_run_id": task_run_id,
            "flow_run_id": flow_run_id,
            "description": description,
        },
    )
    if tree is not None:
        tree.artifact_ids.append(artifact_id)
    if key is not None:
        batch.collections.append(
            {
                "id": uuid4(),
                "created": at,
                "updated": at,
                "key": key,
                "latest_id": artifact_id,
                "task_run_id": task_run_id,
                "flow_run_id": flow_run_id,
                "type": artifact_type,
                "data": data,
                "description": description,
                "metadata_": metadata,
            }
        )
    return artifact_id


@dataclass
class _Level:
    flow_run_id: str
    timeline: _Timeline
    end_time: datetime | None


def _build_tree(
    batch: _Batch,
    *,
    index: int,
    flow_id: str,
    end_time: datetime | None,
    state_type: str,
    task_runs: int,
    states_per_run: int,
    logs_per_run: int,
    artifacts: int,
    keyed_artifact_key: str | None,
    inputs: int,
    subflow_depth: int,
    subflow_state_type: str,
    deployment_id: str | None,
    task_run_state_cache: bool,
    now: datetime,
) -> Tree:
    if end_time is not None and end_time.tzinfo is None:
        raise ValueError("end_time must be an aware (UTC) datetime")
    if state_type not in STATE_TYPES or subflow_state_type not in STATE_TYPES:
        raise ValueError(f"unknown state type {state_type!r} / {subflow_state_type!r}")
    root_type = state_type
    if end_time is None and root_type in TERMINAL_STATE_TYPES:
        root_type = "RUNNING"  # no end time: the run is not terminal
    anchor = end_time if end_time is not None else now

    levels: list[_Level] = []
    for level in range(subflow_depth + 1):
        if level == 0:
            level_type, level_anchor = root_type, anchor
            level_end = end_time
        else:
            level_type = subflow_state_type if level == subflow_depth else "COMPLETED"
            level_anchor = anchor - timedelta(seconds=1, microseconds=250_001) * level
            level_end = level_anchor if level_type in TERMINAL_STATE_TYPES else None
        timeline = _timeline(states_per_run, level_type, level_anchor, _FLOW_STEP)
        levels.append(_Level(uuid4(), timeline, level_end))

    tree = Tree(root_id=levels[0].flow_run_id, end_time=end_time)
    parent_task_for: dict[int, str] = {}  # level -> parent task run id (in level - 1)
    root_first_task: str | None = None

    for level, current in enumerate(levels):
        run_id = current.flow_run_id
        timeline = current.timeline
        tree.flow_run_ids.append(run_id)
        run_name = _slug()

        # Artifacts of this flow run (index 0 is the result artifact).
        artifact_ids: list[str] = []
        for position in range(artifacts):
            if position == 0:
                artifact_ids.append(
                    _add_artifact(
                        batch,
                        tree,
                        at=timeline.final_time,
                        flow_run_id=run_id,
                        task_run_id=None,
                        key=None,
                        artifact_type="result",
                        data=_result_reference(),
                        metadata="null",  # Prefect passes None: sa_JSON stores JSON null
                        description=None,
                    )
                )
                continue
            kind, data, metadata, description = _ARTIFACT_VARIANTS[
                (position - 1) % len(_ARTIFACT_VARIANTS)
            ]
            artifact_ids.append(
                _add_artifact(
                    batch,
                    tree,
                    at=timeline.final_time - timedelta(milliseconds=5 * position),
                    flow_run_id=run_id,
                    task_run_id=None,  # set below for the first one if a task exists
                    key=None,
                    artifact_type=kind,
                    data=data,
                    metadata=metadata,
                    description=description,
                )
            )
        result_artifact_id = artifact_ids[0] if artifact_ids and timeline.terminal else None

        _add_run_states(
            batch,
            tree,
            "flow_run_state",
            "flow_run_id",
            run_id,
            timeline,
            flow_run_id=run_id,
            final_result_artifact_id=result_artifact_id,
        )
        state_id = tree.flow_run_state_ids[-1]

        first_state_type = timeline.states[0][0]
        expected_start = (
            timeline.first_time
            if first_state_type == "SCHEDULED"
            else timeline.first_time.replace(microsecond=0)
        )
        is_root = level == 0
        run_deployment = deployment_id if is_root else None
        labels: dict[str, Any] = {"prefect.flow.id": flow_id}
        if run_deployment:
            labels["prefect.deployment.id"] = run_deployment
        batch.add(
            "flow_run",
            {
                "id": run_id,
                "created": timeline.first_time - timedelta(microseconds=250_000),
                "updated": timeline.final_time + timedelta(microseconds=3_003),
                "name": run_name,
                "state_type": timeline.final_type,
                "run_count": timeline.run_count,
                "expected_start_time": expected_start,
                "next_scheduled_start_time": (
                    expected_start if timeline.final_type == "SCHEDULED" else None
                ),
                "start_time": timeline.start_time,
                "end_time": current.end_time,
                "total_run_time": timeline.total_run_time,
                "flow_version": "0f3a9c1e5b7d",
                "parameters": _parameters(index),
                "idempotency_key": (
                    f"scheduled {run_deployment} {run_id}" if run_deployment else None
                ),
                "context": _dumps({}),
                "empirical_policy": _empirical_policy_flow(),
                "tags": _dumps(["nightly", "ünïcode"]),
                "auto_scheduled": bool(run_deployment),
                "flow_id": flow_id,
                "deployment_id": run_deployment,
                "parent_task_run_id": None,  # linked after the task runs exist
                "state_id": None,  # linked after the states exist
                "state_name": timeline.final_name,
                "infrastructure_document_id": None,
                "work_queue_name": "default" if run_deployment else None,
                "state_timestamp": timeline.final_time,
                "created_by": (
                    _dumps({"id": run_deployment, "type": "DEPLOYMENT", "display_value": "nightly"})
                    if run_deployment
                    else None
                ),
                "infrastructure_pid": f"{run_id[:8]}:4242" if run_deployment else None,
                "work_queue_id": None,
                "job_variables": _dumps({"env": {"LANG": "C.UTF-8"}}),
                "deployment_version": None,
                "labels": _dumps(labels),
            },
        )
        batch.links.append(
            {"id": run_id, "state_id": state_id, "parent_task_run_id": parent_task_for.get(level)}
        )

        # Ordinary task runs, with their states and logs.
        finals = _task_final_types(task_runs, timeline.final_type)
        previous: str | None = None
        ordinary: list[tuple[str, list[str], str | None]] = []
        for number, final in enumerate(finals):
            task_anchor = timeline.final_time - timedelta(microseconds=500_011 * (number + 1))
            task_timeline = _timeline(states_per_run, final, task_anchor, _TASK_STEP)
            inputs_json = _dumps(
                {
                    "x": [],
                    "__parents__": [],
                    "wait_for": [{"input_type": "task_run", "id": previous}] if previous else [],
                }
            )
            task = _add_task_run(
                batch,
                tree,
                flow_run_id=run_id,
                name=f"extract-{number}",
                task_key=f"extract-{number:04d}-7c1e",
                dynamic_key=str(number),
                timeline=task_timeline,
                task_inputs=inputs_json,
                final_data=_result_reference() if final == "COMPLETED" else None,
                cache=task_run_state_cache,
            )
            ordinary.append(task)
            previous = task[0]
            for log_number in range(logs_per_run):
                at = task_timeline.final_time - timedelta(microseconds=1_234 * (log_number + 1))
                if log_number == 0:
                    at = at.replace(microsecond=0)
                log_id = uuid7(at)
                batch.add(
                    "log",
                    {
                        "id": log_id,
                        "created": at + timedelta(milliseconds=40),
                        "updated": at + timedelta(milliseconds=40),
                        "name": "prefect.task_runs",
                        "level": (20, 30, 40, 10)[log_number % 4],
                        "flow_run_id": run_id,
                        "task_run_id": task[0],
                        "message": f"Task extract-{number}: step {log_number} ✓ ünïcode",
                        "timestamp": at,
                    },
                )
                tree.log_ids.append(log_id)

        # An artifact created by a task inside the flow carries both ids.
        if len(artifact_ids) > 1 and ordinary:
            batch.update("artifact", artifact_ids[1], task_run_id=ordinary[0][0])
        if is_root and ordinary:
            root_first_task = ordinary[0][0]

        # The cache rows of the legacy server-side cache point at the final task states.
        if task_run_state_cache:
            for _task_id, state_ids, cache_key in ordinary:
                cache_id = uuid4()
                final_at = timeline.final_time
                batch.add(
                    "task_run_state_cache",
                    {
                        "id": cache_id,
                        "created": final_at,
                        "updated": final_at,
                        "cache_key": cache_key,
                        "cache_expiration": final_at + timedelta(days=1),
                        "task_run_state_id": state_ids[-1],
                    },
                )
                tree.task_run_state_cache_ids.append(cache_id)

        # Flow-level logs (task_run_id NULL); the root's first one is long.
        for log_number in range(logs_per_run):
            at = timeline.final_time - timedelta(microseconds=333_337 * (log_number + 1))
            if log_number == 1:
                at = at.replace(microsecond=0)
            log_id = uuid7(at)
            message = (
                _long_message(run_id)
                if is_root and log_number == 0
                else f"Flow run {run_name!r}: step {log_number} — ünïcode ✓ 🦆"
            )
            batch.add(
                "log",
                {
                    "id": log_id,
                    "created": at + timedelta(milliseconds=40),
                    "updated": at + timedelta(milliseconds=40),
                    "name": "prefect.flow_runs",
                    "level": (20, 40, 30, 10)[log_number % 4],
                    "flow_run_id": run_id,
                    "task_run_id": None,
                    "message": message,
                    "timestamp": at,
                },
            )
            tree.log_ids.append(log_id)

        # Inputs for paused runs / send_input.
        for number in range(inputs):
            input_id = uuid4()
            at = timeline.final_time - timedelta(milliseconds=100 * (number + 1))
            batch.add(
                "flow_run_input",
                {
                    "id": input_id,
                    "created": at,
                    "updated": at,
                    "key": f"paused-{number + 1}-response",
                    "value": _dumps({"approved": True, "comment": "Looks good ✓", "n": number}),
                    "flow_run_id": run_id,
                    "sender": f"prefect.flow-run.{uuid4()}" if number % 2 else None,
                },
            )
            tree.flow_run_input_ids.append(input_id)

        # The parent task run of the next level's subflow mirrors that subflow's states.
        if level < subflow_depth:
            child = levels[level + 1]
            copy_artifact = None
            if child.timeline.terminal and artifacts >= 1:
                copy_artifact = _add_artifact(
                    batch,
                    tree,
                    at=child.timeline.final_time,
                    flow_run_id=run_id,
                    task_run_id=None,
                    key=None,
                    artifact_type="result",
                    data=_result_reference(),
                    metadata="null",
                    description=None,
                )
            parent_task_id, _states, _key = _add_task_run(
                batch,
                tree,
                flow_run_id=run_id,
                name=f"subflow-{level + 1}",
                task_key=f"subflow-{level + 1}-0a9b",
                dynamic_key="0",
                timeline=child.timeline,
                task_inputs=_dumps({"__parents__": [], "wait_for": []}),
                child_flow_run_id=child.flow_run_id,
                final_result_artifact_id=copy_artifact,
            )
            if copy_artifact is not None:
                batch.update("artifact", copy_artifact, task_run_id=parent_task_id)
            tree.parent_task_run_ids.append(parent_task_id)
            parent_task_for[level + 1] = parent_task_id

    # A keyed artifact on the root (extra, not counted in ``artifacts``): the newest of its key.
    if keyed_artifact_key is not None:
        root = levels[0]
        tree.keyed_artifact_id = _add_artifact(
            batch,
            tree,
            at=root.timeline.final_time + timedelta(microseconds=17),
            flow_run_id=root.flow_run_id,
            task_run_id=root_first_task,
            key=keyed_artifact_key,
            artifact_type="markdown",
            data=_dumps(f"# {keyed_artifact_key}\n\nlatest ✓"),
            metadata=_dumps({"owner": "ünïcode"}),
            description="keyed artifact",
        )
    return tree


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _quote(column: str) -> str:
    return f'"{column}"'


def _insert(connection: Connection, dialect: str, table: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    sql = (
        f"INSERT INTO {table} ({', '.join(_quote(c) for c in columns)}) "
        f"VALUES ({', '.join(':' + c for c in columns)})"
    )
    connection.execute(text(sql), [{c: adapt(row[c], dialect) for c in columns} for row in rows])


_COLLECTION_UPSERT = """
INSERT INTO artifact_collection
    (id, created, updated, "key", latest_id, task_run_id, flow_run_id, type, data,
     description, metadata_)
VALUES (:id, :created, :updated, :key, :latest_id, :task_run_id, :flow_run_id, :type, :data,
        :description, :metadata_)
ON CONFLICT ("key") DO UPDATE SET
    updated = excluded.updated, latest_id = excluded.latest_id,
    task_run_id = excluded.task_run_id, flow_run_id = excluded.flow_run_id,
    type = excluded.type, data = excluded.data, description = excluded.description,
    metadata_ = excluded.metadata_
"""


def _write(connection: Connection, dialect: str, batch: _Batch) -> dict[str, str]:
    """Insert a batch in FK order; return ``latest_id -> collection id`` for touched keys."""
    for table in ("artifact", "flow_run", "task_run", "flow_run_state", "task_run_state"):
        _insert(connection, dialect, table, batch.rows[table])
    if batch.links:
        connection.execute(
            text(
                "UPDATE flow_run SET state_id = :state_id, parent_task_run_id = :parent_task_run_id"
                " WHERE id = :id"
            ),
            batch.links,
        )
    for table in ("flow_run_input", "log", "task_run_state_cache"):
        _insert(connection, dialect, table, batch.rows[table])
    if not batch.collections:
        return {}
    for row in batch.collections:  # one at a time: later rows of the same key must win
        connection.execute(text(_COLLECTION_UPSERT), {c: adapt(v, dialect) for c, v in row.items()})
    keys = sorted({row["key"] for row in batch.collections})
    result = connection.execute(
        text('SELECT id, latest_id FROM artifact_collection WHERE "key" IN :keys').bindparams(
            sa.bindparam("keys", expanding=True)
        ),
        {"keys": keys},
    )
    return {str(latest).lower(): str(row_id).lower() for row_id, latest in result}


def _default_flow(connection: Connection, dialect: str) -> str:
    found = connection.execute(
        text("SELECT id FROM flow WHERE name = :name"), {"name": DEFAULT_FLOW_NAME}
    ).scalar()
    if found is not None:
        return str(found).lower()
    return _insert_flow(connection, dialect, DEFAULT_FLOW_NAME)


def _insert_flow(connection: Connection, dialect: str, name: str) -> str:
    flow_id = uuid4()
    at = datetime.now(UTC)
    _insert(
        connection,
        dialect,
        "flow",
        [
            {
                "id": flow_id,
                "created": at,
                "updated": at,
                "name": name,
                "tags": _dumps(["ünïcode"]),
                "labels": None,
            }
        ],
    )
    return flow_id


def make_flow(db: TestDatabase, name: str | None = None) -> str:
    """Insert a ``flow`` row (names are unique); return its id."""
    with db.engine.begin() as connection:
        return _insert_flow(connection, db.dialect, name or f"flow-{uuid.uuid4().hex[:12]}")


def make_deployment(db: TestDatabase, flow_id: str, name: str | None = None) -> str:
    """Insert a ``deployment`` row for ``flow_id``; return its id."""
    deployment_id = uuid4()
    at = datetime.now(UTC)
    with db.engine.begin() as connection:
        _insert(
            connection,
            db.dialect,
            "deployment",
            [
                {
                    "id": deployment_id,
                    "created": at,
                    "updated": at,
                    "name": name or f"deployment-{uuid.uuid4().hex[:12]}",
                    "flow_id": flow_id,
                    "tags": _dumps(["nightly"]),
                    "parameters": _dumps({"city": "Zürich"}),
                    "work_queue_name": "default",
                    "entrypoint": "flows.py:nightly",
                    "version": "1",
                }
            ],
        )
    return deployment_id


def make_trees(
    db: TestDatabase,
    count: int,
    *,
    flow_id: str | None = None,
    end_time: datetime | Sequence[datetime | None] | None,
    state_type: str = "COMPLETED",
    task_runs: int = 2,
    states_per_run: int = 3,
    logs_per_run: int = 2,
    artifacts: int = 1,
    keyed_artifact_key: str | None = None,
    inputs: int = 1,
    subflow_depth: int = 0,
    subflow_state_type: str = "COMPLETED",
    deployment_id: str | None = None,
    task_run_state_cache: bool = False,
) -> list[Tree]:
    """``count`` trees in one transaction, one executemany per table (fast).

    ``end_time`` is one value for all trees or a sequence of ``count`` values.
    Other arguments as for :func:`make_tree`.
    """
    if isinstance(end_time, datetime) or end_time is None:
        end_times: list[datetime | None] = [end_time] * count
    else:
        end_times = list(end_time)
        if len(end_times) != count:
            raise ValueError(f"{len(end_times)} end times for {count} trees")
    now = datetime.now(UTC)
    batch = _Batch()
    with db.engine.begin() as connection:
        flow = flow_id or _default_flow(connection, db.dialect)
        trees = [
            _build_tree(
                batch,
                index=index,
                flow_id=flow,
                end_time=end_times[index],
                state_type=state_type,
                task_runs=task_runs,
                states_per_run=states_per_run,
                logs_per_run=logs_per_run,
                artifacts=artifacts,
                keyed_artifact_key=keyed_artifact_key,
                inputs=inputs,
                subflow_depth=subflow_depth,
                subflow_state_type=subflow_state_type,
                deployment_id=deployment_id,
                task_run_state_cache=task_run_state_cache,
                now=now,
            )
            for index in range(count)
        ]
        collections = _write(connection, db.dialect, batch)
    for tree in trees:
        for artifact_id in tree.artifact_ids:
            if artifact_id in collections:
                tree.artifact_collection_ids.append(collections[artifact_id])
    return trees


def make_tree(
    db: TestDatabase,
    *,
    flow_id: str | None = None,
    end_time: datetime | None,
    state_type: str = "COMPLETED",
    task_runs: int = 2,
    states_per_run: int = 3,
    logs_per_run: int = 2,
    artifacts: int = 1,
    keyed_artifact_key: str | None = None,
    inputs: int = 1,
    subflow_depth: int = 0,
    subflow_state_type: str = "COMPLETED",
    deployment_id: str | None = None,
    task_run_state_cache: bool = False,
) -> Tree:
    """One root flow run and ``subflow_depth`` nested subflows, as Prefect would store them.

    Every flow run in the tree (root and each subflow) gets ``states_per_run`` states,
    ``task_runs`` task runs (each with ``states_per_run`` states and ``logs_per_run`` logs
    carrying both ids), ``logs_per_run`` flow-level logs, ``artifacts`` artifacts and
    ``inputs`` flow_run_input rows. Details:

    * ``end_time=None`` means not terminal: a terminal ``state_type`` becomes RUNNING (a
      non-terminal one such as PAUSED is kept). A non-terminal ``state_type`` with an
      ``end_time`` is written as given (a raw/legacy row).
    * Artifact 0 of each flow run is its result artifact (type ``result``, ``metadata_`` JSON
      ``null``), referenced by the final state's ``result_artifact_id`` when the run is
      terminal. Artifacts 1.. cycle through variants: a bare JSON number ``1``, JSON ``null``
      data with SQL NULL metadata, a unicode table, a markdown string, ``0.25``, a link.
      Artifact 1 also carries the first task run's id.
    * Level k+1 is a subflow whose ``parent_task_run_id`` is an extra task run of level k.
      That task run mirrors the subflow's states (``state_details.child_flow_run_id``) and,
      when the subflow is terminal and ``artifacts >= 1``, its final state points at one more
      result artifact (``task_run_id`` = parent task run, ``flow_run_id`` = level k). Middle
      subflows are COMPLETED; the deepest one is ``subflow_state_type`` (end_time NULL if
      that is not terminal).
    * ``keyed_artifact_key`` adds one more artifact with that key on the root and upserts
      ``artifact_collection`` so that it becomes the key's latest.
    * ``task_run_state_cache=True`` adds a cache row per ordinary task run that points at the
      task run's final state.
    * The root's first flow-level log is 20 000 characters long.
    """
    return make_trees(
        db,
        1,
        flow_id=flow_id,
        end_time=end_time,
        state_type=state_type,
        task_runs=task_runs,
        states_per_run=states_per_run,
        logs_per_run=logs_per_run,
        artifacts=artifacts,
        keyed_artifact_key=keyed_artifact_key,
        inputs=inputs,
        subflow_depth=subflow_depth,
        subflow_state_type=subflow_state_type,
        deployment_id=deployment_id,
        task_run_state_cache=task_run_state_cache,
    )[0]


_DEFAULT_DATA: Any = {"value": "wörld", "n": 1}


class _SqlNull:
    def __repr__(self) -> str:
        return "SQL_NULL"


#: Pass as ``data`` to :func:`make_artifact` for SQL NULL (``None`` means JSON ``null``).
SQL_NULL: Any = _SqlNull()


def make_log(
    db: TestDatabase,
    flow_run_id: str | None = None,
    task_run_id: str | None = None,
    timestamp: datetime | None = None,
    *,
    message: str = "late log line ✓",
    level: int = 20,
    name: str = "prefect.flow_runs",
) -> str:
    """Insert one ``log`` row (no FK: any ids, even of deleted runs); return its id."""
    at = timestamp or datetime.now(UTC)
    log_id = uuid7(at)
    row = {
        "id": log_id,
        "created": datetime.now(UTC),
        "updated": datetime.now(UTC),
        "name": name,
        "level": level,
        "flow_run_id": flow_run_id,
        "task_run_id": task_run_id,
        "message": message,
        "timestamp": at,
    }
    with db.engine.begin() as connection:
        _insert(connection, db.dialect, "log", [row])
    return log_id


def make_artifact(
    db: TestDatabase,
    flow_run_id: str | None = None,
    task_run_id: str | None = None,
    key: str | None = None,
    data: Any = _DEFAULT_DATA,
    *,
    artifact_type: str | None = "markdown",
    metadata: Any = None,
    description: str | None = None,
    created: datetime | None = None,
    update_collection: bool = True,
) -> str:
    """Insert one ``artifact`` (no FK); return its id.

    ``data``/``metadata`` are Python values stored as JSON text, ``None`` as JSON ``null``
    (like Prefect's ``sa_JSON``) and :data:`SQL_NULL` as SQL NULL. With a ``key`` and
    ``update_collection``, ``artifact_collection`` is upserted so this artifact is the latest.
    """

    def encode(value: Any) -> str | None:
        return None if value is SQL_NULL else _dumps(value)

    at = created or datetime.now(UTC)
    batch = _Batch()
    artifact_id = _add_artifact(
        batch,
        None,
        at=at,
        flow_run_id=flow_run_id,
        task_run_id=task_run_id,
        key=key,
        artifact_type=artifact_type,
        data=encode(data),
        metadata=encode(metadata),
        description=description,
    )
    if not update_collection:
        batch.collections.clear()
    with db.engine.begin() as connection:
        _write(connection, db.dialect, batch)
    return artifact_id


# --------------------------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------------------------

_PG_KINDS = {
    "uuid": "uuid",
    "timestamptz": "timestamp",
    "timestamp": "timestamp",
    "interval": "interval",
    "json": "json",
    "jsonb": "json",
    "bool": "bool",
    "int2": "int",
    "int4": "int",
    "int8": "int",
    "float4": "float",
    "float8": "float",
    "numeric": "float",
}


def column_kinds(db: TestDatabase, table: str) -> dict[str, str]:
    """Column -> kind (uuid, timestamp, interval, json, bool, int, float, str), in order."""
    if db.dialect == "postgresql":
        rows = db.rows(
            "SELECT column_name, udt_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = :t ORDER BY ordinal_position",
            {"t": table},
        )
        return {row["column_name"]: _PG_KINDS.get(row["udt_name"], "str") for row in rows}
    kinds: dict[str, str] = {}
    for row in db.rows(f"PRAGMA table_info({table})"):
        declared = str(row["type"]).upper()
        name = row["name"]
        if declared.startswith("CHAR(36)"):
            kinds[name] = "uuid"
        elif declared.startswith("DATETIME"):
            kinds[name] = "interval" if name in INTERVAL_COLUMNS else "timestamp"
        elif declared.startswith("JSON"):
            kinds[name] = "json"
        elif declared.startswith("BOOLEAN"):
            kinds[name] = "bool"
        elif declared in ("INTEGER", "SMALLINT", "BIGINT"):
            kinds[name] = "int"
        elif declared in ("FLOAT", "REAL"):
            kinds[name] = "float"
        else:
            kinds[name] = "str"
    return kinds


def snapshot(
    db: TestDatabase, tables: Iterable[str] = RUN_TABLES
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every row of the run tables: table -> id -> column -> normalised value.

    Normalised: ids lowercase ``str``; timestamps aware UTC ``datetime``; intervals
    ``timedelta``; JSON as :func:`canonical_json` text (JSON ``null`` is ``"null"``, SQL NULL
    is ``None``); booleans ``bool``. Equal on both dialects for the same logical data.
    """
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for table in tables:
        kinds = column_kinds(db, table)
        rows = db.rows(f"SELECT * FROM {table}")
        by_id: dict[str, dict[str, Any]] = {}
        for row in rows:
            normalised = {column: normalize(kinds[column], row[column]) for column in kinds}
            by_id[normalised["id"]] = normalised
        result[table] = by_id
    return result


@dataclass
class TableDiff:
    added: set[str]
    removed: set[str]
    changed: set[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def snapshot_diff(
    before: Mapping[str, Mapping[str, Mapping[str, Any]]],
    after: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> dict[str, TableDiff]:
    """Per table: ids added, removed, and changed in any column (tables with no change left out)."""
    diffs: dict[str, TableDiff] = {}
    for table in sorted(set(before) | set(after)):
        old, new = before.get(table, {}), after.get(table, {})
        diff = TableDiff(
            added=set(new) - set(old),
            removed=set(old) - set(new),
            changed={key for key in set(old) & set(new) if old[key] != new[key]},
        )
        if diff:
            diffs[table] = diff
    return diffs


def iter_ids(trees: Iterable[Tree], table: str) -> Iterator[str]:
    """All ids of ``table`` across ``trees``."""
    for tree in trees:
        yield from tree.rows_by_table()[table]
