"""Generate a Prefect-shaped database of N top-level flow runs, fast, for benchmarks.

Usage::

    python -m benchmarks.generate --database-url sqlite:///bench.db --runs 10000 --create-schema
    python -m benchmarks.generate --database-url postgresql://postgres@127.0.0.1/bench --runs 100000

The shape follows ``/work/shared/prefect-schema.md`` and the measured database in
``/work/shared/performance-notes.md``; per top-level run, on average:

* 0.19 subflows (17% of terminal roots have one under their last task run; 12% of those have a
  second level), so 100k roots give about 119k flow runs;
* 7 task runs per flow run (1 to 13), 3 states per flow run and per task run;
* 35 logs per flow run: 7 flow-level logs and 4 per task run (those carry ``task_run_id``);
* a result artifact for one terminal flow run in four, referenced by the final state's
  ``result_artifact_id``; a ``flow_run_input`` row for 2% of flow runs;
* 20 flows and 10 deployments.

Root end times are uniform over the past year: ``expired_fraction`` of the roots ended between
365 and 91 days before ``now`` (expired under a 90-day retention), the others between 89 days and
one hour before ``now``. Every flow run is terminal (COMPLETED mostly; FAILED, CANCELLED,
CRASHED) except 1% of the non-expired roots, which are RUNNING with a NULL end time. A subflow
runs inside its parent task run and ends a little before its parent.

How: Python draws a small plan of the flow runs (one row each, from ``random.Random(seed)``)
and loads it into a temporary table; every Prefect table is then filled by set-based
``INSERT ... SELECT`` statements over that plan and a table of small numbers. Ids are hashed
from (seed, table, row number) by integer arithmetic: v4-shaped for flow runs and artifacts,
time-ordered v7 for task runs, states and logs, as Prefect makes them. A seed and a fixed
``now`` give the same rows, ids included, on both SQLite and PostgreSQL. Foreign keys stay
enforced: SQLite defers them to the commit, and on PostgreSQL the ``flow_run`` /
``flow_run_state`` / ``task_run`` cycle is written by one statement (FK checks run at its end).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import astuple, dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from pathlib import Path

import psycopg
from psycopg import sql as pgsql
from sqlalchemy.engine import URL, make_url

log = logging.getLogger("benchmarks.generate")

TABLES = (
    "flow",
    "deployment",
    "flow_run",
    "task_run",
    "flow_run_state",
    "task_run_state",
    "artifact",
    "flow_run_input",
    "log",
)

RETENTION = timedelta(days=90)
HISTORY = timedelta(days=365)
#: No root ends within a day of the 90-day line, so an archiver run a few hours later agrees.
MARGIN = timedelta(days=1)
FLOWS = 20
DEPLOYMENTS = 10
TASKS = (1, 13)
FLOW_LOGS = 7
TASK_LOGS = 4
SUBFLOW_SHARE = 0.17
NESTED_SHARE = 0.12
ARTIFACT_SHARE = 0.25
INPUT_SHARE = 0.02
RUNNING_SHARE = 0.01
FINAL_TYPES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
FINAL_WEIGHTS = (90, 6, 2, 2)
#: Id strides: task run n = flow run * 16 + k, state = run * 4 + k, log = flow run * 64 + j.
TASK_STRIDE = 16
STATE_STRIDE = 4
LOG_STRIDE = 64
MAX_RUNS = 10_000_000

SECOND = 1_000_000  # microseconds
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Tag(IntEnum):
    """Id namespaces: each table's ids are a function of (seed, tag, n)."""

    FLOW = 1
    DEPLOYMENT = 2
    FLOW_RUN = 3
    TASK_RUN = 4
    FLOW_RUN_STATE = 5
    TASK_RUN_STATE = 6
    ARTIFACT = 7
    FLOW_RUN_INPUT = 8
    LOG = 9


# --------------------------------------------------------------------------------------------
# Database URLs and the schema
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A database URL, split into what the sync drivers and Prefect's migrations need."""

    url: URL

    @classmethod
    def parse(cls, text: str) -> Target:
        url = make_url(text)
        backend = url.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {backend!r}: use sqlite or postgresql")
        if backend == "sqlite" and url.database in (None, "", ":memory:"):
            raise ValueError("a SQLite database must be a file: sqlite:///path/to/prefect.db")
        if backend == "postgresql" and not url.database:
            raise ValueError("a PostgreSQL URL must name the database")
        return cls(url)

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    @property
    def sqlite_path(self) -> Path:
        return Path(str(self.url.database))

    @property
    def async_url(self) -> str:
        driver = "sqlite+aiosqlite" if self.dialect == "sqlite" else "postgresql+asyncpg"
        return self.url.set(drivername=driver).render_as_string(hide_password=False)

    def connect_postgres(
        self, database: str | None = None
    ) -> psycopg.Connection[tuple[object, ...]]:
        """A psycopg connection (query options of the URL are not passed on)."""
        return psycopg.connect(
            host=self.url.host,
            port=self.url.port,
            user=self.url.username,
            password=self.url.password,
            dbname=database or self.url.database,
        )


