"""Prometheus metrics of the runs in this process (prometheus_client, own registry).

Two ways out: a textfile for node_exporter's textfile collector, rewritten
atomically (temporary file, rename) after every batch and every run, which
suits cron and Kubernetes CronJobs; and an HTTP endpoint for a long-running
``archiver run --loop``. Counters count from the start of the process, as
Prometheus counters do; ``rate()`` and ``increase()`` handle the restarts.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, write_to_textfile
from prometheus_client.exposition import start_http_server

from archiver.errors import ArchiverError, ConfigError

if TYPE_CHECKING:
    from archiver.engine.results import BatchReport, RunReport

_BATCH_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The counters, gauges and histogram; feed it batches and runs."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rows = Counter(
            "archiver_rows_archived", "Rows archived and deleted, per table.", ["table"], registry=r
        )
        self.batches = Counter("archiver_batches", "Batches committed.", registry=r)
        self.runs = Counter("archiver_runs", "Runs ended, by outcome.", ["outcome"], registry=r)
        self.failures = Counter("archiver_failures", "Runs that failed with an error.", registry=r)
        self.bytes = Counter("archiver_bytes_written", "Bytes of Parquet written.", registry=r)
        self.stage_seconds = Counter(
            "archiver_stage_seconds", "Seconds spent per batch stage.", ["stage"], registry=r
        )
        self.batch_seconds = Histogram(
            "archiver_batch_duration_seconds", "Seconds per batch.", buckets=_BATCH_SECONDS,
            registry=r,
        )  # fmt: skip
        self.last_success = Gauge(
            "archiver_last_success_timestamp_seconds",
            "Unix time when a run last ended without error.",
            registry=r,
        )
        self.remaining = Gauge(
            "archiver_expired_runs_remaining",
            "Expired top-level runs left in the database when the last run ended.",
            registry=r,
        )

    def observe_batch(self, batch: BatchReport) -> None:
        for table, count in batch.rows.items():
            self.rows.labels(table).inc(count)
        for stage, seconds in batch.stages.items():
            self.stage_seconds.labels(stage).inc(seconds)
        self.batches.inc()
        self.bytes.inc(batch.bytes)
        self.batch_seconds.observe(batch.seconds)

    def observe_run(self, report: RunReport) -> None:
        """A run that ended: done, at a limit, stopped, or failed (``report.outcome``)."""
        self.runs.labels(report.outcome).inc()
        if report.outcome == "failed":
            self.failures.inc()
        else:
            self.last_success.set(time.time())
        done = report.archived_roots + len(report.skipped_roots)
        self.remaining.set(max(report.expired_roots - done, 0))

    def observe_failure(self) -> None:
        """A run that failed before it had a report (the database was unreachable, say)."""
        self.runs.labels("failed").inc()
        self.failures.inc()

    def write_textfile(self, path: Path) -> None:
        """Rewrite ``path`` atomically (node_exporter reads files ending in ``.prom``)."""
        try:
            write_to_textfile(str(path), self.registry)
        except OSError as exc:
            raise ArchiverError(
                f"cannot write the metrics file {path}: {exc.strerror or exc}",
                hint="point --metrics-file at a writable folder",
            ) from None

    def serve(self, port: int, address: str = "0.0.0.0") -> MetricsServer:
        """Serve ``/metrics`` over HTTP from a daemon thread until ``close()``."""
        try:
            server, thread = start_http_server(port, address, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on port {port}: {exc.strerror or exc}",
                hint="choose a free port for --metrics-port",
            ) from None
        return MetricsServer(server, thread)


class MetricsServer:
    """A running metrics endpoint (a WSGI server in a daemon thread)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
