"""Small helpers shared by the test modules: run archiver against the test fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from archiver import RunOptions, RunReport, run
from archiver.archive.storage import STORAGE_RETRY
from archiver.engine.commit import StepHook
from archiver.models import NO_BACKOFF
from archiver.source.engine import DatabaseOptions
from tests.factory import TestDatabase, TestStorage

RETENTION = timedelta(days=30)
NOW = datetime.now(UTC)
EXPIRED = NOW - timedelta(days=40)
RECENT = NOW - timedelta(days=2)


def run_options(
    database_url: str, storage_url: str, storage_options: dict[str, Any], **overrides: Any
) -> RunOptions:
    """Options of a real run (no dry run, no pause between batches), ``overrides`` applied."""
    values: dict[str, Any] = {
        "database": DatabaseOptions(database_url),
        "storage_url": storage_url,
        "storage_options": storage_options,
        "retention_period": RETENTION,
        "batch_size": 50,
        "batch_interval": 0,
        "dry_run": False,
        # retried as often as by default, but at once: a test's faults need no back-off
        "batch_backoff": NO_BACKOFF,
        "storage_retry": STORAGE_RETRY.at_once(),
    }
    values.update(overrides)
    return RunOptions(**values)


def options(db: TestDatabase, storage: TestStorage, **overrides: Any) -> RunOptions:
    """:func:`run_options` for the test's database and archive root."""
    return run_options(db.url, storage.url, storage.options, **overrides)


def archive(
    db: TestDatabase, storage: TestStorage, hook: StepHook | None = None, **overrides: Any
) -> RunReport:
    """Run archiver in this process, to its end; its report."""
    return asyncio.run(run(options(db, storage, **overrides), hook))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings and numbers are spelled the same in TOML


def write_config(path: Path, storage: TestStorage | None = None, **settings: Any) -> Path:
    """A TOML config file with these settings, and the test storage's URL and options."""
    if storage is not None:
        settings = {"storage_url": storage.url, **settings}
        if storage.options:
            settings["storage_options"] = storage.options
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in settings.items()))
    return path


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``mount_point`` for the block (``options``: e.g. ``ro,size=16k``).

    Mounting needs root; without it the test is skipped, saying so (CI runs as root).
    """
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs ({options}) needs root: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@contextlib.contextmanager
def moto_process(env: dict[str, str]) -> Iterator[str]:
    """A moto S3 server in its own process with ``env`` (e.g. IAM checks on); its endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def fail_at(step: str) -> StepHook:
    """A hook that raises at ``step`` (an exception in process, not a kill)."""

    def fail(seen_step: str, batch_id: str) -> None:
        if seen_step == step:
            raise RuntimeError(f"injected fault at {step}")

    return fail
