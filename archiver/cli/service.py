"""`archiver run` as an operator's process: signals, one run or a loop, metrics, progress.

SIGTERM or SIGINT sets a stop request: the batch in hand commits or rolls back
whole (the commit protocol), no new batch starts, a loop stops sleeping, and
the process exits 0. A second signal stops at once, as a kill does; the next
run's recovery resolves a batch it interrupted (docs/commit-protocol.md).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from archiver.cli.console import Reporter
from archiver.cli.metrics import Metrics
from archiver.cli.schedule import LoopListeners, Schedule, run_on_schedule
from archiver.cli.settings import Settings
from archiver.engine.commit import StepHook
from archiver.engine.options import RunOptions
from archiver.engine.results import BatchReport, RunReport
from archiver.engine.run import run
from archiver.errors import ArchiverError
from archiver.source.engine import DatabaseOptions

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_options(settings: Settings, *, dry_run: bool | None = None) -> RunOptions:
    """Plain run options from settings; a dry run unless ``enabled`` (or ``dry_run=False``)."""
    return RunOptions(
        database=database_options(settings),
        storage_url=settings.storage_url,
        storage_options=settings.storage_options,
        retention_period=settings.retention_period,
        batch_size=settings.batch_size,
        batch_interval=settings.batch_interval,
        max_batches=settings.max_batches,
        read_ahead=settings.read_ahead,
        compression=settings.compression,
        dry_run=not settings.enabled if dry_run is None else dry_run,
        vacuum=settings.vacuum,
        policies=tuple(settings.policies),
        legal_hold_tag=settings.legal_hold_tag or None,
        sweeps=tuple(settings.sweeps),
        events_retention_period=settings.events_retention_period,
        sweep_batch_size=settings.sweep_batch_size,
    )


def database_options(settings: Settings) -> DatabaseOptions:
    return DatabaseOptions(
        url=settings.database_url,
        lock_timeout=settings.lock_timeout,
        statement_timeout=settings.statement_timeout,
        busy_timeout=settings.busy_timeout,
    )


@dataclass
class Service:
    """One ``archiver run`` invocation: what to run, how often, and where to report."""

    options: RunOptions
    reporter: Reporter
    schedule: Schedule | None = None
    metrics_file: Path | None = None
    metrics_port: int | None = None
    on_signal: Callable[[str], None] | None = None  # told when a stop is requested

    def __post_init__(self) -> None:
        wanted = self.metrics_file is not None or self.metrics_port is not None
        self.metrics = Metrics() if wanted else None

    def serve(self, hook: StepHook | None = None) -> None:
        """Run once, or on the schedule until a signal; raise the error that ends it."""
        asyncio.run(self._serve(hook))

    async def _serve(self, hook: StepHook | None) -> None:
        stop = asyncio.Event()
        self._write_metrics()  # a bad --metrics-file path fails now, before any batch
        server = None
        if self.metrics is not None and self.metrics_port is not None:
            server = self.metrics.serve(self.metrics_port)
        try:
            with self._stop_on_signals(stop):
                if self.schedule is None:
                    await self._once(stop, hook)
                else:
                    listeners = LoopListeners(
                        self._batch, self._run_ended, self._transient, self.reporter.sleeping
                    )
                    await run_on_schedule(self.options, self.schedule, stop, listeners, hook)
        except ArchiverError as exc:
            self._failed(exc, transient=False)
            raise
        finally:
            if server is not None:
                server.close()

    async def _once(self, stop: asyncio.Event, hook: StepHook | None) -> None:
        report = await run(self.options, hook, on_batch=self._batch, stop=stop)
        self._run_ended(report)

    def _batch(self, report: RunReport, batch: BatchReport) -> None:
        self.reporter.batch(report, batch)
        if self.metrics is not None:
            self.metrics.observe_batch(batch)
            self._write_metrics()

    def _run_ended(self, report: RunReport) -> None:
        self.reporter.run_ended(report)
        if self.metrics is not None:
            self.metrics.observe_run(report)
            self._write_metrics()

    def _transient(self, error: ArchiverError) -> None:
        self._failed(error, transient=True)

    def _failed(self, error: ArchiverError, transient: bool) -> None:
        self.reporter.failed(error, transient)
        if self.metrics is not None:
            if isinstance(error.partial_report, RunReport):
                self.metrics.observe_run(error.partial_report)
            else:
                self.metrics.observe_failure()
            self._write_metrics()

    def _write_metrics(self) -> None:
        if self.metrics is not None and self.metrics_file is not None:
            self.metrics.write_textfile(self.metrics_file)

    @contextmanager
    def _stop_on_signals(self, stop: asyncio.Event) -> Iterator[None]:
        loop = asyncio.get_running_loop()

        def request_stop(signum: signal.Signals) -> None:
            for other in _SIGNALS:  # a second signal gets the default: stop at once
                loop.remove_signal_handler(other)
            stop.set()
            if self.on_signal is not None:
                self.on_signal(signum.name)

        for signum in _SIGNALS:
            loop.add_signal_handler(signum, request_stop, signum)
        try:
            yield
        finally:
            for signum in _SIGNALS:
                loop.remove_signal_handler(signum)
