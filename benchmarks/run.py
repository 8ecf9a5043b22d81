"""Measure archiver against a tree-aware bare delete and Prefect's db_vacuum, in one invocation.

Usage::

    python -m benchmarks.run --runs 10000 --backends sqlite,postgres --storages local,s3

What one invocation does:

1. Makes one Prefect-shaped template database per backend with :mod:`benchmarks.generate`
   (SQLite ``benchmarks/data/tpl-<runs>.db``, PostgreSQL ``bench_tpl_<runs>``), or reuses the
   one it made before: a marker (``tpl-<runs>.json``; the PostgreSQL database's comment) records
   the runs, seed, clock and a hash of the generator, and anything else is made again.
2. For every measurement copies the template (``CREATE DATABASE ... TEMPLATE ... STRATEGY
   FILE_COPY``, or a file copy) and does the work in a child process (this module's hidden
   ``_measure`` command), so that peak RSS and CPU time are those of the work alone. The child
   counts rows per table before and after (outside the timing) and reports wall seconds,
   CPU seconds, peak RSS, the host's CPU use meanwhile, on PostgreSQL the CPU of the server
   backends that served the work (:mod:`benchmarks.backend_cpu`) and, for archiver, its
   per-stage times. Per backend: the bare delete, archiver to each storage and, on PostgreSQL,
   Prefect's own ``db_vacuum`` (:mod:`benchmarks.peer`).
3. Prints Markdown tables whose headline is each archiver run's wall time divided by the bare
   delete's and by ``db_vacuum``'s measured in the same invocation, and writes them with the
   raw figures to ``benchmarks/results/<date>-<runs>.json``.
4. Drops the copies and removes the archive folders and buckets; with ``--fresh`` the
   templates are made anew first and removed at the end.

**The bare delete** is the floor: exactly the rows archiver removes, without reading them.
Per batch of ``batch_size`` expired top-level roots, oldest first by ``end_time``, one
transaction: lock the roots (``FOR UPDATE SKIP LOCKED``; SQLite ``BEGIN IMMEDIATE``), collect
the trees' flow-run ids with a recursive query through ``task_run.flow_run_id`` and
``flow_run.parent_task_run_id``, then their task-run ids, delete logs and artifacts by
flow-run id and by task-run id, delete the flow runs, and let the foreign-key cascades remove
task runs, states and inputs. The session settings are archiver's: ``random_page_cost`` 1.1
and ``jit`` off on PostgreSQL, ``foreign_keys`` on for SQLite.

S3 is a moto server in its own process (so it does not share a GIL with archiver).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import os
import platform
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import psycopg
from psycopg import sql as pgsql

from benchmarks.backend_cpu import BackendSampler
from benchmarks.generate import Target, count_rows, create_schema, generate
from benchmarks.peer import VACUUM, import_prefect, vacuum, vacuum_environment
from benchmarks.tables import (
    ARCHIVER,
    BARE,
    STAGES,
    Result,
    all_consistent,
    headline_table,
    representative,
    rows_table,
    stages_table,
    vacuum_table,
)

if TYPE_CHECKING:  # archiver is imported in the measuring child only (its imports are not timed)
    from archiver import RunOptions

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"
#: The clock of every measurement (and of the generated data): the same rows are expired
#: whenever the benchmark runs, so a template can be reused.
NOW = datetime(2026, 11, 1, tzinfo=UTC)
RETENTION = timedelta(days=90)
SEED = 1
EXPIRED_FRACTION = 0.5
S3_REGION = "us-east-1"
S3_CREDENTIALS = {"key": "testing", "secret": "testing"}
Rows = list[tuple[Any, ...]]
Execute = Callable[[str, dict[str, object]], Rows]


# --------------------------------------------------------------------------------------------
# What one child process measures, and what it reports
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One measurement: a method on a fresh copy of one backend's template."""

    backend: str  # sqlite | postgres
    method: str  # BARE | ARCHIVER | VACUUM (PostgreSQL only)
    storage: str  # "" for the bare delete and the vacuum; local | s3
    database_url: str  # sync URL of the copy: sqlite:///... or postgresql://...
    batch_size: int
    storage_url: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.method}" + (f" to {self.storage}" if self.storage else "")


