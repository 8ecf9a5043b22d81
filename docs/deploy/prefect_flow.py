"""Archive the Prefect database from Prefect itself: a flow, served as a deployment on a schedule.

    export PREFECT_API_URL=http://prefect.example.com:4200/api
    export ARCHIVER_DATABASE_URL=postgresql+asyncpg://prefect:secret@db/prefect
    export ARCHIVER_STORAGE_URL=s3://my-bucket/prefect-archive ARCHIVER_ENABLED=true
    python docs/deploy/prefect_flow.py        # serves the deployment "archive-prefect-runs/hourly"

The flow calls archiver's library (``archiver.engine.run.run``) with the settings the
CLI reads (``ARCHIVER_*`` variables, or a TOML file passed as ``config``), so the
rules are the same: it archives only when ``enabled`` is true, and the run report
lands in ``_reports/`` beside the archive and is the flow run's return value.
The flow's own run is never archived: it has not ended, let alone expired.
A failed run raises, so Prefect shows the flow run as Failed; nothing in the
failed batch was deleted. ``global_limit=1`` keeps runs from overlapping.
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from archiver.cli.service import run_options
from archiver.cli.settings import load_settings
from archiver.engine.report import run_report_document
from archiver.engine.results import BatchReport, RunReport
from archiver.engine.run import run


@flow(name="archive-prefect-runs", retries=0)
async def archive_prefect_runs(
    config: str | None = None, max_runtime_minutes: float = 50
) -> dict[str, Any]:
    """One archiver run: expired runs to Parquet, verified, then deleted; returns the report."""
    logger = get_run_logger()
    settings = load_settings(Path(config) if config else None)
    options = replace(run_options(settings), max_runtime=timedelta(minutes=max_runtime_minutes))

    def progress(report: RunReport, batch: BatchReport) -> None:
        done = report.archived_roots + len(report.skipped_roots)
        logger.info("batch %s: %d runs (%d/%d)", batch.batch_id, batch.roots, done,
                    report.expired_roots)  # fmt: skip

    report = await run(options, on_batch=progress)
    document = run_report_document(report)
    logger.info(
        "%s: archived %d runs, %d rows, %.1f MB in %.1f s; report _reports/%s.json",
        report.outcome, report.archived_roots, document["rows"], report.bytes / 1e6,
        report.seconds, report.run_id,
    )  # fmt: skip
    return document


if __name__ == "__main__":
    archive_prefect_runs.serve(
        name="hourly",
        cron=os.environ.get("ARCHIVER_CRON", "17 * * * *"),
        parameters={"config": os.environ.get("ARCHIVER_CONFIG")},
        global_limit=1,
    )
