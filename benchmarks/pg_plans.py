"""What one batch does in each variant of benchmarks.pg_paths, given its locked trees.

A plan gets a :class:`Batch`: the session (one connection, inside the batch's transaction),
the tables' shapes and the flow-run ids of the batch's trees (roots locked ``FOR UPDATE``).
It reads and removes every row of those trees the way its variant does, checks every count,
and leaves the rows it took in ``Batch.tables`` (Arrow, in the archive's types) unless the
session does not decode. Why each order is what it is: the module docstring of
benchmarks.pg_paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from archiver.models import TableShape
from benchmarks import run as bench
from benchmarks.pg_sessions import Session, empty_table, select_list, uuid_array

#: Tables a batch removes, as archiver's gather() reads them.
TREE = (
    "flow_run", "task_run", "flow_run_state", "task_run_state", "flow_run_input", "log",
    "artifact", "task_run_state_cache",
)  # fmt: skip
#: The bare delete's (benchmarks.run): expired top-level runs, and a tree walk whose every
#: step is an index lookup.
EXPIRED = (
    "parent_task_run_id IS NULL AND end_time IS NOT NULL AND end_time < '{cutoff}'"
    " AND state_type IN ('COMPLETED', 'FAILED', 'CANCELLED', 'CRASHED')"
)
_TREE = """
    WITH RECURSIVE tree(id) AS (
        SELECT unnest({roots})
        UNION ALL
        SELECT child.id FROM tree CROSS JOIN LATERAL (
            SELECT flow_run.id FROM task_run
            JOIN flow_run ON flow_run.parent_task_run_id = task_run.id
            WHERE task_run.flow_run_id = tree.id OFFSET 0
        ) AS child
    )
    SELECT id::text FROM tree"""


def expired_sql() -> str:
    return EXPIRED.format(cutoff=(bench.NOW - bench.RETENTION).isoformat())


def roots_sql(limit: int) -> str:
    """The next ``limit`` expired roots, oldest first, locked (as the bare delete takes them)."""
    return (
        f"SELECT id::text FROM flow_run WHERE {expired_sql()}"
        f" ORDER BY end_time LIMIT {limit} FOR UPDATE SKIP LOCKED"
    )


def tree_sql(roots: Sequence[str]) -> str:
    """Every flow run of the roots' trees, roots included."""
    return _TREE.format(roots=uuid_array(roots))


@dataclass
class Batch:
    """One batch's connection, schema and run ids, and the tables it archives."""

    session: Session
    shapes: dict[str, TableShape]
    runs: list[str]
    uuid_text: bool
    tables: dict[str, list[pa.Table]] = field(default_factory=dict)

    def where(self, column: str, ids: Sequence[str], extra: str = "") -> str:
        return f'"{column}" = ANY({uuid_array(ids)}){extra}'

    def _keep(self, table: str, rows: pa.Table | None) -> pa.Table | None:
        if rows is not None:
            self.tables.setdefault(table, []).append(rows)
        return rows

    def select(self, table: str, where: str, *, lock: bool = False) -> pa.Table | None:
        self.session.steps.table = table
        columns = select_list(self.shapes[table], uuid_text=self.uuid_text)
        suffix = " FOR UPDATE" if lock else ""
        sql = f"SELECT {columns} FROM {table} WHERE {where}{suffix}"
        return self._keep(table, self.session.read(sql, self.shapes[table]))

    def ids(self, table: str, sql: str) -> list[str]:
        """The first column of ``sql`` (ids, or a lock taken with them), timed for ``table``."""
        self.session.steps.table = table
        return self.session.ids(sql)

    def count(self, label: str, sql: str) -> int:
        self.session.steps.table = label
        return self.session.count(sql)

    def returning(self, table: str, where: str) -> pa.Table | None:
        self.session.steps.table = table
        columns = select_list(self.shapes[table], uuid_text=self.uuid_text)
        sql = f"DELETE FROM {table} WHERE {where} RETURNING {columns}"
        return self._keep(table, self.session.read(sql, self.shapes[table], step="returning"))

    def delete(self, table: str, where: str, expected: int | None = None) -> int:
        self.session.steps.table = table
        removed = self.session.delete(f"DELETE FROM {table} WHERE {where}")
        if expected is not None and removed != expected:
            raise RuntimeError(f"{table}: deleted {removed}, expected {expected}")
        return removed

    def archived(self, table: str) -> pa.Table:
        """Every row of ``table`` this batch took, each once (lookups can overlap)."""
        parts = self.tables.get(table, [])
        rows = pa.concat_tables(parts) if parts else empty_table(self.shapes[table])
        if len(pc.unique(rows["id"])) == rows.num_rows:
            return rows
        seen: dict[str, int] = {}
        for index, value in enumerate(rows["id"].to_pylist()):
            seen.setdefault(value, index)
        return rows.take(list(seen.values()))