@dataclass
class Work:
    """What the measured work itself reports."""

    batch_seconds: list[float]
    bytes: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    reported_rows: dict[str, int] | None = None


# --------------------------------------------------------------------------------------------
# The child: bare delete, archiver or db_vacuum, measured
# --------------------------------------------------------------------------------------------


def measure(spec: Spec) -> Result:
    """Do the work of ``spec`` in this process and measure it (the child's side)."""
    before = count_rows(spec.database_url)
    if spec.method == ARCHIVER:  # a process starts once: its imports are not part of the work
        importlib.import_module("archiver.engine.run")
        importlib.import_module("s3fs" if spec.storage == "s3" else "fsspec")
    if spec.method == VACUUM:
        import_prefect()
    with ExitStack() as stack:
        sampler = None
        if spec.backend == "postgres":  # opened before the clocks start, read after they stop
            sampler = stack.enter_context(BackendSampler(spec.database_url))
        meter = Meter(exclude={sampler.pid} if sampler else set())
        work = WORK[spec.method](spec)
        clocks = meter.read()
    server = sampler.result if sampler and sampler.result else None
    after = count_rows(spec.database_url)
    removed = {table: count - after[table] for table, count in before.items()}
    reported = work.reported_rows or {}
    first, last = _tenths(work.batch_seconds)
    return Result(
        spec.backend, spec.method, spec.storage, removed=removed, left=after,
        batches=len(work.batch_seconds), bytes=work.bytes, stages=work.stages,
        first_tenth=first, last_tenth=last, peak_rss_mb=_peak_rss_mb(),
        consistent=not reported or all(reported.get(t, 0) == n for t, n in removed.items()),
        backend_cpu=server.seconds if server else 0.0, backends=server.backends if server else 0,
        sampler_cpu=server.sampler_seconds if server else 0.0, **clocks,
    )  # fmt: skip


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Clocks(TypedDict):
    seconds: float
    cpu_seconds: float
    host_busy: float
    other_cpu: float
    moto_cpu: float
    load_before: float


class Meter:
    """The clocks of this process and of the machine, read when made and again by read()."""

    def __init__(self, exclude: set[int]) -> None:
        self.load = os.getloadavg()[0]
        self.exclude = exclude  # the benchmark's own processes that are neither moto nor other
        self.processes = _ticks_by_kind(exclude)
        self.host = _host_ticks()
        self.cpu = _own_cpu()
        self.started = time.perf_counter()

    def read(self) -> Clocks:
        seconds = time.perf_counter() - self.started
        cpu = _own_cpu() - self.cpu
        busy, ticks = (now - then for now, then in zip(_host_ticks(), self.host, strict=True))
        spent = dict.fromkeys(("other", "helper"), 0)
        for pid, (kind, n) in _ticks_by_kind(self.exclude).items():
            if pid in self.processes:  # processes that started meanwhile are not counted
                spent[kind] += n - self.processes[pid][1]
        return Clocks(
            seconds=seconds, cpu_seconds=cpu, host_busy=busy / max(1, ticks),
            other_cpu=spent["other"] / _CLOCK_TICKS, moto_cpu=spent["helper"] / _CLOCK_TICKS,
            load_before=self.load,
        )  # fmt: skip


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM).

    Not ``ru_maxrss``: Linux carries the parent's peak across fork and exec into it.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _host_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def _ticks_by_kind(exclude: set[int]) -> dict[int, tuple[str, int]]:
    """CPU ticks so far of every process but this one, ``exclude`` and PostgreSQL's, by kind.

    "helper": the benchmark's own other processes (the moto server); "other": other work on
    the machine, which competes for its two cores.
    """
    table = {pid: stat for pid in _pids() if (stat := _stat(pid)) is not None}
    ours = _descendants(table, {os.getppid()})
    return {
        pid: ("helper" if pid in ours else "other", ticks)
        for pid, (_, comm, ticks) in table.items()
        if pid != os.getpid() and pid not in exclude and comm != "postgres"
    }


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, command name, user + system ticks) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), comm, int(fields[11]) + int(fields[12])