def create_schema(database_url: str) -> None:
    """Build Prefect's schema with Prefect's own migrations (``prefect server database upgrade``).

    PostgreSQL: the database is created first if it does not exist.
    """
    target = Target.parse(database_url)
    if target.dialect == "postgresql":
        _create_postgres_database(target)
    else:
        target.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prefect-home-") as home:
        env = os.environ | {
            "PREFECT_HOME": home,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": target.async_url,
        }
        command = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"prefect migrations failed:\n{done.stdout}\n{done.stderr}")


def _create_postgres_database(target: Target) -> None:
    name = str(target.url.database)
    with target.connect_postgres("postgres") as conn:
        conn.autocommit = True
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if found is None:
            conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))


# --------------------------------------------------------------------------------------------
# The plan: one row per flow run, drawn in Python
# --------------------------------------------------------------------------------------------


@dataclass
class FlowRunPlan:
    """One flow run; times are epoch microseconds. ``end_us`` is None for a RUNNING run.

    Its states are (PENDING, RUNNING, final) at (pend, run, end); a RUNNING run's are
    (SCHEDULED, PENDING, RUNNING) at (sched, pend, run). Task run k spans
    ``[run + k * slot, run + (k + 1) * slot)``; the last one hosts the subflow, if any.
    """

    idx: int
    flow_n: int
    deployment_n: int | None
    parent_task_n: int | None
    parent_task_us: int | None
    child_idx: int | None
    name: str
    final_type: str
    sched_us: int
    pend_us: int
    run_us: int
    end_us: int | None
    slot_us: int
    n_tasks: int
    has_artifact: bool
    has_input: bool

    @property
    def last_task_start(self) -> int:
        return self.run_us + (self.n_tasks - 1) * self.slot_us


PLAN_COLUMNS = tuple(FlowRunPlan.__dataclass_fields__)

_ADJECTIVES = (
    "amber", "brave", "crimson", "daring", "eager", "fuzzy", "gentle", "hidden", "icy", "jolly",
    "keen", "lucid", "mellow", "nimble", "olive", "proud", "quiet", "rapid", "silent", "tidy",
)  # fmt: skip
_ANIMALS = (
    "otter", "heron", "lynx", "marmot", "ibis", "gecko", "tapir", "quokka", "badger", "crane",
    "dingo", "egret", "ferret", "gibbon", "hyena", "jackal", "koala", "lemur", "moose", "newt",
)  # fmt: skip


def to_us(value: datetime) -> int:
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
    return (value - EPOCH) // timedelta(microseconds=1)


