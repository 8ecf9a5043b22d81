"""The report of one run, as a JSON document: printed, and kept beside the archive.

``_reports/<run_id>.json`` holds what a run did: its outcome, per table the rows
archived and bytes written, the seconds spent in each stage of the batches
(select, encode, upload, verify, delete, commit, manifest), and rows per second.
It is a summary for people and dashboards; the manifests stay the record of what
was archived, so ``verify``, ``ls`` and recovery never read ``_reports/``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from archiver.archive.storage import Storage, report_key
from archiver.engine.results import BatchReport, RunReport
from archiver.version import __version__


def run_report_document(report: RunReport) -> dict[str, Any]:
    """The run report as plain JSON values (no secrets: the database URL is left out)."""
    rows = report.rows
    table_bytes: dict[str, int] = {}
    stages: dict[str, float] = {}
    for batch in report.batches:
        for table, size in batch.table_bytes.items():
            table_bytes[table] = table_bytes.get(table, 0) + size
        for stage, seconds in batch.stages.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    total_rows = sum(rows.values())
    return {
        "event": "report",
        "run_id": report.run_id,
        "outcome": report.outcome,
        "error": report.error,
        "dry_run": report.dry_run,
        "started_at": report.started_at.isoformat(),
        "seconds": round(report.seconds, 3),
        "cutoff": report.cutoff.isoformat(),
        "expired_roots": report.expired_roots,
        "archived_roots": report.archived_roots,
        "skipped_roots": len(report.skipped_roots),
        "held_roots": len(report.held_roots),
        "rules": [asdict(count) for count in report.rule_counts],
        "batches": len(report.batches),
        "rows": total_rows,
        "bytes": report.bytes,
        "rows_per_second": round(total_rows / report.seconds, 1) if report.seconds else 0.0,
        "tables": {
            table: {"rows": rows.get(table, 0), "bytes": table_bytes.get(table, 0)}
            for table in sorted(set(rows) | set(table_bytes))
        },
        "stage_seconds": {stage: round(seconds, 3) for stage, seconds in stages.items()},
        "batch_ids": [batch.batch_id for batch in report.batches],
        "swept": report.swept,
        "sweep_batch_ids": [batch.batch_id for batch in report.sweep_batches],
        "repointed_collections": report.repointed_collections,
        "recovered": report.recovered,
        "warnings": report.warnings,
        "maintenance": asdict(report.maintenance) if report.maintenance else None,
        "archiver_version": __version__,
    }


def batch_event(report: RunReport, batch: BatchReport) -> dict[str, Any]:
    """One progress event: a batch that committed, and how far the run has come."""
    return {
        "event": "batch",
        "run_id": report.run_id,
        "batch_id": batch.batch_id,
        "partition": batch.partition,
        "roots": batch.roots,
        "rows": batch.rows,
        "bytes": batch.bytes,
        "seconds": round(batch.seconds, 3),
        "stage_seconds": {stage: round(seconds, 3) for stage, seconds in batch.stages.items()},
        "done_roots": report.archived_roots + len(report.skipped_roots),
        "expired_roots": report.expired_roots,
    }


def write_run_report(storage: Storage, report: RunReport) -> str:
    """Put the report at ``_reports/<run_id>.json`` (one atomic PUT); return its key.

    Blocking; raises StorageError.
    """
    key = report_key(report.run_id)
    storage.put(key, json.dumps(run_report_document(report), indent=1).encode())
    return key