def _ids(rows: pa.Table | None, column: str = "id") -> list[str]:
    if rows is None:
        return []
    return [value for value in pc.unique(rows[column]).to_pylist() if value is not None]


def plan_bare(batch: Batch) -> None:
    """Delete only, like the bare delete of benchmarks.run."""
    runs = batch.runs
    tasks = batch.ids(
        "task_run", f"SELECT id FROM task_run WHERE {batch.where('flow_run_id', runs)}"
    )
    for table in ("log", "artifact"):
        batch.delete(table, batch.where("flow_run_id", runs))
        if tasks:
            batch.delete(table, batch.where("task_run_id", tasks))
    batch.delete("flow_run", batch.where("id", runs), len(runs))


def plan_today(batch: Batch) -> None:
    """archiver's gather() reads, then its cascade delete with checked counts."""
    runs, no_run = batch.runs, " AND flow_run_id IS NULL"
    batch.select("flow_run", batch.where("id", runs), lock=True)
    tasks = _ids(batch.select("task_run", batch.where("flow_run_id", runs), lock=True))
    flow_states = batch.select("flow_run_state", batch.where("flow_run_id", runs))
    task_states = (
        batch.select("task_run_state", batch.where("task_run_id", tasks)) if tasks else None
    )
    batch.select("flow_run_input", batch.where("flow_run_id", runs))
    batch.select("log", batch.where("flow_run_id", runs))
    if tasks:
        batch.select("log", batch.where("task_run_id", tasks, no_run))
    batch.select("artifact", batch.where("flow_run_id", runs))
    if tasks:
        batch.select("artifact", batch.where("task_run_id", tasks, no_run))
    results = _result_ids(flow_states, task_states)
    if results:
        batch.select("artifact", batch.where("id", results))
    state_ids = _ids(task_states)
    if state_ids:
        batch.select("task_run_state_cache", batch.where("task_run_state_id", state_ids))
    _delete_read(batch)


def _delete_read(batch: Batch) -> None:
    """Logs and caches by id, the cascade counted, flow runs by id, artifacts by id."""
    for table in ("task_run_state_cache", "log"):
        ids = _ids(batch.archived(table))
        if ids:
            batch.delete(table, batch.where("id", ids), len(ids))
    cascaded = {
        "task_run": ("flow_run_id", batch.runs),
        "flow_run_state": ("flow_run_id", batch.runs),
        "flow_run_input": ("flow_run_id", batch.runs),
    }
    tasks = _ids(batch.archived("task_run"))
    counts = [
        f"(SELECT count(*) FROM {t} WHERE {batch.where(k, ids)})"
        for t, (k, ids) in cascaded.items()
    ]
    if tasks:
        cascaded["task_run_state"] = ("task_run_id", tasks)
        counts.append(
            f"(SELECT count(*) FROM task_run_state WHERE {batch.where('task_run_id', tasks)})"
        )
    found = batch.count("cascade", "SELECT " + " + ".join(counts))
    expected = sum(batch.archived(t).num_rows for t in cascaded)
    if found != expected:
        raise RuntimeError(f"the cascade would remove {found} rows, {expected} were read")
    batch.delete("flow_run", batch.where("id", batch.runs), len(batch.runs))
    artifacts = _ids(batch.archived("artifact"))
    if artifacts:
        batch.delete("artifact", batch.where("id", artifacts), len(artifacts))


def plan_children_first(batch: Batch, *, naive: bool = False) -> None:
    """Every table but flow_run by DELETE RETURNING, children first (``naive``: flow_run too)."""
    runs, no_run = batch.runs, " AND flow_run_id IS NULL"
    if not naive:
        batch.select("flow_run", batch.where("id", runs), lock=True)
    else:
        batch.ids("flow_run", f"SELECT id FROM flow_run WHERE {batch.where('id', runs)} FOR UPDATE")
    tasks = batch.ids(
        "task_run", f"SELECT id FROM task_run WHERE {batch.where('flow_run_id', runs)} FOR UPDATE"
    )
    batch.returning("log", batch.where("flow_run_id", runs))
    task_states = None
    if tasks:
        batch.returning("log", batch.where("task_run_id", tasks, no_run))
        states = f"SELECT id FROM task_run_state WHERE {batch.where('task_run_id', tasks)}"
        batch.returning("task_run_state_cache", f"task_run_state_id IN ({states})")
        task_states = batch.returning("task_run_state", batch.where("task_run_id", tasks))
    batch.returning("flow_run_input", batch.where("flow_run_id", runs))
    flow_states = batch.returning("flow_run_state", batch.where("flow_run_id", runs))
    batch.returning("task_run", batch.where("flow_run_id", runs))
    if naive:
        returned = batch.returning("flow_run", batch.where("id", runs))
        if returned is not None and returned.num_rows != len(runs):
            raise RuntimeError("flow_run: not every run was returned")
    else:
        batch.delete("flow_run", batch.where("id", runs), len(runs))
    _return_artifacts(batch, tasks, _result_ids(flow_states, task_states))