class Planner:
    """Draws the flow runs of ``runs`` roots, in end-time order (like a real table's heap)."""

    def __init__(self, rng: random.Random, now_us: int) -> None:
        self.rng = rng
        self.now_us = now_us
        self.runs: list[FlowRunPlan] = []

    def plan(self, runs: int, expired_fraction: float) -> list[FlowRunPlan]:
        cutoff = self.ago(RETENTION)
        for end_us in self._root_end_times(runs, expired_fraction):
            live = end_us >= cutoff and self.rng.random() < RUNNING_SHARE
            root = self._live_root() if live else self._root(end_us)
            if not live and self.rng.random() < SUBFLOW_SHARE:
                child = self._subflow(root)
                if self.rng.random() < NESTED_SHARE:
                    self._subflow(child)
        return self.runs

    def _root_end_times(self, runs: int, expired_fraction: float) -> list[int]:
        """Expired roots end 365 to 91 days ago, the others 89 days to 1 hour ago."""
        expired = round(runs * expired_fraction)
        old = (self.ago(HISTORY), self.ago(RETENTION + MARGIN))
        fresh = (self.ago(RETENTION - MARGIN), self.ago(timedelta(hours=1)))
        ends = [self.rng.randrange(*old) for _ in range(expired)]
        ends += [self.rng.randrange(*fresh) for _ in range(runs - expired)]
        return sorted(ends)

    def ago(self, delta: timedelta) -> int:
        return self.now_us - delta // timedelta(microseconds=1)

    def _root(self, end_us: int) -> FlowRunPlan:
        n_tasks = self.rng.randint(*TASKS)
        slot = self.rng.randrange(2 * SECOND, 60 * SECOND)
        run_us = end_us - self.rng.randrange(SECOND // 10, 2 * SECOND) - n_tasks * slot
        return self._add(run_us, end_us, slot, n_tasks, self._final_type(), root=True)

    def _live_root(self) -> FlowRunPlan:
        n_tasks = self.rng.randint(*TASKS)
        run_us = self.now_us - self.rng.randrange(60 * SECOND, 7200 * SECOND)
        slot = (self.now_us - 30 * SECOND - run_us) // n_tasks
        return self._add(run_us, None, slot, n_tasks, "RUNNING", root=True)

    def _subflow(self, parent: FlowRunPlan) -> FlowRunPlan:
        """A subflow inside the parent's last task run, while that task is RUNNING."""
        slot = parent.slot_us
        start = parent.last_task_start + slot // 5 + slot // 50
        end_us = parent.last_task_start + slot * 9 // 10 - slot // 50
        n_tasks = self.rng.randint(*TASKS)
        run_us = start + (end_us - start) // 10
        task_slot = (end_us - (end_us - start) // 20 - run_us) // n_tasks
        child = self._add(run_us, end_us, task_slot, n_tasks, parent.final_type, root=False)
        child.sched_us, child.pend_us = start, start + (end_us - start) // 20
        child.parent_task_n = parent.idx * TASK_STRIDE + parent.n_tasks - 1
        child.parent_task_us = parent.last_task_start
        parent.child_idx = child.idx
        return child

    def _add(
        self, run_us: int, end_us: int | None, slot: int, n_tasks: int, final: str, *, root: bool
    ) -> FlowRunPlan:
        rng = self.rng
        pend_us = run_us - rng.randrange(SECOND // 5, 3 * SECOND)
        flow_n = rng.randrange(FLOWS)
        deployed = root and flow_n < DEPLOYMENTS and rng.random() < 0.8
        run = FlowRunPlan(
            idx=len(self.runs),
            flow_n=flow_n,
            deployment_n=flow_n if deployed else None,
            parent_task_n=None,
            parent_task_us=None,
            child_idx=None,
            name=f"{rng.choice(_ADJECTIVES)}-{rng.choice(_ANIMALS)}",
            final_type=final,
            sched_us=pend_us - rng.randrange(1_000, 30 * SECOND),
            pend_us=pend_us,
            run_us=run_us,
            end_us=end_us,
            slot_us=slot,
            n_tasks=n_tasks,
            has_artifact=end_us is not None and rng.random() < ARTIFACT_SHARE,
            has_input=rng.random() < INPUT_SHARE,
        )
        self.runs.append(run)
        return run

    def _final_type(self) -> str:
        return self.rng.choices(FINAL_TYPES, FINAL_WEIGHTS)[0]


# --------------------------------------------------------------------------------------------
# SQL: dialect helpers
# --------------------------------------------------------------------------------------------


class Dialect:
    """SQL expressions that differ between SQLite and PostgreSQL (the SQLite forms here).

    Both dialects build the same ids for the same seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def _int(self, n: str) -> str:
        return f"({n})"

    def uid(self, tag: Tag, n: str, at_us: str | None = None) -> str:
        """A deterministic UUID for (seed, tag, n): v4-shaped, or v7 (time-ordered) with ``at_us``.

        Prefect's flow-run and artifact ids are v4; its state, log and task-run ids are v7.
        The parts are hashed from n with odd multipliers and n < 2**31, so nothing overflows
        64 bits, and the last 48 bits are a bijection of n: ids never collide within a table.
        """
        salts = random.Random(f"{self.seed}:{int(tag)}")
        s = [salts.randrange(1 << bits) for bits in (32, 16, 12, 14, 48)]
        n = self._int(n)
        if at_us is None:
            version = 4
            high = f"(({n} * 2654435761 + {s[0]}) % 4294967296)"
            middle = f"(({n} * 40503 + {s[1]}) % 65536)"
        else:
            version = 7
            high = f"({self._int(at_us)} / 65536000)"
            middle = f"({self._int(at_us)} / 1000 % 65536)"
        return self._format_uuid(
            high,
            middle,
            version,
            f"(({n} * 2246822519 + {s[2]}) % 4096)",
            f"(32768 + ({n} * 668265263 + {s[3]}) % 16384)",
            f"(({n} * 3266489917 + {s[4]}) % 281474976710656)",
        )

    def _format_uuid(
        self, high: str, middle: str, version: int, low: str, variant: str, node: str
    ) -> str:
        """Lowercase hyphenated text from 32, 16, 12, 16 and 48 bits."""
        formats = f"'%08x-%04x-{version}%03x-%04x-%012x'"
        return f"printf({formats}, {high}, {middle}, {low}, {variant}, {node})"

    def ts(self, us: str) -> str:
        """Prefect's SQLite timestamp text (naive UTC, six fraction digits)."""
        return (
            f"strftime('%Y-%m-%d %H:%M:%S', ({us}) / 1000000, 'unixepoch')"
            f" || printf('.%06d', ({us}) % 1000000)"
        )

    def interval(self, us: str) -> str:
        """SQLite stores an interval as the epoch plus the duration."""
        return self.ts(us)

    def jsonb(self, text: str) -> str:
        return text

    def json(self, text: str) -> str:
        return text

    def state_type(self, text: str) -> str:
        return text

    def json_merge(self, strings: dict[str, str], fixed: dict[str, object]) -> str:
        """A JSON object: ``strings`` are SQL text expressions (NULL gives null), then ``fixed``."""
        return _json_text(strings, fixed)


class PostgresDialect(Dialect):
    def _int(self, n: str) -> str:
        return f"(({n})::bigint)"

    def _format_uuid(
        self, high: str, middle: str, version: int, low: str, variant: str, node: str
    ) -> str:
        first = f"int8send(({high} << 32) | ({middle} << 16) | {version << 12} | {low})"
        second = f"int8send(({variant} << 48) | {node})"
        return f"encode({first} || {second}, 'hex')::uuid"

    def ts(self, us: str) -> str:
        return f"(timestamptz '1970-01-01 00:00:00+00' + ({us}) * interval '1 microsecond')"

    def interval(self, us: str) -> str:
        return f"(({us}) * interval '1 microsecond')"

    def jsonb(self, text: str) -> str:
        return f"({text})::jsonb"

    def json(self, text: str) -> str:
        return f"({text})::json"

    def state_type(self, text: str) -> str:
        return f"({text})::state_type"

    def json_merge(self, strings: dict[str, str], fixed: dict[str, object]) -> str:
        """The constant part is parsed once; jsonb concatenation is cheap per row."""
        pairs = ", ".join(f"'{key}', {expr}" for key, expr in strings.items())
        return f"({_literal(_dumps(fixed))}::jsonb || jsonb_build_object({pairs}))"


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _json_string(expr: str) -> str:
    return f"COALESCE('\"' || {expr} || '\"', 'null')"


def _json_text(strings: dict[str, str], fixed: dict[str, object]) -> str:
    """JSON text built by concatenation: ``strings`` first, then the constant ``fixed`` keys."""
    pieces = [f"'{_dumps(key)}: ' || {_json_string(expr)}" for key, expr in strings.items()]
    pieces.append(_literal(_dumps(fixed)[1:]))
    return "'{' || " + " || ', ' || ".join(pieces)


def _quoted(expr: str) -> str:
    """A JSON string from a non-null SQL expression."""
    return f"'\"' || {expr} || '\"'"


def _nullable(column: str, expr: str) -> str:
    return f"CASE WHEN {column} IS NULL THEN NULL ELSE {expr} END"


def _state_name(type_expr: str) -> str:
    names = ("Scheduled", "Pending", "Running", "Completed", "Failed", "Cancelled", "Crashed")
    whens = " ".join(f"WHEN '{name.upper()}' THEN '{name}'" for name in names)
    return f"CASE {type_expr} {whens} END"


def _insert(table: str, columns: dict[str, str], source: str) -> str:
    names = ", ".join(f'"{column}"' for column in columns)
    return f"INSERT INTO {table} ({names}) SELECT {', '.join(columns.values())} FROM {source}"


# --------------------------------------------------------------------------------------------
# SQL: the temporary plan tables
# --------------------------------------------------------------------------------------------

_PLAN_DDL = (
    "CREATE TEMP TABLE bench_n (k INTEGER PRIMARY KEY)",
    """CREATE TEMP TABLE bench_flow (
        idx INTEGER PRIMARY KEY, flow_n INTEGER NOT NULL, deployment_n INTEGER,
        parent_task_n INTEGER, parent_task_us BIGINT, child_idx INTEGER, name TEXT NOT NULL,
        final_type TEXT NOT NULL,
        sched_us BIGINT NOT NULL, pend_us BIGINT NOT NULL, run_us BIGINT NOT NULL, end_us BIGINT,
        slot_us BIGINT NOT NULL, n_tasks INTEGER NOT NULL, has_artifact BOOLEAN NOT NULL,
        has_input BOOLEAN NOT NULL)""",
)

_NUMBERS = range(LOG_STRIDE)


def _derived_sql(d: Dialect) -> list[str]:
    """Flow runs and task runs with the same columns (n, id, flow_run_id, child_id, times).

    Ids that several tables repeat are computed once here. A task run's states sit at 1/20,
    1/10, 1/5 and 9/10 of its slot (the first one only when it is still RUNNING).
    """
    flow_runs = f"""CREATE TEMP TABLE bench_flow_run AS
        SELECT f.*, f.idx AS n, f.idx AS flow_idx, 0 AS k,
               {d.uid(Tag.FLOW_RUN, "f.idx")} AS id,
               {d.uid(Tag.FLOW_RUN, "f.idx")} AS flow_run_id,
               {_nullable("f.child_idx", d.uid(Tag.FLOW_RUN, "f.child_idx"))} AS child_id
        FROM bench_flow f"""
    previous = d.uid(Tag.TASK_RUN, "x.n - 1", "x.base - x.slot_us")
    tasks = f"""CREATE TEMP TABLE bench_task AS
        SELECT x.*, {d.uid(Tag.TASK_RUN, "x.n", "x.base")} AS id,
               CASE WHEN x.k > 0 THEN {previous} END AS prev_id,
               x.base + x.slot_us / 20 AS sched_us,
               x.base + x.slot_us / 10 AS pend_us,
               x.base + x.slot_us / 5 AS run_us,
               CASE WHEN x.live THEN NULL ELSE x.base + x.slot_us * 9 / 10 END AS end_us
        FROM (SELECT f.idx * {TASK_STRIDE} + t.k AS n, f.idx AS flow_idx, t.k AS k,
                     f.id AS flow_run_id, f.slot_us, f.n_tasks, FALSE AS has_artifact,
                     CASE WHEN t.k = f.n_tasks - 1 THEN f.child_id END AS child_id,
                     CASE WHEN t.k = f.n_tasks - 1 THEN f.final_type ELSE 'COMPLETED' END
                         AS final_type,
                     f.end_us IS NULL AND t.k = f.n_tasks - 1 AS live,
                     f.run_us + t.k * f.slot_us AS base
              FROM bench_flow_run f JOIN bench_n t ON t.k < f.n_tasks) x"""
    return [flow_runs, tasks]


# --------------------------------------------------------------------------------------------
# SQL: one INSERT ... SELECT per table
# --------------------------------------------------------------------------------------------

_FLOW_POLICY: dict[str, object] = {
    "max_retries": 0,
    "retry_delay_seconds": 0.0,
    "retries": 0,
    "retry_delay": 0,
    "pause_keys": [],
    "resuming": False,
    "retry_type": None,
}
_TASK_POLICY: dict[str, object] = {
    "max_retries": 0,
    "retry_delay_seconds": 0.0,
    "retries": 0,
    "retry_delay": 0,
    "retry_jitter_factor": None,
}
_PARAMETERS: dict[str, object] = {
    "source": "s3://bench-bucket/input",
    "limit": 1000,
    "dry_run": False,
    "city": "Zürich",
}
#: A result reference (the result itself lives in result storage), after its storage_key.
_RESULT: dict[str, object] = {
    "expiration": None,
    "serializer": {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None},
    "storage_block_id": None,
    "prefect_version": "3.9.1",
}
#: state_details after flow_run_id, task_run_id and child_flow_run_id.
_DETAILS: dict[str, object] = {
    key: False if key in ("deferred", "untrackable_result", "pause_reschedule") else None
    for key in (
        "scheduled_time", "cache_key", "cache_expiration", "deferred", "untrackable_result",
        "pause_timeout", "pause_reschedule", "pause_key", "run_input_keyset", "refresh_cache",
        "retriable", "transition_id", "task_parameters_id", "traceparent",
        "deployment_concurrency_lease_id",
    )
}  # fmt: skip
_FINAL_MESSAGES = {
    "COMPLETED": "All states completed.",
    "FAILED": "Flow run encountered an exception: ValueError('bad input in partition 7')",
    "CANCELLED": "Flow run was cancelled by the user.",
    "CRASHED": "Execution was interrupted by an unexpected exception: SIGTERM",
}
_TAGS = _literal(_dumps(["benchmark"]))
#: When a run's last state happened (its id is time-ordered).
_LAST_STATE_AT = "COALESCE(end_us, run_us)"


def _reference_sql(d: Dialect, at: str) -> list[str]:
    """Flows and deployments (reference rows the runs point at)."""
    flows = {
        "id": d.uid(Tag.FLOW, "k"),
        "created": d.ts(at),
        "updated": d.ts(at),
        "name": "'bench-flow-' || k",
        "tags": d.jsonb(_TAGS),
    }
    deployments = {
        "id": d.uid(Tag.DEPLOYMENT, "k"),
        "created": d.ts(at),
        "updated": d.ts(at),
        "name": "'bench-deployment-' || k",
        "flow_id": d.uid(Tag.FLOW, "k"),
        "tags": d.jsonb(_TAGS),
        "parameters": d.jsonb("'{}'"),
        "work_queue_name": "'default'",
        "entrypoint": "'flows.py:bench'",
        "version": "'1'",
    }
    return [
        _insert("flow", flows, f"bench_n WHERE k < {FLOWS}"),
        _insert("deployment", deployments, f"bench_n WHERE k < {DEPLOYMENTS}"),
    ]


def _artifact_sql(d: Dialect) -> str:
    key = {"storage_key": "'/root/.prefect/storage/r' || n"}
    columns = {
        "id": d.uid(Tag.ARTIFACT, "n"),
        "created": d.ts("end_us"),
        "updated": d.ts("end_us"),
        "type": "'result'",
        "data": d.json(_json_text(key, _RESULT)),
        "metadata_": d.json("'null'"),
        "flow_run_id": "id",
    }
    return _insert("artifact", columns, "bench_flow_run WHERE has_artifact")


def _flow_run_sql(d: Dialect) -> str:
    # SQLite's printf() formats NULL as 0, so the nullable ids are NULL-guarded; text built
    # from them is NULL too (|| propagates NULL).
    deployment = _nullable("deployment_n", d.uid(Tag.DEPLOYMENT, "deployment_n"))
    parent_task = _nullable("parent_task_n", d.uid(Tag.TASK_RUN, "parent_task_n", "parent_task_us"))
    flow = d.uid(Tag.FLOW, "flow_n")
    labels = (
        f"'{{\"prefect.flow.id\": ' || {_quoted(flow)} || "
        f"COALESCE(', \"prefect.deployment.id\": ' || {_quoted(deployment)}, '') || '}}'"
    )
    created_by = (
        f'\'{{"id": \' || {_quoted(deployment)} || \', "type": "DEPLOYMENT", '
        '"display_value": "bench-deployment-\' || deployment_n || \'"}\''
    )
    columns = {
        "id": "id",
        "created": d.ts(f"sched_us - {SECOND}"),
        "updated": d.ts(f"{_LAST_STATE_AT} + 3003"),
        "name": "name",
        "state_type": d.state_type("final_type"),
        "run_count": "1",
        "expected_start_time": d.ts("sched_us"),
        "start_time": d.ts("run_us"),
        "end_time": d.ts("end_us"),
        "total_run_time": d.interval("COALESCE(end_us - run_us, 0)"),
        "flow_version": "'1.' || flow_n",
        "parameters": d.jsonb(_json_text({"run": "'run-' || n"}, _PARAMETERS)),
        "idempotency_key": f"'scheduled ' || {deployment} || ' ' || n",
        "context": d.jsonb("'{}'"),
        "empirical_policy": d.jsonb(_literal(_dumps(_FLOW_POLICY))),
        "tags": d.jsonb(_TAGS),
        "auto_scheduled": "deployment_n IS NOT NULL",
        "flow_id": flow,
        "deployment_id": deployment,
        "parent_task_run_id": parent_task,
        "state_id": d.uid(Tag.FLOW_RUN_STATE, f"n * {STATE_STRIDE} + 2", _LAST_STATE_AT),
        "state_name": _state_name("final_type"),
        "work_queue_name": _nullable("deployment_n", "'default'"),
        "state_timestamp": d.ts(_LAST_STATE_AT),
        "created_by": d.jsonb(created_by),
        "job_variables": d.jsonb("'{}'"),
        "labels": d.jsonb(labels),
    }
    return _insert("flow_run", columns, "bench_flow_run")


def _task_run_sql(d: Dialect) -> str:
    upstream = f'\'{{"input_type": "task_run", "id": \' || {_quoted("prev_id")} || \'}}\''
    function = "CASE k % 3 WHEN 0 THEN 'extract' WHEN 1 THEN 'transform' ELSE 'load' END"
    columns = {
        "id": "id",
        "created": d.ts("sched_us - 1001"),
        "updated": d.ts(f"{_LAST_STATE_AT} + 2002"),
        "name": f"{function} || '-' || k",
        "state_type": d.state_type("final_type"),
        "run_count": "1",
        "expected_start_time": d.ts("sched_us"),
        "start_time": d.ts("run_us"),
        "end_time": d.ts("end_us"),
        "total_run_time": d.interval("COALESCE(end_us - run_us, 0)"),
        "task_key": f"{function} || '-5f0c1d2e'",
        "dynamic_key": "'' || k",
        "task_version": "'1.0'",
        "empirical_policy": d.jsonb(_literal(_dumps(_TASK_POLICY))),
        "task_inputs": d.jsonb(
            '\'{"rows": [], "__parents__": [], "wait_for": [\''
            f" || COALESCE({upstream}, '') || ']}}'"
        ),
        "tags": d.jsonb(_TAGS),
        "flow_run_id": "flow_run_id",
        "state_id": d.uid(Tag.TASK_RUN_STATE, f"n * {STATE_STRIDE} + 2", _LAST_STATE_AT),
        "state_name": _state_name("final_type"),
        "state_timestamp": d.ts(_LAST_STATE_AT),
        "flow_run_run_count": "1",
        "labels": d.jsonb(f"'{{\"prefect.flow-run.id\": ' || {_quoted('flow_run_id')} || '}}'"),
    }
    return _insert("task_run", columns, "bench_task")


@dataclass(frozen=True)
class _StateKind:
    table: str
    parent_column: str
    tag: Tag
    source: str

    @property
    def for_tasks(self) -> bool:
        return self.table == "task_run_state"


_FLOW_STATES = _StateKind("flow_run_state", "flow_run_id", Tag.FLOW_RUN_STATE, "bench_flow_run")
_TASK_STATES = _StateKind("task_run_state", "task_run_id", Tag.TASK_RUN_STATE, "bench_task")

#: Each run's three states: (PENDING, RUNNING, final), or (SCHEDULED, PENDING, RUNNING) if live.
_STATES_OF = """(SELECT r.*, s.k AS s,
        CASE s.k WHEN 0 THEN CASE WHEN r.end_us IS NULL THEN r.sched_us ELSE r.pend_us END
                 WHEN 1 THEN CASE WHEN r.end_us IS NULL THEN r.pend_us ELSE r.run_us END
                 ELSE COALESCE(r.end_us, r.run_us) END AS at,
        CASE s.k WHEN 0 THEN CASE WHEN r.end_us IS NULL THEN 'SCHEDULED' ELSE 'PENDING' END
                 WHEN 1 THEN CASE WHEN r.end_us IS NULL THEN 'PENDING' ELSE 'RUNNING' END
                 ELSE r.final_type END AS type
    FROM {source} r JOIN bench_n s ON s.k < 3) x"""


def _state_sql(d: Dialect, kind: _StateKind) -> str:
    messages = " ".join(f"WHEN '{t}' THEN {_literal(m)}" for t, m in _FINAL_MESSAGES.items())
    ids = {"flow_run_id": "flow_run_id", "task_run_id": "NULL", "child_flow_run_id": "NULL"}
    data, artifact = "NULL", "NULL"
    if kind.for_tasks:
        ids |= {"task_run_id": "id", "child_flow_run_id": "child_id"}
        key = {"storage_key": "'/root/.prefect/storage/t' || n || '-' || s"}
        data = f"CASE WHEN type = 'COMPLETED' THEN {d.json_merge(key, _RESULT)} END"
    else:
        artifact = f"CASE WHEN s = 2 AND has_artifact THEN {d.uid(Tag.ARTIFACT, 'n')} END"
    columns = {
        "id": d.uid(kind.tag, f"n * {STATE_STRIDE} + s", "at"),
        "created": d.ts("at + 731"),
        "updated": d.ts("at + 731"),
        "type": d.state_type("type"),
        "timestamp": d.ts("at"),
        "name": _state_name("type"),
        "message": f"CASE WHEN s = 2 THEN CASE type {messages} END END",
        "state_details": d.json_merge(ids, _DETAILS),
        "data": data,
        kind.parent_column: "id",
        "result_artifact_id": artifact,
    }
    return _insert(kind.table, columns, _STATES_OF.format(source=kind.source))


def _input_sql(d: Dialect) -> str:
    columns = {
        "id": d.uid(Tag.FLOW_RUN_INPUT, "n"),
        "created": d.ts("run_us + slot_us / 2"),
        "updated": d.ts("run_us + slot_us / 2"),
        "key": "'paused-1-response'",
        "value": '\'{"approved": true, "comment": "Looks good", "run": \' || n || \'}\'',
        "flow_run_id": "id",
    }
    return _insert("flow_run_input", columns, "bench_flow_run WHERE has_input")


def _log_sql(d: Dialect, *, tasks: bool) -> str:
    """Flow-level logs (7 per flow run) or task logs (4 per task run), all inside the run."""
    count = TASK_LOGS if tasks else FLOW_LOGS
    window = "slot_us * 7 / 10" if tasks else "slot_us * n_tasks"
    source = "bench_task" if tasks else "bench_flow_run"
    first = f"flow_idx * {LOG_STRIDE}" + (f" + {FLOW_LOGS} + k * {TASK_LOGS}" if tasks else "")
    placed = (
        f"(SELECT r.*, j.k AS j, r.run_us + (j.k + 1) * ({window}) / {count + 1} AS at"
        f" FROM {source} r JOIN bench_n j ON j.k < {count}) x"
    )
    what = "task" if tasks else "flow"
    message = (
        f"CASE j WHEN 0 THEN 'Beginning {what} run ' || n "
        f"WHEN {count - 1} THEN 'Finished in state ' || {_state_name('final_type')} || '()' "
        f"ELSE 'Processed batch ' || j || ' of {count} in {what} run ' || n || ': 1024 records"
        " read from s3://bench-bucket/input/part-' || j || '.parquet and written to the"
        " warehouse' END"
    )
    columns = {
        "id": d.uid(Tag.LOG, f"{first} + j", "at"),
        "created": d.ts("at + 40000"),
        "updated": d.ts("at + 40000"),
        "name": f"'prefect.{what}_runs'",
        "level": "CASE WHEN j = 2 THEN 10 ELSE 20 END",
        "flow_run_id": "flow_run_id",
        "task_run_id": "id" if tasks else "NULL",
        "message": message,
        "timestamp": d.ts("at"),
    }
    return _insert("log", columns, placed)


def load_steps(d: Dialect, reference_us: int) -> list[tuple[str, list[str]]]:
    """(label, INSERTs) in FK order. A step's INSERTs are one statement on PostgreSQL."""
    return [
        ("flow, deployment", _reference_sql(d, str(reference_us))),
        ("artifact", [_artifact_sql(d)]),
        (
            "flow_run, flow_run_state, task_run",
            [_flow_run_sql(d), _state_sql(d, _FLOW_STATES), _task_run_sql(d)],
        ),
        ("task_run_state", [_state_sql(d, _TASK_STATES)]),
        ("flow_run_input", [_input_sql(d)]),
        ("log (flow)", [_log_sql(d, tasks=False)]),
        ("log (task)", [_log_sql(d, tasks=True)]),
    ]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@contextmanager
def _timed(label: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    log.info("%-40s %7.2f s", label, time.perf_counter() - started)


def _plan_rows(plan: Sequence[FlowRunPlan]) -> list[tuple[object, ...]]:
    return [astuple(run) for run in plan]


_TEMP_TABLES = ("bench_task", "bench_flow_run", "bench_flow", "bench_n")


def _load_sqlite(target: Target, d: Dialect, plan: Sequence[FlowRunPlan], at_us: int) -> None:
    """One transaction with FK checks deferred to the commit; WAL and NORMAL again after."""
    if not target.sqlite_path.is_file():
        raise FileNotFoundError(f"{target.sqlite_path} does not exist: use --create-schema")
    with closing(sqlite3.connect(target.sqlite_path, isolation_level=None)) as conn:
        _sqlite_load_pragmas(conn)
        try:
            _sqlite_insert(conn, d, plan, at_us)
        finally:
            _sqlite_restore(conn)
        with _timed("ANALYZE"):
            conn.execute("ANALYZE")


def _sqlite_load_pragmas(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA foreign_keys=ON")
    if conn.execute("PRAGMA foreign_keys").fetchone() != (1,):
        raise RuntimeError("PRAGMA foreign_keys=ON did not take effect")
    conn.execute("PRAGMA busy_timeout=60000")
    conn.execute("PRAGMA journal_mode=DELETE")  # new pages need no rollback journal
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1048576")  # 1 GiB: index pages stay in memory
    conn.execute("PRAGMA temp_store=MEMORY")


def _sqlite_insert(
    conn: sqlite3.Connection, d: Dialect, plan: Sequence[FlowRunPlan], at_us: int
) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("PRAGMA defer_foreign_keys=ON")  # the flow_run <-> state/task cycle
        _check_empty(conn.execute("SELECT count(*) FROM flow_run").fetchone())
        for ddl in _PLAN_DDL:
            conn.execute(ddl)
        conn.executemany("INSERT INTO bench_n VALUES (?)", [(k,) for k in _NUMBERS])
        marks = ", ".join("?" for _ in PLAN_COLUMNS)
        conn.executemany(f"INSERT INTO bench_flow VALUES ({marks})", _plan_rows(plan))
        with _timed("plan tables"):
            for statement in _derived_sql(d):
                conn.execute(statement)
        for label, statements in load_steps(d, at_us):
            with _timed(label):
                for statement in statements:
                    conn.execute(statement)
        with _timed("commit (deferred FK check)"):
            conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _sqlite_restore(conn: sqlite3.Connection) -> None:
    for table in _TEMP_TABLES:
        conn.execute(f"DROP TABLE IF EXISTS temp.{table}")
    if conn.execute("PRAGMA journal_mode=WAL").fetchone() != ("wal",):
        raise RuntimeError("could not switch the database back to WAL")
    conn.execute("PRAGMA synchronous=NORMAL")


def _load_postgres(target: Target, d: Dialect, plan: Sequence[FlowRunPlan], at_us: int) -> None:
    """One transaction; the psycopg context manager rolls it back on any error."""
    with target.connect_postgres() as conn:
        conn.execute("SET temp_buffers = '1GB'")  # before the session's first temporary table
        _check_empty(conn.execute("SELECT count(*) FROM flow_run").fetchone())
        with _timed("plan tables"):
            _postgres_plan_tables(conn, d, plan)
        for label, statements in load_steps(d, at_us):
            with _timed(label):
                conn.execute(_one_statement(statements))
        with _timed("commit"):
            conn.commit()
        conn.autocommit = True
        with _timed("VACUUM (ANALYZE)"):  # hint bits and visibility map, like a settled database
            conn.execute("VACUUM (ANALYZE)")


def _postgres_plan_tables(
    conn: psycopg.Connection[tuple[object, ...]], d: Dialect, plan: Sequence[FlowRunPlan]
) -> None:
    for ddl in _PLAN_DDL:
        conn.execute(ddl)
    conn.execute(f"INSERT INTO bench_n SELECT generate_series(0, {len(_NUMBERS) - 1})")
    with conn.cursor().copy(f"COPY bench_flow ({', '.join(PLAN_COLUMNS)}) FROM STDIN") as copy:
        for row in _plan_rows(plan):
            copy.write_row(row)
    for statement in _derived_sql(d):
        conn.execute(statement.encode())
    for table in _TEMP_TABLES:
        conn.execute(f"ANALYZE {table}".encode())


def _one_statement(inserts: Sequence[str]) -> bytes:
    """Several INSERTs as one statement: FK checks run at its end, so a cycle is fine."""
    *first, last = inserts
    ctes = ", ".join(f"step{i} AS ({insert})" for i, insert in enumerate(first))
    return (f"WITH {ctes} {last}" if ctes else last).encode()


def _check_empty(row: tuple[object, ...] | None) -> None:
    count = int(str(row[0])) if row else 0
    if count:
        raise RuntimeError(f"the database already holds {count} flow runs; use an empty one")


def count_rows(database_url: str) -> dict[str, int]:
    """Rows per table of :data:`TABLES`."""
    target = Target.parse(database_url)
    query = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in TABLES)
    if target.dialect == "sqlite":
        with closing(sqlite3.connect(target.sqlite_path)) as conn:
            found = {str(t): int(n) for t, n in conn.execute(query)}
    else:
        with target.connect_postgres() as pg:
            found = {str(t): int(str(n)) for t, n in pg.execute(query)}
    return {table: found[table] for table in TABLES}


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def generate(
    database_url: str,
    runs: int,
    *,
    expired_fraction: float = 0.5,
    now: datetime | None = None,
    seed: int = 1,
) -> dict[str, int]:
    """Fill an empty Prefect database with ``runs`` top-level runs; return rows per table."""
    if not 0 < runs <= MAX_RUNS:
        raise ValueError(f"runs must be between 1 and {MAX_RUNS}")
    if not 0.0 <= expired_fraction <= 1.0:
        raise ValueError("expired_fraction must be between 0 and 1")
    target = Target.parse(database_url)
    now_us = to_us(now or datetime.now(UTC))
    with _timed(f"plan {runs} roots"):
        plan = Planner(random.Random(seed), now_us).plan(runs, expired_fraction)
    reference_us = now_us - (HISTORY + timedelta(days=30)) // timedelta(microseconds=1)
    if target.dialect == "sqlite":
        _load_sqlite(target, Dialect(seed), plan, reference_us)
    else:
        _load_postgres(target, PostgresDialect(seed), plan, reference_us)
    return count_rows(database_url)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generate",
        description="Generate a Prefect-shaped database of N top-level flow runs.",
    )
    parser.add_argument("--database-url", required=True, help="sqlite:///path.db or postgresql://")
    parser.add_argument("--runs", type=int, required=True, help="top-level flow runs")
    parser.add_argument("--expired-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--now", type=datetime.fromisoformat, help="the clock, ISO 8601 with offset (default: now)"
    )
    parser.add_argument(
        "--create-schema",
        action="store_true",
        help="first build the schema with Prefect's migrations (creates a PostgreSQL database)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-step timings")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    started = time.perf_counter()
    if args.create_schema:
        with _timed("create schema (prefect migrations)"):
            create_schema(args.database_url)
    loading = time.perf_counter()
    counts = generate(
        args.database_url,
        args.runs,
        expired_fraction=args.expired_fraction,
        now=args.now,
        seed=args.seed,
    )
    done = time.perf_counter()
    for table, count in counts.items():
        print(f"{table:16} {count:>12,}")
    print(f"generated in {done - loading:.1f} s ({done - started:.1f} s in all)")


if __name__ == "__main__":
    main()
