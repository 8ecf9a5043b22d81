"""What one measurement of :mod:`benchmarks.run` found, and the Markdown tables made of them.

Every ratio compares two measurements of the same repetition (round) of one invocation: a
shared two-core machine changes speed from minute to minute, so figures from different
invocations are not compared here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.generate import TABLES
from benchmarks.peer import PHASES, VACUUM

BARE = "bare delete"
ARCHIVER = "archiver"
STAGES = ("select", "encode", "upload", "verify", "delete", "commit", "manifest")
#: Tables whose rows the work removes (flow and deployment are only read).
REMOVED_FROM = TABLES[2:]


@dataclass
class Result:
    backend: str
    method: str  # BARE | ARCHIVER | VACUUM
    storage: str
    seconds: float  # wall time of the work alone (not the interpreter's start, not counting)
    removed: dict[str, int]  # rows per table: count before minus count after
    batches: int
    bytes: int  # Parquet written (archiver)
    stages: dict[str, float]  # archiver: stage times summed over its batches; vacuum: phases
    first_tenth: float  # mean seconds per batch over the first tenth of the batches
    last_tenth: float
    peak_rss_mb: float
    cpu_seconds: float  # the measuring process, all its threads (not PostgreSQL's backends)
    backend_cpu: float  # PostgreSQL: utime + stime of the backends that served the work
    backends: int  # how many backends those were (0 on SQLite)
    sampler_cpu: float  # the backend CPU sampler's own CPU (it shares the two cores)
    host_busy: float  # share of both cores busy meanwhile (every process)
    other_cpu: float  # CPU seconds of processes neither ours nor PostgreSQL's meanwhile
    moto_cpu: float  # CPU seconds of the moto server meanwhile
    load_before: float
    consistent: bool  # archiver's own row counts agree with the database's
    left: dict[str, int] = field(default_factory=dict)  # rows per table after the work
    round: int = 0  # which repetition (--repeat) this was

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.backend, self.method, self.storage)

    @property
    def total(self) -> int:
        return sum(self.removed.values())

    def per_million_rows(self, seconds: float) -> float:
        return seconds / max(self.total, 1) * 1e6

    @property
    def flatness(self) -> float:
        """Mean seconds per batch, last tenth of the batches over the first (1.0: flat)."""
        return self.last_tenth / self.first_tenth if self.first_tenth else 0.0

    def raw(self, results: Sequence[Result]) -> dict[str, Any]:
        """The stored fields, the derived figures and the ratios, for the JSON file."""
        return asdict(self) | {
            "cpu_per_million_rows": self.per_million_rows(self.cpu_seconds),
            "backend_cpu_per_million_rows": self.per_million_rows(self.backend_cpu),
            "flatness_last_over_first_tenth": self.flatness,
            "x_bare_delete": _ratio(results, self, BARE),
            "x_db_vacuum": _ratio(results, self, VACUUM),
        }


def _ratio(results: Sequence[Result], mine: Result, method: str) -> float | None:
    """Wall time of ``mine`` over that of ``method`` in the same round, if it was measured."""
    base = _base(results, mine, method, mine.round)
    return mine.seconds / base.seconds if base is not None else None


def _base(results: Sequence[Result], mine: Result, method: str, round_: int) -> Result | None:
    return next(
        (
            r
            for r in results
            if r.backend == mine.backend and r.method == method and r.round == round_
        ),
        None,
    )


def representative(results: Sequence[Result]) -> list[Result]:
    """Per (backend, method, storage), the run with the median wall time, in plan order."""
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for result in results:
        groups.setdefault(result.key, []).append(result)
    return [sorted(g, key=lambda r: r.seconds)[(len(g) - 1) // 2] for g in groups.values()]


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _what(result: Result) -> str:
    return f"{result.method} to {result.storage}" if result.storage else result.method


def _spread(values: Sequence[float], unit: str = "") -> str:
    return f" ({min(values):.2f}-{max(values):.2f}{unit})" if len(values) > 1 else ""


def _ratio_cell(results: Sequence[Result], shown: Result, method: str) -> str:
    """``shown``'s wall time over ``method``'s in its round, bold, and the range over rounds."""
    if shown.method == method:
        return "1.00x"
    ratio = _ratio(results, shown, method)
    if ratio is None:
        return "-"
    every = [v for x in results if x.key == shown.key if (v := _ratio(results, x, method))]
    return f"**{ratio:.2f}x**{_spread(every, 'x')}"


def headline_table(results: Sequence[Result]) -> str:
    """One row per method (the median run), its ratios to the bare delete and to db_vacuum."""
    header = [
        "backend", "what", "wall s", "x bare delete", "x db_vacuum", "rows removed", "rows/s",
        "batches", "Parquet MB", "peak RSS MB", "CPU s", "CPU s per M rows", "PG CPU s",
        "PG CPU s per M rows", "moto CPU s", "host CPU busy", "other CPU s",
    ]  # fmt: skip
    body = []
    for r in representative(results):
        walls = [x.seconds for x in results if x.key == r.key]
        postgres = r.backend == "postgres"
        body.append([
            r.backend, _what(r), f"{r.seconds:.1f}{_spread(walls)}",
            _ratio_cell(results, r, BARE), _ratio_cell(results, r, VACUUM), f"{r.total:,}",
            f"{r.total / r.seconds:,.0f}", str(r.batches) if r.batches else "-",
            f"{r.bytes / 1e6:.1f}" if r.bytes else "-", f"{r.peak_rss_mb:.0f}",
            f"{r.cpu_seconds:.1f}", f"{r.per_million_rows(r.cpu_seconds):.2f}",
            f"{r.backend_cpu:.1f}" if postgres else "-",
            f"{r.per_million_rows(r.backend_cpu):.2f}" if postgres else "-",
            f"{r.moto_cpu:.1f}" if r.storage == "s3" else "-",
            f"{r.host_busy:.0%}", f"{r.other_cpu:.1f}",
        ])  # fmt: skip
    return _table(header, body)


def rows_table(results: Sequence[Result]) -> str:
    """Rows removed per table, and whether each run left exactly what the bare delete left."""
    rows = representative(results)
    header = ["backend", "what", *REMOVED_FROM, "total", "same as bare delete"]
    body = []
    for r in rows:
        counts = [f"{r.removed.get(t, 0):,}" for t in REMOVED_FROM]
        body.append([r.backend, _what(r), *counts, f"{r.total:,}", _same(results, r)])
    return _table(header, body)


def _same(results: Sequence[Result], result: Result) -> str:
    """yes, or the tables where ``result`` removed or left other counts than the bare delete."""
    base = _base(results, result, BARE, result.round)
    if base is None:
        return "-"
    tables = sorted(set(base.removed) | set(base.left))
    differ = [
        f"{t} {result.removed.get(t, 0) - base.removed.get(t, 0):+,}"
        for t in tables
        if result.removed.get(t) != base.removed.get(t) or result.left.get(t) != base.left.get(t)
    ]
    same = "**NO**: " + ", ".join(differ) if differ else "yes"
    return same + ("" if result.consistent else " (archiver's report disagrees)")


def stages_table(rows: Sequence[Result]) -> str:
    """Seconds per stage, summed over archiver's batches, and per batch early and late.

    On PostgreSQL a batch is selected and encoded while the one before it is written and
    deleted (read-ahead), so the stages add up to more than the wall time.
    """
    header = [
        "backend", "what", *STAGES, "s/batch first 10%", "s/batch last 10%", "last / first",
    ]  # fmt: skip
    body = [
        [r.backend, _what(r), *(f"{r.stages[s]:.2f}" if s in r.stages else "-" for s in STAGES),
         f"{r.first_tenth:.3f}", f"{r.last_tenth:.3f}", f"{r.flatness:.2f}"]
        for r in rows
        if r.method != VACUUM
    ]  # fmt: skip
    return _table(header, body)


def vacuum_table(rows: Sequence[Result]) -> str:
    """db_vacuum's phases (it reports no batches), its cutoff drift and backends used."""
    header = ["backend", "what", *(p for p, _ in PHASES), "cutoff drift s", "backends"]
    body = [
        [r.backend, _what(r), *(f"{r.stages.get(p, 0.0):.2f}" for p, _ in PHASES),
         f"{r.stages.get('cutoff drift s', 0.0):.1f}", str(r.backends)]
        for r in rows
        if r.method == VACUUM
    ]  # fmt: skip
    return _table(header, body) if body else ""


def all_consistent(results: Sequence[Result]) -> bool:
    """Every archiver run removed and left exactly what the bare delete of its round did.

    db_vacuum deletes by its own rules; a difference there is reported, not a failure.
    """
    for r in results:
        if r.method != ARCHIVER:
            continue
        base = _base(results, r, BARE, r.round)
        if not r.consistent or base is None or (base.removed, base.left) != (r.removed, r.left):
            return False
    return True
