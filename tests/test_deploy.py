"""The deployment examples in docs/deploy/ work, as far as this machine can run them.

Kubernetes: the manifests parse and their container commands and environment, run
here as they would run in the pod, archive a real database. systemd: systemd itself
verifies the units, and the service's ExecStart runs. Prefect: the flow is served as
a deployment to a Prefect server the test starts on the database being archived, and
a run of that deployment archives its expired runs.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from archiver.cli.app import app
from tests import factory
from tests.factory import TestDatabase, TestStorage
from tests.helpers import EXPIRED, RECENT, write_config
from tests.oracle import assert_archive_consistent, assert_nothing_lost

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "docs" / "deploy"


def make_backlog(db: TestDatabase) -> dict[str, set[str]]:
    for i in range(2):
        factory.make_tree(db, end_time=EXPIRED - timedelta(minutes=i))
    factory.make_tree(db, end_time=RECENT)
    return factory.snapshot_ids(db)


def reports(storage: TestStorage) -> list[dict[str, Any]]:
    keys = [k for k in storage.keys(".json") if k.startswith("_reports/")]
    return [json.loads(storage.read_bytes(key)) for key in keys]


def test_kubernetes_manifests_run_as_written(
    tmp_path: Path, sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    cronjob, deployment = yaml.safe_load_all((DEPLOY / "kubernetes-cronjob.yaml").read_text())
    assert cronjob["kind"] == "CronJob" and deployment["kind"] == "Deployment"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    command = container["command"]
    assert command[:2] == ["archiver", "run"] and "--max-runtime" in command
    loop = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert loop[:3] == ["archiver", "run", "--loop"] and "--metrics-port" in loop
    before = make_backlog(sqlite_database)

    env = {item["name"]: item.get("value") for item in container["env"]}
    env.update(ARCHIVER_DATABASE_URL=sqlite_database.url, ARCHIVER_STORAGE_URL=local_storage.url,
               ARCHIVER_RETENTION_PERIOD="P30D", ARCHIVER_BATCH_INTERVAL="0")  # fmt: skip
    result = CliRunner().invoke(app, command[1:], env=env)

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["archived_roots"] == 2
    assert_nothing_lost(sqlite_database, local_storage, before)
    assert sqlite_database.count("flow_run", "parent_task_run_id IS NULL") == 1


def test_systemd_units_verify_and_the_service_runs(
    tmp_path: Path, sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "archiver.service")
    command = shlex.split(unit["Service"]["ExecStart"])
    assert command[:2] == ["/opt/archiver/bin/archiver", "run"] and "--metrics-file" in command
    assert unit["Service"]["Type"] == "oneshot"
    timer = configparser.ConfigParser(interpolation=None, strict=False)
    timer.read(DEPLOY / "archiver.timer")
    assert timer["Timer"]["OnCalendar"] == "hourly"

    # systemd checks the units, with ExecStart pointing at the archiver installed here
    archiver = Path(sys.executable).parent / "archiver"
    units = tmp_path / "units"
    units.mkdir()
    service_text = (DEPLOY / "archiver.service").read_text()
    (units / "archiver.service").write_text(service_text.replace(command[0], str(archiver)))
    shutil.copy(DEPLOY / "archiver.timer", units / "archiver.timer")
    analyze = shutil.which("systemd-analyze")
    if analyze:  # present on this machine; a machine without systemd checks the rest
        checked = subprocess.run([analyze, "verify", *sorted(map(str, units.iterdir()))],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr

    # ExecStart as written, with this test's config and metrics paths
    before = make_backlog(sqlite_database)
    config = write_config(tmp_path / "archiver.toml", local_storage, retention_period="P30D",
                          database_url=sqlite_database.url, batch_interval=0)  # fmt: skip
    metrics = tmp_path / "archiver.prom"
    args = [str(config) if a.endswith(".toml") else str(metrics) if a.endswith(".prom") else a
            for a in command[1:]]  # fmt: skip
    env = dict(line.split("=", 1) for line in unit["Service"]["Environment"].split())
    result = CliRunner().invoke(app, args, env=env)

    assert result.exit_code == 0, result.output
    assert "archiver_batches_total 1.0" in metrics.read_text()
    assert_nothing_lost(sqlite_database, local_storage, before)


# --- Prefect: serve the flow as a deployment, run it through a Prefect server ----------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def api(base: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def wait_until(
    check: Callable[[], Any], what: str, timeout: float, *children: subprocess.Popen[bytes]
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass  # not listening yet, or the deployment is not there yet
        for child in children:
            if child.poll() is not None:
                pytest.fail(f"{child.args!r} exited {child.returncode} before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.25)


@contextmanager
def background(
    command: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group: `prefect server start` runs uvicorn as a grandchild."""
    with open(log, "wb") as output:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        yield child
    finally:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with suppress(ProcessLookupError):
                os.killpg(child.pid, signum)
            try:
                child.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        with suppress(ProcessLookupError):  # grandchildren that outlived the child
            os.killpg(child.pid, signal.SIGKILL)


