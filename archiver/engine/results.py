"""What a run reports: each committed batch (:class:`BatchReport`) and the run as a whole.

Plain data, for the CLI's console, the metrics, the JSON run report
(:mod:`archiver.engine.report`) and library callers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from archiver.engine.commit import new_batch_id
from archiver.source.maintenance import MaintenanceReport
from archiver.source.retention import RuleCount

#: Why a run ended: nothing expired left, or a limit or a stop request came first.
Outcome = Literal["dry_run", "done", "stopped", "max_batches", "max_runtime", "failed"]
#: Called as ``on_batch(run_so_far, batch)`` after each committed batch (progress, metrics).
BatchListener = Callable[["RunReport", "BatchReport"], None]


@dataclass
class BatchReport:
    batch_id: str
    partition: str
    roots: int
    skipped_roots: list[str]
    rows: dict[str, int]
    bytes: int
    seconds: float
    stages: dict[str, float]
    #: bytes written per table, the snapshots (flow, deployment) included
    table_bytes: dict[str, int] = field(default_factory=dict)
    kind: str = "runs"


@dataclass
class RunReport:
    dry_run: bool
    cutoff: datetime
    expired_roots: int
    oldest_end_time: datetime | None
    newest_end_time: datetime | None
    batches: list[BatchReport] = field(default_factory=list)
    skipped_roots: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    run_id: str = field(default_factory=new_batch_id)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    outcome: Outcome = "done"
    error: str | None = None  # the one-line error of a failed run
    maintenance: MaintenanceReport | None = None
    #: roots left alone because their tree carries the legal-hold tag
    held_roots: list[str] = field(default_factory=list)
    #: per retention rule, what it selects and keeps (dry runs with policies only)
    rule_counts: list[RuleCount] = field(default_factory=list)
    #: whether retention rules beyond retention_period were in force
    policies: bool = False
    #: batches of the sweeps (orphans, standalone task runs, collections, events)
    sweep_batches: list[BatchReport] = field(default_factory=list)
    #: artifact collections re-pointed to a remaining artifact (by run or sweep batches)
    repointed_collections: int = 0
    #: dry run: rows each sweep would take (``kind:table``)
    sweep_counts: dict[str, int] = field(default_factory=dict)

    @property
    def swept(self) -> dict[str, dict[str, int]]:
        """Rows archived by the sweeps: batch kind -> table -> rows."""
        totals: dict[str, dict[str, int]] = {}
        for batch in self.sweep_batches:
            by_table = totals.setdefault(batch.kind, {})
            for table, count in batch.rows.items():
                by_table[table] = by_table.get(table, 0) + count
        return totals

    @property
    def archived_roots(self) -> int:
        return sum(batch.roots for batch in self.batches)

    @property
    def rows(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for batch in self.batches:
            for table, count in batch.rows.items():
                totals[table] = totals.get(table, 0) + count
        return totals

    @property
    def bytes(self) -> int:
        return sum(batch.bytes for batch in self.batches)
