"""Measured paths for PostgreSQL: how a batch's rows can be read, removed and decoded.

Usage::

    python -m benchmarks.pg_paths --runs 10000
    python -m benchmarks.pg_paths --runs 10000 --variants bare,today,mixed-adbc --repeat 2

Each variant runs on a fresh copy of the ``benchmarks.run`` template (made there if missing),
over every expired top-level run, one batch of ``--batch-size`` roots at a time (oldest first
by ``end_time``, as the bare delete takes them). A batch is one transaction on one connection:
lock the roots ``FOR UPDATE SKIP LOCKED``, walk their trees (the bare delete's recursive
query), then the variant's reads and deletes, then COMMIT. What differs:

``bare``
    asyncpg; deletes logs and artifacts by run and task-run id, then the flow runs (cascade).
    Reads nothing: the floor, and the baseline of every ratio.
``today``
    archiver's path now: ``COPY (SELECT ...) TO STDOUT (FORMAT csv, FORCE_QUOTE *)`` per
    table through asyncpg, parsed by ``archiver.source.copy_csv.from_csv`` into Arrow; flow runs
    and task runs read ``FOR UPDATE``; then DELETE by primary key (logs, caches), one
    statement counting what the flow-run DELETE will cascade into, flow runs by id (the
    cascade removes task runs, states, inputs), artifacts by id. Every count checked. The
    lookups are gather()'s; what archiver does besides (state and legal-hold checks, the
    new-subflow check, artifact collections, the ledger) is left out of every variant.
``children-first``
    flow runs read by ``COPY (SELECT ... FOR UPDATE)`` first, task runs locked; then every
    other table by ``COPY (DELETE ... RETURNING ...) TO STDOUT`` (CSV), children first: logs,
    caches, task-run states, inputs, flow-run states (each fires ``ON DELETE SET NULL`` on
    ``flow_run.state_id``: an UPDATE of its flow run), task runs (a subflow's
    ``parent_task_run_id`` is set NULL), then flow runs by id and artifacts returned last.
    The flow runs must be read before: returned after those SET NULLs, they would carry NULL
    ``state_id`` and ``parent_task_run_id`` (see ``children-first-naive``).
``children-first-naive``
    as ``children-first`` but the flow runs are also taken by DELETE RETURNING, at the end:
    one pass for every table, and the archive it makes differs from ``today``'s (checked).
``mixed`` / ``mixed-binary``
    one pass where it is exact: logs, caches, task-run states and inputs by DELETE RETURNING;
    task runs and flow-run states (which no DELETE RETURNING can take before their flow runs
    without a SET NULL on a row still to be archived) read by ``COPY (SELECT)``, task runs
    ``FOR UPDATE``, flow runs locked ``FOR UPDATE``; their counts checked; then ``COPY (DELETE
    FROM flow_run ... RETURNING ...)`` (its cascade takes the task runs and flow-run states
    read before); artifacts returned last. ``mixed-binary`` is the same statements as
    ``FORMAT binary``, not decoded (no Python decoder for binary COPY is at hand), to show
    PostgreSQL's side of binary against CSV; the ids it needs come from two small queries.
``today-adbc`` / ``mixed-adbc``
    ``today`` and ``mixed`` through ADBC (``adbc_driver_postgresql``: libpq, binary COPY
    decoded into Arrow in C++); UUIDs selected as text and intervals as microseconds in SQL,
    the rest converted in Arrow (``benchmarks.pg_sessions.to_archive_types``).

For each variant it reports the work's wall time, this process's CPU (``time.process_time``:
every thread) and the CPU of the one PostgreSQL backend serving it (``/proc/<pid>/stat``,
:mod:`benchmarks.backend_cpu`), per million rows removed; per step (``select``: roots and tree
ids; ``read``: COPY SELECT; ``returning``: DELETE RETURNING; ``delete``: plain DELETEs and
count checks; ``decode``: CSV parsing or Arrow conversion; ``commit``); and, timed apart,
**encode**: the batch's Arrow tables to Parquet (zstd, no dictionary) with archiver's own
``codec.to_arrow`` and ``codec.encode_table``, which also checks that the table has exactly the
archive's column types. Untimed, after each batch: a digest of each table's Parquet bytes with
the rows sorted by id, so each variant's archive is compared with ``today``'s batch by batch;
and after the run, the rows per table left in the database, compared with ``bare``'s.

It also checks, once, what ADBC does with one transaction and which Arrow types it gives for
each PostgreSQL type (:mod:`benchmarks.adbc_checks`). The sessions (one connection, the same
calls through asyncpg or ADBC) are in :mod:`benchmarks.pg_sessions`, the variants' statements
in :mod:`benchmarks.pg_plans`. Each variant runs in a child process of its own
(``python -m benchmarks.pg_paths _variant ...``), so its CPU and peak RSS are its own; results
go to ``benchmarks/results/<date>-<runs>-pg-paths.json``. ADBC comes with the ``bench`` extra
(``pip install -e '.[test,bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import pyarrow as pa

from archiver.archive import codec
from archiver.models import TableRows, TableShape
from benchmarks import run as bench
from benchmarks.adbc_checks import adbc_transaction_check, adbc_types
from benchmarks.backend_cpu import backend_ticks, cpu_seconds
from benchmarks.generate import Target, count_rows
from benchmarks.pg_plans import TREE, VARIANTS, Batch, Variant, roots_sql, tree_sql
from benchmarks.pg_sessions import STEPS, AdbcSession, AsyncpgSession, Session


@dataclass
class Measured:
    """What one variant did, summed over its batches."""

    variant: str
    driver: str
    batches: int = 0
    seconds: float = 0.0  # the batches' work: statements, decoding, commits
    cpu: float = 0.0  # this process, every thread, during the work
    backend_cpu: float = 0.0  # the backend serving the connection, during the work
    encode_seconds: float = 0.0  # Parquet, timed apart from the work
    encode_cpu: float = 0.0
    parquet_bytes: int = 0
    archived: dict[str, int] = field(default_factory=dict)  # rows the variant decoded
    removed: dict[str, int] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)
    step_seconds: dict[str, float] = field(default_factory=dict)
    step_backend_cpu: dict[str, float] = field(default_factory=dict)
    table_seconds: dict[str, float] = field(default_factory=dict)  # "<step> <table>"
    table_backend_cpu: dict[str, float] = field(default_factory=dict)
    digests: list[dict[str, str]] = field(default_factory=list)  # per batch, per table
    peak_rss_mb: float = 0.0
    error: str = ""

    @property
    def total(self) -> int:
        return sum(self.removed.values())

    def per_million(self, seconds: float) -> float:
        return seconds / max(self.total, 1) * 1e6


def open_session(driver: str, url: str) -> Session:
    if driver == "adbc":
        return AdbcSession(url)
    return AsyncpgSession(url, driver.removeprefix("asyncpg-"))


def reflect(url: str) -> dict[str, TableShape]:
    """The tree tables' shapes, as archiver reflects them."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from archiver.source.schema import inspect_schema

    async def shapes() -> dict[str, TableShape]:
        engine = create_async_engine(Target.parse(url).async_url)
        try:
            async with engine.connect() as conn:
                schema = await inspect_schema(conn)
        finally:
            await engine.dispose()
        return {table: schema.shape(table) for table in TREE}

    return asyncio.run(shapes())


