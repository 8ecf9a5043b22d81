"""Running archiver as a long-lived process: a schedule, and the loop of runs on it.

Each iteration is a whole :func:`archiver.engine.run.run` (recovery, then batches
until nothing expired is left or a limit is reached). Between runs the loop
sleeps until the schedule's next time, waking at once when ``stop`` is set.

A failed run is one of two kinds. A transient one (the database or storage
went away, a batch kept conflicting with Prefect) is reported to ``on_error``
and the loop goes on: the failed batch rolled back whole, and the next run
starts with recovery. Anything else (bad settings, a schema archiver does not
understand, an archive that does not read back as written) would fail the same
way on the next run, so it is raised and the process should exit non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cronsim import CronSim, CronSimError
from pydantic import TypeAdapter, ValidationError

from archiver.engine.commit import StepHook
from archiver.engine.options import RunOptions
from archiver.engine.results import BatchListener, RunReport
from archiver.engine.run import run
from archiver.errors import (
    ArchiverError,
    BatchError,
    ConfigError,
    SchemaError,
    VerificationError,
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SHORT = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str, what: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``1h30m``, ``2d``, plain seconds, or ISO 8601 (``PT1H``).

    Raises ConfigError naming ``what`` (the option) on anything else.
    """
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        value += "s"
    if value and _SHORT.sub("", value) == "":
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _SHORT.findall(value))
        duration = timedelta(seconds=seconds)
    else:
        try:
            duration = TypeAdapter(timedelta).validate_python(text.strip())
        except ValidationError:
            raise ConfigError(
                f"{what} {text!r} is not a duration",
                hint="write it like 90s, 15m, 1h, 1h30m, 2d, 3600 or PT1H",
            ) from None
    if duration <= timedelta(0):
        raise ConfigError(f"{what} must be positive, got {text!r}", hint="e.g. 1h")
    return duration


@dataclass(frozen=True)
class Schedule:
    """When the loop runs: every fixed interval (first run at once), or on a cron expression."""

    every: timedelta | None = None
    cron: str | None = None

    @classmethod
    def parse(cls, every: str | None, cron: str | None) -> Schedule:
        """Build from the CLI's ``--every``/``--cron``; exactly one must be given."""
        if (every is None) == (cron is None):
            raise ConfigError(
                "--loop needs exactly one of --every and --cron",
                hint='e.g. --loop --every 1h, or --loop --cron "0 * * * *"',
            )
        if every is not None:
            return cls(every=parse_duration(every, "--every"))
        assert cron is not None
        try:
            next(CronSim(cron, datetime.now(UTC)))
        except (CronSimError, StopIteration, ValueError) as exc:
            raise ConfigError(
                f"--cron {cron!r} is not a cron expression ({exc})",
                hint='five fields: minute hour day month weekday, e.g. "0 * * * *" (UTC)',
            ) from None
        return cls(cron=cron)

    def first_run(self, now: datetime) -> datetime:
        return now if self.every is not None else self.next_run(now, now)

    def next_run(self, last_start: datetime, now: datetime) -> datetime:
        """The next time to run after a run that started at ``last_start`` (times in UTC).

        An interval counts from the start of the last run; a run that overran
        its slot is followed at once, never by a pile of runs.
        """
        if self.every is not None:
            return max(last_start + self.every, now)
        assert self.cron is not None
        return next(CronSim(self.cron, now.astimezone(UTC)))

    def describe(self) -> str:
        return f"every {self.every}" if self.every is not None else f"on cron {self.cron!r} (UTC)"


def is_transient(exc: ArchiverError) -> bool:
    """Whether the next run may well succeed where this one failed."""
    cause = exc.cause if isinstance(exc, BatchError) else exc
    return not isinstance(cause, ConfigError | SchemaError | VerificationError)


RunListener = Callable[[RunReport], None]
ErrorListener = Callable[[ArchiverError], None]
SleepListener = Callable[[datetime], None]


@dataclass
class LoopListeners:
    """Who hears what the loop does; every one is optional."""

    on_batch: BatchListener | None = None
    on_run: RunListener | None = None  # a run ended (done, a limit, or stopped)
    on_error: ErrorListener | None = None  # a run failed transiently; the loop goes on
    on_sleep: SleepListener | None = None  # sleeping until this time


async def run_on_schedule(
    options: RunOptions,
    schedule: Schedule,
    stop: asyncio.Event,
    listeners: LoopListeners | None = None,
    hook: StepHook | None = None,
) -> int:
    """Run archiver on ``schedule`` until ``stop`` is set; return the number of runs.

    Raises the first non-transient ArchiverError (see :func:`is_transient`).
    """
    heard = listeners or LoopListeners()
    runs = 0
    wake = schedule.first_run(datetime.now(UTC))
    while not await _sleep_until(wake, stop, heard.on_sleep):
        started = datetime.now(UTC)
        runs += 1
        try:
            report = await run(options, hook, on_batch=heard.on_batch, stop=stop)
        except ArchiverError as exc:
            if not is_transient(exc):
                raise
            if heard.on_error is not None:
                heard.on_error(exc)
        else:
            if heard.on_run is not None:
                heard.on_run(report)
        wake = schedule.next_run(started, datetime.now(UTC))
    return runs


async def _sleep_until(wake: datetime, stop: asyncio.Event, on_sleep: SleepListener | None) -> bool:
    """Wait until ``wake``; True if ``stop`` was set first (or already)."""
    seconds = (wake - datetime.now(UTC)).total_seconds()
    if seconds > 0 and not stop.is_set():
        if on_sleep is not None:
            on_sleep(wake)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
