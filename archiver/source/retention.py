"""Retention policies as SQL over ``flow_run``: which finished runs expire, and by which rule.

:func:`compile_selection` turns a :class:`~archiver.policy.RetentionPolicy` into a
:class:`Selection`, SQL that :func:`~archiver.source.trees.lock_roots` and
:func:`~archiver.source.trees.count_expired` add to their keyset walk. The
walk stays on the ``end_time`` index, bounded by the latest cutoff of any rule
(``upper_cutoff``); inside that range a CASE expression finds each run's first
matching rule and tests that rule's cutoff. Rows are filtered in the database,
never in Python, and a batch still reads only the index range it takes.

How a rule matches, field by field:

* flow / deployment: ``flow_id IN (SELECT id FROM flow WHERE name ...)``; a
  deployment by its name or by ``flow-name/deployment-name``;
* work pool through ``work_queue.work_pool_id``; work queue by the run's own
  ``work_queue_name`` copy, which outlives a deleted queue;
* state by ``state_type``; tags with jsonb ``?|``/``?&`` on PostgreSQL and
  ``json_each`` on SQLite;
* keep_last N: :func:`select_expired` ranks the rule's runs per deployment (or
  flow) once per run with a window function and binds the ids of the N newest
  as one JSON array, which the database hashes once per statement. Prefect has no
  index on ``(deployment_id, end_time)``, so a per-row count of newer runs would
  read every older run of the deployment still present: it grew with the depth
  of the backlog (measured, see ``benchmarks/policy_selection.py``). Runs that
  finish after the ranking ended after ``now`` (clocks agreeing) and expire under
  no rule in this run, so the snapshot can only keep more than needed, never less
  (unless something else deletes a deployment's newest runs while archiver works).

The legal hold: a root carrying the tag is never selected here; a tree with a
tagged subflow is dropped by :func:`~archiver.source.trees.gather` once it
has locked the tree, where the check is final.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import TextClause
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.policy import RetentionPolicy, Rule
from archiver.source.dialect import (
    EPOCH,
    TERMINAL_STATES_SQL,
    has_tag_sql,
    list_statement,
    to_db_time,
)

#: The upper cutoff of a policy under which no rule expires anything.
NOTHING_EXPIRES = EPOCH
#: The flow_run columns rules look at (count_by_rule carries them through its window).
_RULE_COLUMNS = (
    "id", "end_time", "flow_id", "deployment_id", "tags", "state_type", "work_queue_id",
    "work_queue_name",
)  # fmt: skip


def finished_root(alias: str, *, off_indexes: bool = False) -> str:
    """SQL: run ``alias`` is a top-level run in a terminal state with an end time,
    what a rule can decide on (and what expires, once it ended before the cutoff).

    ``off_indexes``: a unary + keeps the root and state terms off their indexes
    (SQLite's planner would otherwise pick them over the end_time walk).
    """
    plus = "+" if off_indexes else ""
    return (
        f"{plus}{alias}.parent_task_run_id IS NULL AND {alias}.end_time IS NOT NULL"
        f" AND {plus}{alias}.state_type IN ({TERMINAL_STATES_SQL})"
    )


@dataclass(frozen=True)
class Selection:
    """A compiled policy: SQL over ``flow_run`` and the parameters it binds.

    ``where`` narrows expired roots (empty: nothing beyond the cutoff);
    ``rule_index`` evaluates to the position in ``rules`` of the rule that decides a
    run. No run that ended at or after ``upper_cutoff`` expires under any rule.
    """

    dialect: str
    rules: tuple[Rule, ...]
    upper_cutoff: datetime
    where: str
    rule_index: str
    params: dict[str, Any]
    lists: frozenset[str]

    def statement(self, sql: str) -> TextClause:
        """``text(sql)``, with the list parameters it uses expanded on SQLite."""
        return list_statement(sql, self.dialect, *self.lists)

    def rule_name(self, index: int) -> str:
        return self.rules[index].name


async def select_expired(
    conn: AsyncConnection, policy: RetentionPolicy, now: datetime
) -> Selection:
    """The policy as SQL for this connection's database, cutoffs taken from ``now``,
    keep_last rules resolved to the runs they keep as of now (one query per rule)."""
    kept = {
        position: await _kept_by(conn, rule)
        for position, rule in enumerate(policy.effective_rules)
        if rule.keep_last is not None
    }
    return compile_selection(conn.dialect.name, policy, now, kept)


async def _kept_by(conn: AsyncConnection, rule: Rule) -> list[str]:
    """Ids of the N newest finished runs of each deployment (or flow) the rule matches."""
    sql = _Sql(conn.dialect.name)
    group = f"flow_run.{rule.keep_last_per}_id"
    where = " AND ".join(
        [finished_root("flow_run"), f"{group} IS NOT NULL", *sql.filters(rule, "flow_run")]
    )
    statement = f"""
        SELECT id FROM (
            SELECT flow_run.id AS id, row_number() OVER (
                PARTITION BY {group} ORDER BY flow_run.end_time DESC, flow_run.id DESC
            ) AS position
            FROM flow_run WHERE {where}
        ) AS ranked
        WHERE position <= {sql.bind(rule.keep_last)}"""
    result = await conn.execute(list_statement(statement, sql.dialect, *sql.lists), sql.params)
    return [str(run_id) for (run_id,) in result.all()]


def compile_selection(
    dialect: str,
    policy: RetentionPolicy,
    now: datetime,
    kept: Mapping[int, Sequence[str]] | None = None,
) -> Selection:
    """The policy as SQL for ``dialect``, with every rule's cutoff taken from ``now``.

    ``kept``: for each keep_last rule (by position in ``policy.effective_rules``),
    the ids it keeps; see :func:`select_expired`, which finds them.
    """
    sql = _Sql(dialect)
    rules = policy.effective_rules
    cutoffs = [now - rule.retention if rule.retention is not None else None for rule in rules]
    kept = kept or {}

    def keep_last(position: int, rule: Rule) -> str:
        if position not in kept:
            raise ValueError(f"keep_last rule {rule.name!r} needs the ids it keeps")
        return sql.keep_last_kept(rule, kept[position])

    rule_index, expired = sql.decide(rules, cutoffs, keep_last)
    upper = max((c for c in cutoffs if c is not None), default=NOTHING_EXPIRES)
    # One rule that expires everything before the upper cutoff: the keyset bound is the test.
    where = "" if len(rules) == 1 else f"({expired})"
    if policy.legal_hold_tag:
        hold = has_tag_sql(dialect, "flow_run", sql.bind(policy.legal_hold_tag))
        where = f"{where} AND NOT {hold}" if where else f"NOT {hold}"
    return Selection(dialect, rules, upper, where, rule_index, sql.params, frozenset(sql.lists))


@dataclass(frozen=True)
class RuleCount:
    """What one rule decides about the finished top-level runs in the database now.

    ``selected``: expired runs it would archive; ``kept``: runs it matches and keeps
    (not expired yet, kept forever, or among the last N); ``held``: expired runs the
    legal hold keeps (the root or a subflow carries the tag).
    """

    rule: str
    match: str
    action: str
    selected: int
    kept: int
    held: int


async def count_by_rule(
    conn: AsyncConnection, policy: RetentionPolicy, now: datetime
) -> list[RuleCount]:
    """Count, per rule in order (the default rule last), the runs it selects, keeps and
    the legal hold holds. Reads every finished top-level run once (for plans and dry
    runs, not per batch); trees with live subflows are counted as selected.
    """
    sql = _Sql(conn.dialect.name)
    decided = sql.decided_runs(policy, now)
    statement = f"""{decided.ctes}
        SELECT rule_index, expired, held, count(*) FROM ({decided.select}) AS decided
        GROUP BY rule_index, expired, held"""
    rules = policy.effective_rules
    counts = [[0, 0, 0] for _ in rules]  # selected, kept, held
    result = await conn.execute(list_statement(statement, sql.dialect, *sql.lists), sql.params)
    for index, is_expired, is_held, count in result.all():
        slot = 2 if is_expired and is_held else 0 if is_expired else 1
        counts[int(index)][slot] += int(count)
    return [
        RuleCount(rule.name, rule.describe_match(), rule.describe_action(), *counts[i])
        for i, rule in enumerate(rules)
    ]


@dataclass(frozen=True)
class _Decided:
    """SQL: every finished top-level run with its rule_index, expired (0/1), held (0/1)
    and end_time; ``ctes`` goes before the statement that selects from ``select``."""

    ctes: str
    select: str


def _held_roots_cte(dialect: str, tag: str) -> str:
    """Every flow run carrying the tag, and its ancestors up to the root."""
    tagged = has_tag_sql(dialect, "flow_run", tag)
    return f"""
        WITH RECURSIVE held_runs(id, parent_task_run_id) AS (
            SELECT id, parent_task_run_id FROM flow_run WHERE {tagged}
            UNION
            SELECT parent.id, parent.parent_task_run_id FROM held_runs
            JOIN task_run ON task_run.id = held_runs.parent_task_run_id
            JOIN flow_run AS parent ON parent.id = task_run.flow_run_id
        )"""


class _Sql:
    """Writes the SQL of rules for one dialect and collects the parameters it binds."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.params: dict[str, Any] = {}
        self.lists: set[str] = set()

    def bind(self, value: Any) -> str:
        name = f"policy_{len(self.params)}"
        self.params[name] = value
        return f":{name}"

    def _is_in(self, expression: str, values: Sequence[str]) -> str:
        ref = self.bind(list(values))
        self.lists.add(ref[1:])
        if self.dialect == "postgresql":
            return f"{expression} = ANY({ref})"
        return f"{expression} IN {ref}"

    def decide(
        self,
        rules: tuple[Rule, ...],
        cutoffs: list[datetime | None],
        keep_last: Callable[[int, Rule], str],
    ) -> tuple[str, str]:
        """Two CASE expressions over ``flow_run``: the deciding rule's index, and
        whether that rule lets the run expire. The last rule matches every run.
        """
        expired = [
            f"flow_run.end_time < {self.bind(to_db_time(self.dialect, cutoff))}"
            if cutoff is not None
            else "1 = 0"
            for cutoff in cutoffs
        ]
        index_whens, expired_whens = [], []
        for position, rule in enumerate(rules[:-1]):
            match = self.filters(rule, "flow_run")
            if rule.keep_last is not None:
                match.append(keep_last(position, rule))
            condition = " AND ".join(match)
            index_whens.append(f"WHEN {condition} THEN {position}")
            expired_whens.append(f"WHEN {condition} THEN {expired[position]}")
        if not index_whens:
            return "0", expired[-1]
        last = len(rules) - 1
        return (
            f"CASE {' '.join(index_whens)} ELSE {last} END",
            f"CASE {' '.join(expired_whens)} ELSE {expired[last]} END",
        )

    def decided_runs(self, policy: RetentionPolicy, now: datetime) -> _Decided:
        rules = policy.effective_rules
        cutoffs = [now - rule.retention if rule.retention is not None else None for rule in rules]
        rule_index, expired = self.decide(rules, cutoffs, self.keep_last_ranked)
        ctes, held = "", "0 = 1"
        if policy.legal_hold_tag:
            ctes = _held_roots_cte(self.dialect, self.bind(policy.legal_hold_tag))
            held = "flow_run.id IN (SELECT id FROM held_runs WHERE parent_task_run_id IS NULL)"
        return _Decided(
            ctes,
            f"""SELECT {rule_index} AS rule_index,
                   CASE WHEN {expired} THEN 1 ELSE 0 END AS expired,
                   CASE WHEN {held} THEN 1 ELSE 0 END AS held,
                   flow_run.end_time AS end_time
            FROM ({self.ranked_runs(rules)}) AS flow_run""",
        )

    def filters(self, rule: Rule, alias: str) -> list[str]:
        """The conditions on run ``alias`` for each match field the rule gives."""
        conditions = []
        if rule.flow:
            conditions.append(
                f"{alias}.flow_id IN (SELECT id FROM flow WHERE {self._is_in('name', rule.flow)})"
            )
        if rule.deployment:
            conditions.append(f"{alias}.deployment_id IN ({self._deployments(rule.deployment)})")
        if rule.tags_any:
            conditions.append(self._tags(alias, rule.tags_any, every=False))
        if rule.tags_all:
            conditions.append(self._tags(alias, rule.tags_all, every=True))
        if rule.state:
            conditions.append(self._is_in(f"{alias}.state_type", rule.state))
        if rule.work_pool:
            pools = self._is_in("work_pool.name", rule.work_pool)
            conditions.append(
                f"{alias}.work_queue_id IN (SELECT work_queue.id FROM work_queue JOIN work_pool"
                f" ON work_pool.id = work_queue.work_pool_id WHERE {pools})"
            )
        if rule.work_queue:
            conditions.append(self._is_in(f"{alias}.work_queue_name", rule.work_queue))
        return conditions or ["1 = 1"]

    def _deployments(self, names: list[str]) -> str:
        plain = [name for name in names if "/" not in name]
        qualified = [name for name in names if "/" in name]
        found = []
        if plain:
            found.append(f"SELECT id FROM deployment WHERE {self._is_in('name', plain)}")
        if qualified:
            full_name = self._is_in("flow.name || '/' || deployment.name", qualified)
            found.append(
                "SELECT deployment.id FROM deployment JOIN flow ON flow.id = deployment.flow_id"
                f" WHERE {full_name}"
            )
        return " UNION ALL ".join(found)

    def _tags(self, alias: str, tags: list[str], *, every: bool) -> str:
        if self.dialect == "postgresql":
            ref = self.bind(sorted(set(tags)))
            return f"{alias}.tags {'?&' if every else '?|'} CAST({ref} AS text[])"
        found = self._is_in("json_each.value", sorted(set(tags)))
        if every:
            count = "count(DISTINCT json_each.value)"
            return f"(SELECT {count} FROM json_each({alias}.tags) WHERE {found}) = {len(set(tags))}"
        return f"EXISTS (SELECT 1 FROM json_each({alias}.tags) WHERE {found})"

    def keep_last_kept(self, rule: Rule, kept: Sequence[str]) -> str:
        """The run is one of ``kept`` (bound as one JSON array, hashed once per statement)."""
        ids = self.bind(json.dumps(list(kept)))
        if self.dialect == "postgresql":
            listed = (
                f"SELECT CAST(value AS uuid) FROM jsonb_array_elements_text(CAST({ids} AS jsonb))"
            )
        else:
            listed = f"SELECT value FROM json_each({ids})"
        return f"flow_run.{rule.keep_last_per}_id IS NOT NULL AND flow_run.id IN ({listed})"

    def keep_last_ranked(self, position: int, rule: Rule) -> str:
        """The run's rank among the rule's runs of its deployment is at most N
        (``rank_<position>``, computed by :meth:`ranked_runs`)."""
        return f"flow_run.rank_{position} <= {self.bind(rule.keep_last)}"

    def ranked_runs(self, rules: tuple[Rule, ...]) -> str:
        """Every finished top-level run, with ``rank_<i>`` for each keep_last rule i:
        its position, newest first, among the runs of its deployment (or flow) that
        the rule's fields match; NULL for runs the fields do not match.
        """
        columns = ", ".join(f"flow_run.{column}" for column in _RULE_COLUMNS)
        flags, ranks = [], []
        for position, rule in enumerate(rules):
            if rule.keep_last is None:
                continue
            group = f"{rule.keep_last_per}_id"
            match = " AND ".join([*self.filters(rule, "flow_run"), f"flow_run.{group} IS NOT NULL"])
            flags.append(f", CASE WHEN {match} THEN 1 ELSE 0 END AS in_{position}")
            ranks.append(
                f", CASE WHEN runs.in_{position} = 1 THEN row_number() OVER (PARTITION BY"
                f" runs.in_{position}, runs.{group} ORDER BY runs.end_time DESC, runs.id DESC)"
                f" END AS rank_{position}"
            )
        return (
            f"SELECT runs.*{''.join(ranks)} FROM (SELECT {columns}{''.join(flags)}"
            f" FROM flow_run WHERE {finished_root('flow_run')}) AS runs"
        )