def _descendants(table: dict[int, tuple[int, str, int]], roots: set[int]) -> set[int]:
    found = set(roots)
    while True:
        more = {pid for pid, (parent, _, _) in table.items() if parent in found} - found
        if not more:
            return found
        found |= more


def _tenths(seconds: Sequence[float]) -> tuple[float, float]:
    if not seconds:
        return 0.0, 0.0
    tenth = max(1, len(seconds) // 10)
    return statistics.fmean(seconds[:tenth]), statistics.fmean(seconds[-tenth:])


def run_options(spec: Spec) -> RunOptions:
    """archiver's options for one measurement, as the CLI would make them."""
    from archiver import RunOptions
    from archiver.source.engine import DatabaseOptions

    return RunOptions(
        database=DatabaseOptions(Target.parse(spec.database_url).async_url),
        storage_url=spec.storage_url,
        storage_options=spec.storage_options,
        retention_period=RETENTION,
        batch_size=spec.batch_size,
        batch_interval=0,
        dry_run=False,
        now=NOW,
    )


def archive(spec: Spec) -> Work:
    """One archiver run through its library entry point."""
    from archiver import run

    report = asyncio.run(run(run_options(spec)))
    stages = {s: sum(b.stages.get(s, 0.0) for b in report.batches) for s in STAGES}
    return Work([b.seconds for b in report.batches], report.bytes, stages, report.rows)


def prefect_vacuum(spec: Spec) -> Work:
    """Prefect's db_vacuum (:mod:`benchmarks.peer`); its settings came in the environment."""
    phases, drift = vacuum(NOW - RETENTION)
    return Work([], stages=phases | {"cutoff drift s": drift})


# --------------------------------------------------------------------------------------------
# The bare delete
# --------------------------------------------------------------------------------------------

_EXPIRED = (
    "parent_task_run_id IS NULL AND end_time IS NOT NULL AND end_time < {cutoff}"
    " AND state_type IN ('COMPLETED', 'FAILED', 'CANCELLED', 'CRASHED')"
)


@dataclass(frozen=True)
class BareSql:
    """The bare delete's statements in one dialect; ``ids`` is one bound list of ids."""

    begin: str
    roots: str
    tree: str
    match: str  # "{column} <is one of> <the bound list :ids>"
    pack: Callable[[list[Any]], object]
    cutoff: object

    def tasks(self) -> str:
        return f"SELECT id FROM task_run WHERE {self.match.format(column='flow_run_id')}"

    def deletes(self) -> list[tuple[str, str]]:
        """(statement, which ids): logs and artifacts by run and task run, then flow runs."""
        return [
            (f"DELETE FROM {table} WHERE {self.match.format(column=column)}", which)
            for table in ("log", "artifact")
            for column, which in (("flow_run_id", "runs"), ("task_run_id", "tasks"))
        ] + [(f"DELETE FROM flow_run WHERE {self.match.format(column='id')}", "runs")]


def _postgres_sql() -> BareSql:
    # LATERAL ... OFFSET 0 keeps each recursive step an index lookup (performance notes, 2.).
    tree = """
        WITH RECURSIVE tree(id) AS (
            SELECT unnest(%(ids)s::uuid[])
            UNION ALL
            SELECT child.id FROM tree CROSS JOIN LATERAL (
                SELECT flow_run.id FROM task_run
                JOIN flow_run ON flow_run.parent_task_run_id = task_run.id
                WHERE task_run.flow_run_id = tree.id OFFSET 0
            ) AS child
        )
        SELECT id FROM tree"""
    roots = (
        f"SELECT id FROM flow_run WHERE {_EXPIRED.format(cutoff='%(cutoff)s')}"
        " ORDER BY end_time LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
    )
    match = "{column} = ANY(%(ids)s::uuid[])"
    return BareSql("BEGIN", roots, tree, match, list, NOW - RETENTION)


def _sqlite_sql() -> BareSql:
    tree = """
        WITH RECURSIVE tree(id) AS (
            SELECT value FROM json_each(:ids)
            UNION ALL
            SELECT flow_run.id FROM tree
            JOIN task_run ON task_run.flow_run_id = tree.id
            JOIN flow_run ON flow_run.parent_task_run_id = task_run.id
        )
        SELECT id FROM tree"""
    roots = f"SELECT id FROM flow_run WHERE {_EXPIRED.format(cutoff=':cutoff')}"
    roots += " ORDER BY end_time LIMIT :limit"
    match = "{column} IN (SELECT value FROM json_each(:ids))"
    cutoff = (NOW - RETENTION).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    return BareSql("BEGIN IMMEDIATE", roots, tree, match, json.dumps, cutoff)


def bare_delete(spec: Spec) -> Work:
    """Delete every expired tree, batch by batch; return the seconds of each batch."""
    target = Target.parse(spec.database_url)
    if target.dialect == "sqlite":
        with closing(sqlite3.connect(target.sqlite_path, isolation_level=None)) as lite:
            lite.execute("PRAGMA foreign_keys=ON")
            lite.execute("PRAGMA busy_timeout=60000")
            return Work(_delete_batches(_sqlite_execute(lite), _sqlite_sql(), spec.batch_size))
    with _postgres_session(target) as pg:
        return Work(_delete_batches(_postgres_execute(pg), _postgres_sql(), spec.batch_size))


def _postgres_session(target: Target) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(
        host=target.url.host,
        port=target.url.port,
        user=target.url.username,
        password=target.url.password,
        dbname=target.url.database,
        autocommit=True,  # transactions are explicit BEGIN / COMMIT, as on SQLite
        options="-c random_page_cost=1.1 -c jit=off",
    )


def _postgres_execute(conn: psycopg.Connection[tuple[Any, ...]]) -> Execute:
    def execute(statement: str, params: dict[str, object]) -> Rows:
        cursor = conn.execute(statement.encode(), params)
        return cursor.fetchall() if cursor.description else []

    return execute


def _sqlite_execute(conn: sqlite3.Connection) -> Execute:
    def execute(statement: str, params: dict[str, object]) -> Rows:
        return conn.execute(statement, params).fetchall()

    return execute


#: What the child does for each method.
WORK: dict[str, Callable[[Spec], Work]] = {
    BARE: bare_delete,
    ARCHIVER: archive,
    VACUUM: prefect_vacuum,
}


def _delete_batches(execute: Execute, sql: BareSql, batch_size: int) -> list[float]:
    seconds: list[float] = []
    while True:
        started = time.perf_counter()
        if not _delete_batch(execute, sql, batch_size):
            return seconds
        seconds.append(time.perf_counter() - started)


def _delete_batch(execute: Execute, sql: BareSql, batch_size: int) -> bool:
    """One transaction: lock roots, walk their trees, delete. False when none are left."""
    execute(sql.begin, {})
    try:
        roots = [r for (r,) in execute(sql.roots, {"cutoff": sql.cutoff, "limit": batch_size})]
        if roots:
            runs = [r for (r,) in execute(sql.tree, {"ids": sql.pack(roots)})]
            tasks = [t for (t,) in execute(sql.tasks(), {"ids": sql.pack(runs)})]
            ids = {"runs": sql.pack(runs), "tasks": sql.pack(tasks)}
            for statement, which in sql.deletes():
                execute(statement, {"ids": ids[which]})
    except BaseException:
        execute("ROLLBACK", {})
        raise
    execute("COMMIT", {})
    return bool(roots)


# --------------------------------------------------------------------------------------------
# Templates and copies
# --------------------------------------------------------------------------------------------


def _template_key(runs: int) -> str:
    generator = hashlib.sha256((HERE / "generate.py").read_bytes()).hexdigest()[:12]
    return (
        f"benchmarks.run template: runs={runs} seed={SEED} fraction={EXPIRED_FRACTION}"
        f" now={NOW.isoformat()} generator={generator}"
    )


def _generate(url: str, runs: int) -> None:
    _say(f"generating {url} with {runs} top-level runs (once; reused later)")
    create_schema(url)
    generate(url, runs, expired_fraction=EXPIRED_FRACTION, now=NOW, seed=SEED)


def sqlite_template(runs: int, fresh: bool) -> Path:
    """The SQLite template for ``runs``, made unless a matching marker says it exists."""
    path, marker = DATA / f"tpl-{runs}.db", DATA / f"tpl-{runs}.json"
    key = _template_key(runs)
    if not fresh and path.is_file() and marker.is_file() and marker.read_text() == key:
        return path
    marker.unlink(missing_ok=True)
    partial = DATA / f".tpl-{runs}.partial.db"
    _remove_sqlite(path)
    _remove_sqlite(partial)
    _generate(f"sqlite:///{partial}", runs)  # the last connection closed: WAL checkpointed
    partial.rename(path)
    marker.write_text(key)
    return path


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def postgres_template(server: str, runs: int, fresh: bool) -> str:
    """The PostgreSQL template database for ``runs``; its comment is the marker."""
    name, key = f"bench_tpl_{runs}", _template_key(runs)
    with _admin(server) as admin:
        found = admin.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (name,),
        ).fetchone()
        if not fresh and found is not None and found[0] == key:
            return name
        admin.execute(_drop(name))
    _generate(f"{server}/{name}", runs)
    with _admin(server) as admin:
        comment = pgsql.SQL("COMMENT ON DATABASE {} IS {}")
        admin.execute(comment.format(pgsql.Identifier(name), pgsql.Literal(key)))
    return name


