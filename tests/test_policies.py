"""Retention policies and the legal hold, on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from archiver.archive.manifest import BatchManifest
from archiver.cli.app import app
from archiver.cli.settings import load_settings
from archiver.errors import ConfigError
from archiver.policy import RetentionPolicy, Rule
from archiver.source import reader
from archiver.source.engine import DatabaseOptions, create_engine
from archiver.source.retention import RuleCount, count_by_rule
from tests import factory
from tests.factory import TestDatabase, TestStorage
from tests.helpers import NOW, RETENTION, archive, write_config
from tests.oracle import assert_nothing_lost, ledger

ROOT = Path(__file__).resolve().parent.parent
LIGHT: dict[str, Any] = {
    "task_runs": 0,
    "states_per_run": 1,
    "logs_per_run": 0,
    "artifacts": 0,
    "inputs": 0,
}


def rule(**fields: Any) -> Rule:
    """A rule as a config file spells it (one name may stand alone, as a string)."""
    return Rule.model_validate(fields)


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def run(db: TestDatabase, days: float, *, tags: list[str] | None = None, **kwargs: Any) -> str:
    """A light finished top-level run that ended ``days`` ago; its id."""
    tree = factory.make_tree(db, end_time=ago(days), **{**LIGHT, **kwargs})
    if tags is not None:
        tag(db, tree.root_id, tags)
    return tree.root_id


def tag(db: TestDatabase, run_id: str, tags: list[str]) -> None:
    db.execute(
        "UPDATE flow_run SET tags = :tags WHERE id = :id", {"tags": json.dumps(tags), "id": run_id}
    )


def work_queue(db: TestDatabase, pool: str, queue: str) -> str:
    """A work pool with one queue; the queue's id."""
    pool_id, queue_id = factory.uuid4(), factory.uuid4()
    db.execute(
        "INSERT INTO work_pool (id, name, type) VALUES (:id, :name, 'process')",
        {"id": pool_id, "name": pool},
    )
    db.execute(
        "INSERT INTO work_queue (id, name, work_pool_id) VALUES (:id, :name, :pool)",
        {"id": queue_id, "name": queue, "pool": pool_id},
    )
    return queue_id


def on_queue(db: TestDatabase, run_id: str, queue_id: str, queue: str) -> None:
    db.execute(
        "UPDATE flow_run SET work_queue_id = :queue_id, work_queue_name = :queue WHERE id = :id",
        {"queue_id": queue_id, "queue": queue, "id": run_id},
    )


def counts(
    db: TestDatabase, rules: list[Rule], hold: str | None = "legal-hold"
) -> dict[str, RuleCount]:
    async def go() -> list[RuleCount]:
        engine = create_engine(DatabaseOptions(db.url))
        try:
            async with engine.connect() as conn:
                return await count_by_rule(
                    conn, RetentionPolicy(tuple(rules), RETENTION, hold), NOW
                )
        finally:
            await engine.dispose()

    return {count.rule: count for count in asyncio.run(go())}


def archived_by_rule(db: TestDatabase) -> dict[str, str]:
    """Root id -> the rule the manifests say archived it."""
    found: dict[str, str] = {}
    for manifest in ledger(db).values():
        assert set(manifest["root_rules"]) == set(manifest["root_ids"])
        found |= manifest["root_rules"]
    return found


COMPLIANCE = [
    rule(name="prod", deployment="etl/prod", retention=timedelta(days=400)),
    rule(name="pii", tags_all=["pii", "eu"], keep="forever"),
    rule(name="gpu", work_pool="gpu", retention=timedelta(days=7)),
    rule(name="scratch", work_queue="scratch", retention=timedelta(days=2)),
    rule(name="ml-recent", flow="ml", keep_last=2, per="flow"),
    rule(name="last-3", keep_last=3),
    rule(name="failed", state="FAILED", retention=timedelta(days=180)),
    rule(name="debug", tags_any=["debug", "tmp"], retention=timedelta(days=1)),
]


