"""What one run is told, as plain values, and the defaults the CLI's settings share.

The engine never reads settings or the environment: ``archiver.cli`` builds a
:class:`RunOptions` from its settings and passes it in, and its settings take their
defaults from the constants here, so a default is written down once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from archiver.archive.codec import DEFAULT_COMPRESSION
from archiver.archive.storage import STORAGE_RETRY
from archiver.engine.sweeps import (
    DEFAULT_EVENTS_RETENTION,
    DEFAULT_SWEEPS,
    SweepName,
    SweepOptions,
)
from archiver.errors import ConfigError
from archiver.models import Backoff, RetryPolicy
from archiver.policy import DEFAULT_LEGAL_HOLD_TAG, RetentionPolicy, Rule
from archiver.source.engine import DatabaseOptions

DEFAULT_RETENTION = timedelta(days=90)
DEFAULT_BATCH_SIZE = 200
DEFAULT_BATCH_INTERVAL = 0.5
DEFAULT_SWEEP_BATCH_SIZE = 5000
DEFAULT_READ_AHEAD = 1
DEFAULT_BATCH_ATTEMPTS = 3
#: the waits before a failed batch is tried again: 0.5 s, then 1 s, ..., at most 10 s
BATCH_BACKOFF = Backoff(first=0.5, longest=10)


@dataclass(frozen=True)
class RunOptions:
    """Everything one run needs, as plain values (the CLI builds it from Settings)."""

    database: DatabaseOptions
    storage_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    retention_period: timedelta = DEFAULT_RETENTION
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_interval: float = DEFAULT_BATCH_INTERVAL
    max_batches: int | None = None
    compression: str = DEFAULT_COMPRESSION
    #: tries per batch that fails for a transient reason, and the waits between them
    batch_attempts: int = DEFAULT_BATCH_ATTEMPTS
    batch_backoff: Backoff = BATCH_BACKOFF
    #: how a storage call that failed for a transient reason is retried
    storage_retry: RetryPolicy = STORAGE_RETRY
    dry_run: bool = True
    vacuum: bool = False  # after the batches, reclaim space (source/maintenance.py)
    now: datetime | None = None  # the clock, for tests; default: the current UTC time
    #: start no batch that would end after this much time (judged by the longest batch so far)
    max_runtime: timedelta | None = None
    write_report: bool = True  # put _reports/<run_id>.json in the archive after a run
    #: retention rules, first match wins; runs no rule matches use retention_period
    policies: tuple[Rule, ...] = ()
    #: trees with a flow run carrying this tag are never archived (None: no legal hold)
    legal_hold_tag: str | None = DEFAULT_LEGAL_HOLD_TAG

    sweeps: tuple[SweepName, ...] = DEFAULT_SWEEPS  # run after the run batches
    events_retention_period: timedelta = DEFAULT_EVENTS_RETENTION
    sweep_batch_size: int = DEFAULT_SWEEP_BATCH_SIZE  # rows of the swept table per batch
    #: PostgreSQL: batches locked, read and encoded on their own connections while one
    #: is written and deleted (0: none; SQLite has one writer, so it never reads ahead)
    read_ahead: int = DEFAULT_READ_AHEAD

    @property
    def cutoff(self) -> datetime:
        return (self.now or datetime.now(UTC)) - self.retention_period

    def policy(self) -> RetentionPolicy:
        """The retention policy; raises ConfigError for a rule that is invalid or never matches."""
        try:
            return RetentionPolicy(self.policies, self.retention_period, self.legal_hold_tag)
        except ValueError as exc:
            raise ConfigError(
                f"invalid retention policy: {exc}", hint="fix the policies in the config"
            ) from None

    def sweep_options(self) -> SweepOptions:
        now = self.now or datetime.now(UTC)
        return SweepOptions(
            sweeps=self.sweeps,
            cutoff=self.cutoff,
            events_cutoff=now - self.events_retention_period,
            now=now,
            batch_size=self.sweep_batch_size,
        )


def short_retention_warnings(policy: RetentionPolicy) -> list[str]:
    """A warning when any rule keeps runs less than a day (also for ``archiver plan``)."""
    short = [
        rule.name
        for rule in policy.effective_rules
        if rule.retention is not None and rule.retention < timedelta(days=1)
    ]
    if not short:
        return []
    what = "retention_period" if short == ["default"] else f"the retention of {short}"
    return [
        f"{what} is under a day: Prefect's cancellation clean-up may still be "
        "writing to cancelled runs archiver takes (a day or more is safe)"
    ]