# `python docs/deploy/prefect_flow.py`, once the server answers; the imports (seconds on
# this machine) overlap the server's start.
SERVE_WHEN_READY = """
import runpy, sys, time, urllib.request
import prefect, archiver.engine.run
deadline = time.monotonic() + 60
while True:
    try:
        urllib.request.urlopen(sys.argv[2] + "/health", timeout=2).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def test_prefect_deployment_archives_the_database_of_its_own_server(
    tmp_path: Path, sqlite_database: TestDatabase, local_storage: TestStorage
) -> None:
    before = make_backlog(sqlite_database)
    port = free_port()
    base = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ARCHIVER_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=sqlite_database.url,
        PREFECT_SERVER_DATABASE_MIGRATE_ON_START="false",  # Prefect's migrations built it
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=base,
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        ARCHIVER_DATABASE_URL=sqlite_database.url,
        ARCHIVER_STORAGE_URL=local_storage.url,
        ARCHIVER_RETENTION_PERIOD="P30D",
        ARCHIVER_BATCH_INTERVAL="0",
        ARCHIVER_ENABLED="true",
        ARCHIVER_CRON="0 3 * * *",
    )
    server_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                  "--port", str(port), "--no-services", "--no-ui"]  # fmt: skip
    serve_cmd = [sys.executable, "-c", SERVE_WHEN_READY, str(DEPLOY / "prefect_flow.py"), base]
    with (
        background(server_cmd, env, tmp_path / "server.log") as server,
        background(serve_cmd, env, tmp_path / "serve.log") as serving,
    ):
        deployment = wait_until(
            lambda: api(base, "/deployments/name/archive-prefect-runs/hourly"),
            "the served deployment", 60, server, serving,
        )  # fmt: skip
        schedules = [s["schedule"].get("cron") for s in deployment["schedules"]]
        assert schedules == ["0 3 * * *"]
        flow_run = wait_until(  # retried: under load Prefect answers 503 (SQLite busy)
            lambda: api(base, f"/deployments/{deployment['id']}/create_flow_run", {}),
            "a flow run of the deployment", 30, server, serving,
        )  # fmt: skip

        def finished() -> Any:
            state = api(base, f"/flow_runs/{flow_run['id']}")["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED") else None

        state = wait_until(finished, "the flow run to finish", 60, server, serving)

    logs = (tmp_path / "serve.log").read_text(errors="replace")
    assert state["type"] == "COMPLETED", logs[-3000:]
    [report] = reports(local_storage)
    assert (report["outcome"], report["archived_roots"]) == ("done", 2)
    assert "archived 2 runs" in logs
    assert_nothing_lost(sqlite_database, local_storage, before)
    assert_archive_consistent(sqlite_database, local_storage)
    # the server's own runs (the flow run just made) are still there, and still readable
    assert flow_run["id"] in sqlite_database.ids("flow_run")