def test_every_kind_of_rule_decides_and_the_manifest_names_it(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    etl, ml = factory.make_flow(database, "etl"), factory.make_flow(database, "ml")
    prod = factory.make_deployment(database, etl, "prod")
    staging = factory.make_deployment(database, etl, "staging")
    gpu_queue = work_queue(database, "gpu", "default")
    scratch_queue = work_queue(database, "cpu", "scratch")
    archived: dict[str, str] = {}  # run -> rule that archives it
    kept: set[str] = set()

    archived[run(database, 500, flow_id=etl, deployment_id=prod)] = "prod"
    kept.add(run(database, 300, flow_id=etl, deployment_id=prod))
    kept |= {run(database, days, flow_id=etl, deployment_id=staging) for days in (40, 41, 42)}
    for days in (43, 44):  # beyond the last 3 of staging: on to the default rule
        archived[run(database, days, flow_id=etl, deployment_id=staging)] = "default"
    kept.add(run(database, 100, flow_id=etl, deployment_id=staging, state_type="FAILED"))
    archived[run(database, 200, flow_id=etl, deployment_id=staging, state_type="FAILED")] = "failed"
    kept |= {run(database, days, flow_id=ml) for days in (50, 60)}
    archived[run(database, 70, flow_id=ml)] = "default"  # no deployment: last-3 passes it on
    kept.add(run(database, 1000, tags=["x", "eu", "pii"]))
    archived[run(database, 1000, tags=["pii"])] = "default"  # not all of tags_all
    for days, rule in ((10, "gpu"), (3, "scratch")):
        run_id = run(database, days)
        queue = (gpu_queue, "default") if rule == "gpu" else (scratch_queue, "scratch")
        on_queue(database, run_id, *queue)
        archived[run_id] = rule
    on_queue(database, young_gpu := run(database, 5), gpu_queue, "default")
    kept.add(young_gpu)
    archived[run(database, 3, tags=["tmp"])] = "debug"
    kept.add(run(database, 0.5, tags=["debug"]))
    archived[run(database, 40)] = "default"
    kept.add(run(database, 20))
    held = run(database, 1000, tags=["legal-hold"])

    planned = counts(database, COMPLIANCE)
    report = archive(database, local_storage, policies=tuple(COMPLIANCE), now=NOW)

    assert archived_by_rule(database) == archived
    assert database.ids("flow_run") == kept | {held}
    assert report.archived_roots == report.expired_roots == len(archived)
    selected = {name: sum(1 for rule in archived.values() if rule == name) for name in planned}
    assert {name: count.selected for name, count in planned.items()} == selected
    assert [planned[name].kept for name in ("prod", "pii", "gpu", "ml-recent", "last-3")] == [
        1, 1, 1, 2, 3,
    ]  # fmt: skip
    assert planned["failed"].kept == 1 and planned["debug"].kept == 1
    assert planned["default"].kept == 1 and planned["default"].held == 1
    assert (
        sum(c.selected + c.kept + c.held for c in planned.values()) == len(archived) + len(kept) + 1
    )


def test_rule_order_decides(database: TestDatabase, local_storage: TestStorage) -> None:
    etl = factory.make_flow(database, "etl")
    failed_etl = run(database, 40, flow_id=etl, state_type="FAILED")
    keep_failed = rule(name="failures", state="FAILED", keep="forever")
    etl_month = rule(name="etl", flow="etl", retention=timedelta(days=30))

    assert counts(database, [keep_failed, etl_month])["failures"].kept == 1
    assert counts(database, [etl_month, keep_failed])["etl"].selected == 1
    first = archive(database, local_storage, policies=(keep_failed, etl_month), now=NOW)
    assert first.archived_roots == 0 and failed_etl in database.ids("flow_run")
    second = archive(database, local_storage, policies=(etl_month, keep_failed), now=NOW)
    assert second.archived_roots == 1 and archived_by_rule(database) == {failed_etl: "etl"}


def test_keep_last_per_deployment_breaks_end_time_ties_by_id(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    flow = factory.make_flow(database, "etl")
    deployment = factory.make_deployment(database, flow, "nightly")
    same_end = ago(50)
    trees = factory.make_trees(
        database, 4, end_time=same_end, flow_id=flow, deployment_id=deployment, **LIGHT
    )
    other = run(database, 60, flow_id=flow, deployment_id=factory.make_deployment(database, flow))
    rules = [rule(name="last-2", deployment="nightly", keep_last=2)]
    newest_two = set(sorted(tree.root_id for tree in trees)[-2:])

    planned = counts(database, rules)
    report = archive(database, local_storage, policies=tuple(rules), now=NOW)

    assert planned["last-2"].kept == 2 and planned["default"].selected == 3
    assert report.archived_roots == report.expired_roots == 3
    assert database.ids("flow_run") == newest_two
    assert other in archived_by_rule(database)


def test_a_legal_hold_on_a_subflow_keeps_the_whole_tree(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    tree = factory.make_tree(database, end_time=ago(40), subflow_depth=2, **LIGHT)
    free = run(database, 41)
    tag(database, tree.subflow_ids[-1], ["legal-hold", "x"])
    before = factory.snapshot_ids(database)

    assert counts(database, [rule(keep="forever", state="CRASHED")])["default"].held == 1
    report = archive(database, local_storage)

    assert report.archived_roots == 1 and report.held_roots == [tree.root_id]
    assert set(tree.flow_run_ids) <= database.ids("flow_run")
    assert free not in database.ids("flow_run")
    assert_nothing_lost(database, local_storage, before)


def test_a_legal_hold_added_after_a_plan_and_another_tag_name(
    database: TestDatabase, local_storage: TestStorage
) -> None:
    root, subflow_tree = (
        run(database, 40),
        factory.make_tree(database, end_time=ago(40), subflow_depth=1, **LIGHT),
    )
    assert archive(database, local_storage, dry_run=True).expired_roots == 2

    tag(database, root, ["keep-me"])
    tag(database, subflow_tree.subflow_ids[0], ["keep-me"])
    ignored = archive(database, local_storage, legal_hold_tag="legal-hold", dry_run=True)
    report = archive(database, local_storage, legal_hold_tag="keep-me")

    assert ignored.expired_roots == 2  # another tag name does not hold anything
    assert report.archived_roots == 0 and report.held_roots == [subflow_tree.root_id]
    assert database.ids("flow_run") == {root, *subflow_tree.flow_run_ids}


@pytest.mark.postgres
@pytest.mark.parametrize("moment", ["roots locked", "tree checked, not yet locked"])
def test_a_legal_hold_added_between_selection_and_delete_protects_the_tree(
    postgres_database: TestDatabase,
    local_storage: TestStorage,
    moment: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On PostgreSQL the roots are locked first and their trees later: a tag added to a
    subflow in between (Prefect's API is free to) must still keep the tree, also when
    it lands right after the unlocked look at the tree. (On SQLite a batch holds the
    write lock from BEGIN, so nothing can be added in between.)"""
    db = postgres_database
    tree = factory.make_tree(db, end_time=ago(40), subflow_depth=1, **LIGHT)

    def tag_the_subflow() -> None:
        tag(db, tree.subflow_ids[0], ["legal-hold"])  # commits on another connection

    def hook(step: str, batch_id: str) -> None:
        if step == "selected" and moment == "roots locked":
            tag_the_subflow()

    unlocked_look = reader.Reader.statuses

    async def statuses_then_tag(self: Any, *args: Any) -> Any:
        found = await unlocked_look(self, *args)
        tag_the_subflow()  # fault injection: the race lands between the look and the lock
        return found

    if moment != "roots locked":
        monkeypatch.setattr(reader.Reader, "statuses", statuses_then_tag)
    report = archive(db, local_storage, hook=hook)

    assert report.held_roots == [tree.root_id] and report.archived_roots == 0
    assert set(tree.flow_run_ids) <= db.ids("flow_run")


def test_no_policies_records_the_default_rule(
    sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    root = run(sqlite_database, 40)
    archive(sqlite_database, local_storage)
    assert archived_by_rule(sqlite_database) == {root: "default"}


def test_manifests_from_before_policies_still_read() -> None:
    manifest = {
        "batch_id": "b", "source_id": "s", "created_at": "2026-01-01T00:00:00Z",
        "cutoff": "2026-01-01T00:00:00Z", "partition": "month=2025-01", "source_dialect": "sqlite",
        "source_revision": "r", "archiver_version": "0.1.0", "root_ids": ["a"],
        "end_time_min": "2025-01-01T00:00:00Z", "end_time_max": "2025-01-01T00:00:00Z",
        "files": [],
    }  # fmt: skip
    assert BatchManifest.from_json(json.dumps(manifest)).root_rules == {}


BAD_RULES = [
    ('flw = "etl"\nkeep = "forever"', "unknown field 'flw' in policies rule 1"),
    ('flow = "etl"', 'policies rule 1: a rule needs exactly one of retention, keep = "forever"'),
    (
        'state = "RUNNING"\nkeep = "forever"',
        "policies rule 1 state: state RUNNING is never archived",
    ),
    ("keep_last = 0", "policies rule 1 keep_last: Input should be greater than or equal to 1"),
    ('retention = "PT5M"', "retention must be at least 1 hour"),
]


@pytest.mark.parametrize(("rule", "message"), BAD_RULES)
def test_a_bad_rule_is_one_line(tmp_path: Path, rule: str, message: str) -> None:
    config = tmp_path / "archiver.toml"
    config.write_text(f"[[policies]]\n{rule}\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_rule_that_can_never_match_is_rejected_by_the_cli(tmp_path: Path) -> None:
    config = write_config(tmp_path / "archiver.toml", database_url="sqlite+aiosqlite:///x.db")
    config.write_text(
        config.read_text()
        + '[[policies]]\nname = "failed"\nstate = ["FAILED", "CRASHED"]\nretention = "P180D"\n'
        + '[[policies]]\nstate = "FAILED"\nflow = "etl"\nkeep = "forever"\n'
    )
    result = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid setting policies: ")
    assert "rule 'rule-2' can never match: rule 'failed' before it matches every run" in lines[0]


def test_the_example_policies_load(tmp_path: Path) -> None:
    """config.example.toml carries a commented-out policy; uncommented, it loads."""
    text = (ROOT / "config.example.toml").read_text()
    start = text.index("# [[policies]]")
    end = text.index("\n\n", text.rindex("# [[policies]]"))
    config = tmp_path / "policies.toml"
    config.write_text("\n".join(line.removeprefix("# ") for line in text[start:end].splitlines()))
    settings = load_settings(config)
    assert [rule.name for rule in settings.policies] == [
        "production",
        "last-10",
        "failed",
        "rule-4",
    ]
    assert settings.policies[0].deployment == ["etl/production"]


def test_a_dry_run_shows_each_rule(
    sqlite_database: TestDatabase, local_storage: TestStorage, tmp_path: Path
) -> None:
    run(sqlite_database, 200, state_type="FAILED")
    run(sqlite_database, 100, state_type="FAILED")
    run(sqlite_database, 120, tags=["legal-hold"])  # older than the default 90 days
    config = write_config(
        tmp_path / "archiver.toml", local_storage, database_url=sqlite_database.url
    )
    config.write_text(
        config.read_text()
        + '[[policies]]\nname = "failed"\nstate = "FAILED"\nretention = "P180D"\n'
    )

    result = CliRunner().invoke(app, ["run", "--config", str(config)])

    assert result.exit_code == 0, result.output
    assert "1 expired top-level runs under the retention rules" in result.stderr
    report = json.loads(result.stdout.splitlines()[-1])  # stdout is not a terminal: JSON lines
    rules = {rule["rule"]: rule for rule in report["rules"]}
    assert [rules["failed"][key] for key in ("selected", "kept", "held")] == [1, 1, 0]
    assert [rules["default"][key] for key in ("selected", "kept", "held")] == [0, 0, 1]
    assert "failed" in result.stderr and "legal hold" in result.stderr  # the rule table
    planned = CliRunner().invoke(app, ["plan", "--json", "--config", str(config)])
    assert planned.exit_code == 0, planned.output
    plan_rules = {rule["rule"]: rule for rule in json.loads(planned.stdout)["rules"]}
    assert plan_rules == rules  # plan counts per rule exactly as the dry run does
    assert sqlite_database.count("flow_run") == 3