def _admin(server: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(f"{server}/postgres", autocommit=True)


def _drop(name: str) -> pgsql.Composed:
    return pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name))


@contextmanager
def database_copy(backend: str, template: str, server: str) -> Iterator[str]:
    """A fresh copy of the template for one measurement; yields its sync URL."""
    label = f"{os.getpid()}_{uuid.uuid4().hex[:8]}"
    if backend == "sqlite":
        path = DATA / f"copy-{label}.db"
        shutil.copyfile(template, path)
        try:
            yield f"sqlite:///{path}"
        finally:
            _remove_sqlite(path)
        return
    name = f"bench_copy_{label}"
    _create_copy(server, name, template)
    try:
        yield f"{server}/{name}"
    finally:
        with _admin(server) as admin:
            admin.execute(_drop(name))


def _create_copy(server: str, name: str, template: str, attempts: int = 10) -> None:
    """CREATE DATABASE ... TEMPLATE; retried while a session (autovacuum) is on the template.

    FILE_COPY copies the files after a checkpoint, so no measurement pays for the copy's WAL.
    """
    create = pgsql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
        pgsql.Identifier(name), pgsql.Identifier(template)
    )
    for attempt in range(attempts):
        try:
            with _admin(server) as admin:
                admin.execute(create)
            return
        except psycopg.errors.ObjectInUse:
            if attempt == attempts - 1:
                raise
            time.sleep(1)