def counts(url: str) -> dict[str, int]:
    """Rows per table, the cache table included (benchmarks.generate counts the others)."""
    found = count_rows(url)
    with Target.parse(url).connect_postgres() as conn:
        row = conn.execute("SELECT count(*) FROM task_run_state_cache").fetchone()
    return found | {"task_run_state_cache": int(str(row[0])) if row else 0}


def measure(name: str, url: str, batch_size: int) -> Measured:
    """Run ``name`` over every expired root of the database at ``url``."""
    variant = VARIANTS[name]
    shapes, before = reflect(url), counts(url)
    session = open_session(variant.driver, url)
    found = Measured(name, variant.driver)
    try:
        _batches(found, variant, session, shapes, batch_size)
    finally:
        session.close()
    found.step_seconds = dict(session.steps.wall)
    found.step_backend_cpu = {k: cpu_seconds(v) for k, v in session.steps.ticks.items()}
    found.table_seconds = dict(session.steps.table_wall)
    found.table_backend_cpu = {k: cpu_seconds(v) for k, v in session.steps.table_ticks.items()}
    found.left = counts(url)
    found.removed = {table: n - found.left[table] for table, n in before.items()}
    found.peak_rss_mb = bench._peak_rss_mb()
    return found


def _batches(
    found: Measured, variant: Variant, session: Session, shapes: dict[str, TableShape], size: int
) -> None:
    pid, next_roots = session.steps.pid, roots_sql(size)
    while True:
        ticks, cpu, started = backend_ticks(pid) or 0, time.process_time(), time.perf_counter()
        session.steps.table = ""
        session.begin()
        roots = session.ids(next_roots)
        batch = Batch(session, shapes, [], uuid_text=variant.driver == "adbc")
        if roots:
            batch.runs = session.ids(tree_sql(roots))
            variant.plan(batch)
        tables = {t: batch.archived(t) for t in TREE} if roots and session.decodes else {}
        session.steps.table = ""
        session.commit()
        found.seconds += time.perf_counter() - started
        found.cpu += time.process_time() - cpu
        found.backend_cpu += cpu_seconds((backend_ticks(pid) or 0) - ticks)
        if not roots:
            return
        found.batches += 1
        if tables and variant.name != "bare":
            _encode(found, tables, shapes)