def _result_ids(*states: pa.Table | None) -> list[str]:
    """The artifacts that states name as their result."""
    return sorted({value for table in states for value in _ids(table, "result_artifact_id")})


def _return_artifacts(batch: Batch, tasks: list[str], results: list[str]) -> None:
    """Last: once the states that name them are gone (``result_artifact_id`` is SET NULL)."""
    no_run = " AND flow_run_id IS NULL"
    batch.returning("artifact", batch.where("flow_run_id", batch.runs))
    if tasks:
        batch.returning("artifact", batch.where("task_run_id", tasks, no_run))
    if results:
        batch.returning("artifact", batch.where("id", results))


def plan_mixed(batch: Batch) -> None:
    """One pass where it is exact; task runs and flow-run states read, then cascaded.

    Undecoded (binary), the ids the plan needs come from small queries of their own, and the
    cascade's count cannot be checked (nothing was counted).
    """
    decodes, runs, no_run = batch.session.decodes, batch.runs, " AND flow_run_id IS NULL"
    batch.ids("flow_run", f"SELECT id FROM flow_run WHERE {batch.where('id', runs)} FOR UPDATE")
    task_runs = batch.select("task_run", batch.where("flow_run_id", runs), lock=True)
    flow_states = batch.select("flow_run_state", batch.where("flow_run_id", runs))
    tasks, results = _ids(task_runs), list[str]()
    if not decodes:
        tasks, results = _undecoded_ids(batch)
    batch.returning("log", batch.where("flow_run_id", runs))
    task_states = None
    if tasks:
        batch.returning("log", batch.where("task_run_id", tasks, no_run))
        states = f"SELECT id FROM task_run_state WHERE {batch.where('task_run_id', tasks)}"
        batch.returning("task_run_state_cache", f"task_run_state_id IN ({states})")
        task_states = batch.returning("task_run_state", batch.where("task_run_id", tasks))
    batch.returning("flow_run_input", batch.where("flow_run_id", runs))
    if decodes:
        counts = batch.count(
            "cascade",
            f"SELECT (SELECT count(*) FROM task_run WHERE {batch.where('flow_run_id', runs)})"
            f" + (SELECT count(*) FROM flow_run_state WHERE {batch.where('flow_run_id', runs)})",
        )
        expected = len(tasks) + (flow_states.num_rows if flow_states is not None else 0)
        if counts != expected:
            raise RuntimeError(f"the cascade would remove {counts} rows, {expected} were read")
    returned = batch.returning("flow_run", batch.where("id", runs))
    if returned is not None and returned.num_rows != len(runs):
        raise RuntimeError("flow_run: not every run was returned")
    _return_artifacts(batch, tasks, _result_ids(flow_states, task_states) if decodes else results)


def _undecoded_ids(batch: Batch) -> tuple[list[str], list[str]]:
    """(task-run ids, result artifact ids) of the batch, asked for on their own."""
    runs = batch.runs
    tasks = batch.ids(
        "task_run", f"SELECT id FROM task_run WHERE {batch.where('flow_run_id', runs)}"
    )
    results = batch.ids(
        "result ids",
        "SELECT result_artifact_id FROM flow_run_state WHERE"
        f" {batch.where('flow_run_id', runs)} AND result_artifact_id IS NOT NULL",
    )
    if tasks:
        results += batch.ids(
            "result ids",
            "SELECT result_artifact_id FROM task_run_state WHERE"
            f" {batch.where('task_run_id', tasks)} AND result_artifact_id IS NOT NULL",
        )
    return tasks, sorted(set(results))


@dataclass(frozen=True)
class Variant:
    name: str
    driver: str  # asyncpg-csv | asyncpg-binary | adbc
    plan: Callable[[Batch], None]


VARIANTS = {
    variant.name: variant
    for variant in (
        Variant("bare", "asyncpg-csv", plan_bare),
        Variant("today", "asyncpg-csv", plan_today),
        Variant("children-first", "asyncpg-csv", plan_children_first),
        Variant(
            "children-first-naive", "asyncpg-csv", lambda b: plan_children_first(b, naive=True)
        ),
        Variant("mixed", "asyncpg-csv", plan_mixed),
        Variant("mixed-binary", "asyncpg-binary", plan_mixed),
        Variant("today-adbc", "adbc", plan_today),
        Variant("mixed-adbc", "adbc", plan_mixed),
    )
}