# --------------------------------------------------------------------------------------------
# Storage: a local folder, or a bucket on a moto server in its own process
# --------------------------------------------------------------------------------------------


@contextmanager
def moto_server() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of ``python -m moto.server`` in a child process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_for(endpoint, server)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for(endpoint: str, server: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if server.poll() is not None:
            raise RuntimeError(f"the moto server exited with {server.returncode}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the moto server at {endpoint} did not answer")


@contextmanager
def archive_root(storage: str, endpoint: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(storage_url, storage_options) of an empty archive root, removed afterwards."""
    if storage == "local":
        folder = tempfile.mkdtemp(prefix="archive-", dir=DATA)
        try:
            yield folder, {}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    if endpoint is None:
        raise ValueError(f"unknown storage {storage!r}")
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    _s3_client(endpoint).create_bucket(Bucket=bucket)
    options = S3_CREDENTIALS | {
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": S3_REGION},
    }
    try:
        yield f"s3://{bucket}/archive", options
    finally:  # moto keeps objects in memory: drop everything between measurements
        reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset, timeout=60).close()


def _s3_client(endpoint: str) -> Any:
    import boto3  # type: ignore[import-untyped]

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_CREDENTIALS["key"],
        aws_secret_access_key=S3_CREDENTIALS["secret"],
        region_name=S3_REGION,
    )


# --------------------------------------------------------------------------------------------
# The parent: templates, copies, children, in order
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    runs: int
    backends: list[str]
    storages: list[str]
    batch_size: int
    repeat: int
    fresh: bool
    postgres: str
    vacuum: bool = True  # also Prefect's db_vacuum, on PostgreSQL

    def methods(self, backend: str) -> list[tuple[str, str]]:
        """(method, storage) of every measurement on ``backend``, in the order they run."""
        methods = [(BARE, ""), *((ARCHIVER, storage) for storage in self.storages)]
        return methods + ([(VACUUM, "")] if self.vacuum and backend == "postgres" else [])


def run_all(plan: Plan) -> tuple[list[Result], dict[str, float]]:
    """Every measurement of the plan; also returns how long making the templates took."""
    results: list[Result] = []
    with ExitStack() as stack:
        endpoint = stack.enter_context(moto_server()) if "s3" in plan.storages else None
        started = time.perf_counter()
        templates = {backend: _template(plan, backend) for backend in plan.backends}
        prepared = {"templates": time.perf_counter() - started}
        if plan.fresh:
            stack.callback(_remove_templates, plan, templates)
        for round_ in range(plan.repeat):
            for backend in plan.backends:
                for method, storage in plan.methods(backend):
                    spec = Spec(backend, method, storage, "", plan.batch_size)
                    results.append(_measure_copy(plan, spec, templates[backend], endpoint))
                    results[-1].round = round_
    return results, prepared


def _template(plan: Plan, backend: str) -> str:
    if backend == "sqlite":
        return str(sqlite_template(plan.runs, plan.fresh))
    return postgres_template(plan.postgres, plan.runs, plan.fresh)


def _remove_templates(plan: Plan, templates: dict[str, str]) -> None:
    for backend, template in templates.items():
        if backend == "sqlite":
            _remove_sqlite(Path(template))
            Path(template).with_suffix(".json").unlink(missing_ok=True)
        else:
            with _admin(plan.postgres) as admin:
                admin.execute(_drop(template))


def _measure_copy(plan: Plan, spec: Spec, template: str, endpoint: str | None) -> Result:
    with ExitStack() as stack:
        url = stack.enter_context(database_copy(spec.backend, template, plan.postgres))
        storage_url, options = "", dict[str, Any]()
        if spec.storage:
            storage_url, options = stack.enter_context(archive_root(spec.storage, endpoint))
        spec = Spec(spec.backend, spec.method, spec.storage, url, spec.batch_size,
                    storage_url, options)  # fmt: skip
        _say(f"measuring {spec.label} ...")
        result = _in_child(spec)
        _say(f"  {result.seconds:.1f} s, {result.total:,} rows, {result.batches} batches")
        return result


def _in_child(spec: Spec) -> Result:
    """Run :func:`measure` in a fresh interpreter; its last stdout line is the result.

    The vacuum's child gets Prefect's server settings in its environment (this process keeps
    its own), and a PREFECT_HOME of its own.
    """
    command = [sys.executable, "-m", "benchmarks.run", "_measure", json.dumps(asdict(spec))]
    with tempfile.TemporaryDirectory(prefix="prefect-home-") as home:
        env = os.environ.copy()
        if spec.method == VACUUM:
            env |= vacuum_environment(spec.database_url, NOW - RETENTION, spec.batch_size, home)
        done = subprocess.run(
            command, cwd=HERE.parent, env=env, capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"{spec.label} failed:\n{done.stderr[-4000:]}")
    return Result(**json.loads(done.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _machine(plan: Plan) -> dict[str, Any]:
    facts: dict[str, Any] = {"archiver": _revision(), "cores": os.cpu_count()}
    facts |= {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    if "postgres" in plan.backends:
        with _admin(plan.postgres) as admin:
            found = admin.execute("SHOW server_version").fetchone()
            facts["postgresql"] = str(found[0]).split()[0] if found else "?"
    return facts


def _revision() -> str:
    """The commit measured, ``+dirty`` when archiver/ has uncommitted changes."""
    git = ["git", "-C", str(HERE.parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "archiver"], capture_output=True)
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def report(
    plan: Plan, machine: dict[str, Any], results: list[Result], seconds: dict[str, float]
) -> str:
    """The tables, also written with the raw results to benchmarks/results/."""
    rows = representative(results)
    sampler = sum(r.sampler_cpu for r in results)
    parts = [
        f"{plan.runs:,} top-level runs, batch size {plan.batch_size}, retention "
        f"{RETENTION.days} days, repeat {plan.repeat} (median shown); "
        + ", ".join(f"{k} {v}" for k, v in machine.items()),
        headline_table(results), rows_table(results), stages_table(rows), vacuum_table(rows),
        f"templates ready in {seconds['templates']:.1f} s; whole benchmark "
        f"{seconds['total']:.1f} s; the backend CPU sampler used {sampler:.1f} s of CPU",
    ]  # fmt: skip
    text = "\n\n".join(part for part in parts if part)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-{plan.runs}.json"
    raw = {"plan": asdict(plan), "machine": machine, "seconds": seconds, "tables": text,
           "results": [r.raw(results) for r in results]}  # fmt: skip
    out.write_text(json.dumps(raw, indent=1) + "\n")
    return text + f"\n\n(written to {out.relative_to(HERE.parent)})"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parse_args(argv: Sequence[str]) -> Plan:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Measure archiver against a tree-aware bare delete of the same rows"
        " and Prefect's db_vacuum.",
    )
    parser.add_argument("--runs", type=int, required=True, help="top-level flow runs")
    parser.add_argument("--backends", default="sqlite,postgres", help="sqlite,postgres")
    parser.add_argument("--storages", default="local,s3", help="local,s3 (archiver's target)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1, help="measure each this many times")
    parser.add_argument("--fresh", action="store_true", help="new templates, removed after")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument(
        "--no-vacuum", action="store_true", help="leave out Prefect's db_vacuum on PostgreSQL"
    )
    args = parser.parse_args(argv)
    backends, storages = args.backends.split(","), args.storages.split(",")
    if not set(backends) <= {"sqlite", "postgres"} or not set(storages) <= {"local", "s3", ""}:
        parser.error("backends are sqlite and postgres; storages are local and s3")
    if args.runs < 1 or args.repeat < 1 or not 1 <= args.batch_size <= 1000:
        parser.error("--runs and --repeat must be positive, --batch-size 1 to 1000")
    return Plan(args.runs, backends, [s for s in storages if s], args.batch_size,
                args.repeat, args.fresh, args.postgres.rstrip("/"),
                vacuum=not args.no_vacuum)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_measure"]:  # the child's side
        print(json.dumps(asdict(measure(Spec(**json.loads(argv[1]))))))
        return 0
    plan = _parse_args(argv)
    DATA.mkdir(exist_ok=True)
    started, machine = time.perf_counter(), _machine(plan)
    results, seconds = run_all(plan)
    seconds["total"] = time.perf_counter() - started
    print(report(plan, machine, results, seconds))
    if not all_consistent(results):
        _say("archiver and the bare delete did not remove (or leave) the same rows")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