def _encode(found: Measured, tables: dict[str, pa.Table], shapes: dict[str, TableShape]) -> None:
    """Parquet as archiver writes it (timed), then a digest of each table sorted by id."""
    cpu, started = time.process_time(), time.perf_counter()
    for table, rows in tables.items():
        metadata = {"table": table}
        found.parquet_bytes += len(
            codec.encode_table(codec.to_arrow(TableRows(shapes[table], table=rows), metadata)).data
        )
    found.encode_seconds += time.perf_counter() - started
    found.encode_cpu += time.process_time() - cpu
    digests = {}
    for table, rows in tables.items():
        found.archived[table] = found.archived.get(table, 0) + rows.num_rows
        ordered = TableRows(shapes[table], table=rows.sort_by("id"))
        digests[table] = hashlib.sha256(
            codec.encode_table(codec.to_arrow(ordered, {})).data
        ).hexdigest()
    found.digests.append(digests)


# --------------------------------------------------------------------------------------------
# The parent: copies, children, tables
# --------------------------------------------------------------------------------------------


def _in_child(name: str, url: str, batch_size: int) -> Measured:
    command = [sys.executable, "-m", "benchmarks.pg_paths", "_variant", name, url, str(batch_size)]
    done = subprocess.run(
        command, cwd=bench.HERE.parent, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return Measured(name, VARIANTS[name].driver, error=done.stderr.strip().splitlines()[-1])
    return Measured(**json.loads(done.stdout.strip().splitlines()[-1]))


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def figures_table(rounds: list[dict[str, Measured]]) -> str:
    """One row per variant: the round with its median ratio to bare (bare: median work time),
    and in brackets the range over rounds of each ratio (always to bare and today of the same
    round)."""
    header = [
        "variant", "driver", "work s", "x bare", "x today", "work+encode x bare",
        "rows removed", "process CPU s", "per M rows", "PG CPU s", "per M rows", "encode s",
        "encode CPU s", "per M rows", "Parquet MB", "peak RSS MB", "archive = today's",
        "left = bare's",
    ]  # fmt: skip
    body = []
    for name in rounds[0]:
        runs = [(r, r[name]) for r in rounds if not r[name].error]
        if not runs:
            body.append([name, rounds[0][name].driver, f"failed: {rounds[0][name].error[:150]}"])
            continue
        found, m = sorted(runs, key=_against_bare)[(len(runs) - 1) // 2]
        body.append([
            m.variant, m.driver, f"{m.seconds:.2f}", _ratio(runs, found, "bare"),
            _ratio(runs, found, "today"), _ratio(runs, found, "bare", encode=True),
            f"{m.total:,}", f"{m.cpu:.2f}",
            f"{m.per_million(m.cpu):.2f}", f"{m.backend_cpu:.2f}",
            f"{m.per_million(m.backend_cpu):.2f}", f"{m.encode_seconds:.2f}",
            f"{m.encode_cpu:.2f}", f"{m.per_million(m.encode_cpu):.2f}",
            f"{m.parquet_bytes / 1e6:.1f}", f"{m.peak_rss_mb:.0f}",
            _same_archive(m, found.get("today")), _same_left(m, found.get("bare")),
        ])  # fmt: skip
    return _table(header, body)


Round = dict[str, Measured]


def _against_bare(pair: tuple[Round, Measured]) -> float:
    found, mine = pair
    bare = found.get("bare")
    if bare is None or bare.error or not bare.seconds or mine is bare:
        return mine.seconds
    return mine.seconds / bare.seconds


def _ratio(
    runs: list[tuple[Round, Measured]], shown: Round, base: str, *, encode: bool = False
) -> str:
    """The shown round's work time (plus encode) over ``base``'s, and the range over rounds."""

    def one(found: Round, mine: Measured) -> float | None:
        other = found.get(base)
        if other is None or other.error or not other.seconds:
            return None
        return (mine.seconds + (mine.encode_seconds if encode else 0.0)) / other.seconds

    value = next((one(r, m) for r, m in runs if r is shown), None)
    every = [v for r, m in runs if (v := one(r, m)) is not None]
    if value is None:
        return "-"
    return f"{value:.2f}x" + (f" ({min(every):.2f}-{max(every):.2f})" if len(every) > 1 else "")


def _same_archive(m: Measured, today: Measured | None) -> str:
    if m.variant == "bare":
        return "-"
    if not m.digests:
        return "not decoded"
    if today is None or not today.digests:
        return "?"
    differ = sorted(
        {t for mine, theirs in zip(m.digests, today.digests, strict=False)
         for t in mine if mine.get(t) != theirs.get(t)}
    )  # fmt: skip
    if len(m.digests) != len(today.digests):
        differ.append("batches")
    return "yes" if not differ else "**NO**: " + ", ".join(differ)


def _same_left(m: Measured, bare: Measured | None) -> str:
    if bare is None or bare.error:
        return "?"
    differ = [t for t in bare.left if bare.left[t] != m.left.get(t)]
    return "yes" if not differ else "**NO**: " + ", ".join(differ)


def steps_table(rounds: list[dict[str, Measured]]) -> str:
    """Wall seconds and backend CPU per step, of the last round (sums of the batches; the
    backend's ticks are read before and after each statement, so each step is counted to
    within a tick, 10 ms, per statement)."""
    header = ["variant", *(f"{s} s" for s in STEPS), *(f"{s} PG CPU" for s in STEPS)]
    body = [
        [m.variant, *(f"{m.step_seconds.get(s, 0):.2f}" for s in STEPS),
         *(f"{m.step_backend_cpu.get(s, 0):.2f}" for s in STEPS)]
        for m in rounds[-1].values()
        if not m.error
    ]  # fmt: skip
    return _table(header, body)


def per_table(rounds: list[dict[str, Measured]]) -> str:
    """Seconds and backend CPU per step and table (``wall / PG CPU``), of the last round."""
    found = [m for m in rounds[-1].values() if not m.error]
    keys = sorted({k for m in found for k in m.table_seconds if " " in k})
    body = [
        [key, *(f"{m.table_seconds[key]:.2f} / {m.table_backend_cpu[key]:.2f}"
                if key in m.table_seconds else "" for m in found)]
        for key in keys
    ]  # fmt: skip
    return _table(["step and table (s / PG CPU s)", *(m.variant for m in found)], body)


def stored(m: Measured, found: Round) -> dict[str, object]:
    """A variant's figures for the results file: the per-batch digests (most of its size)
    replaced by what they showed."""
    return asdict(m) | {
        "digests": [],
        "archive_same_as_today": _same_archive(m, found.get("today")),
        "left_same_as_bare": _same_left(m, found.get("bare")),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_variant"]:  # the child's side
        found = measure(argv[1], argv[2], int(argv[3]))
        print(json.dumps(asdict(found)))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pg_paths", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--runs", type=int, default=10_000, help="top-level runs of the template")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, in order")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    if unknown := set(names) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    server = args.postgres.rstrip("/")
    bench.DATA.mkdir(exist_ok=True)
    template = bench.postgres_template(server, args.runs, fresh=False)
    with bench.database_copy("postgres", template, server) as url:
        shapes = reflect(url)
        types, checks = adbc_types(url, shapes), adbc_transaction_check(url)
    rounds: list[dict[str, Measured]] = []
    for _ in range(args.repeat):
        rounds.append({})
        for name in names:
            with bench.database_copy("postgres", template, server) as url:
                bench._say(f"measuring {name} ...")
                rounds[-1][name] = _in_child(name, url, args.batch_size)
    plan = bench.Plan(args.runs, ["postgres"], [], args.batch_size, args.repeat, False, server)
    machine = ", ".join(f"{k} {v}" for k, v in bench._machine(plan).items())
    types_header = ["archive kind", "PostgreSQL type", "ADBC gives", "archive type"]
    text = "\n\n".join([
        f"{args.runs:,} top-level runs, batch size {args.batch_size}, one transaction per "
        f"batch on one connection; {machine}",
        figures_table(rounds), steps_table(rounds), per_table(rounds),
        _table(types_header, [list(t) for t in types]),
        _table(["ADBC transaction check", "holds"],
               [[c, "yes" if ok else "**NO**"] for c, ok in checks]),
    ])  # fmt: skip
    out = bench.RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-{args.runs}-pg-paths.json"
    bench.RESULTS.mkdir(exist_ok=True)
    raw = {
        "args": vars(args),
        "tables": text,
        "rounds": [[stored(m, r) for m in r.values()] for r in rounds],
    }
    out.write_text(json.dumps(raw, indent=1) + "\n")
    print(text + f"\n\n(written to {out.relative_to(bench.HERE.parent)})")
    failed = [m.variant for r in rounds for m in r.values() if m.error]
    return 1 if failed or not all(ok for _, ok in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
