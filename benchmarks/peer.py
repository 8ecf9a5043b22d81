"""The peer: Prefect 3.9.1's own ``db_vacuum``, called directly, on the same rows.

What Prefect users run today to keep the database small (it deletes and archives nothing).
:func:`vacuum` awaits, in the order Prefect's services schedule them:

1. ``vacuum_old_flow_runs``: per batch of ``batch_size`` expired top-level runs (ordered by
   id, ``FOR UPDATE SKIP LOCKED``), one transaction deletes the flow runs (task runs, states
   and inputs go by cascade; a subflow loses its parent task run, ``ON DELETE SET NULL``,
   becomes top-level and is taken by a later batch); then their logs and artifacts by
   ``flow_run_id``, ``batch_size`` rows per transaction;
2. its orphan pass (``schedule_orphan_vacuum_tasks``): ``vacuum_orphaned_logs``,
   ``vacuum_orphaned_artifacts`` (a cursor over the distinct ``flow_run_id`` values of each
   table, deleting those whose run is gone) and ``vacuum_stale_artifact_collections``.

Each is a plain ``async def`` whose ``db`` parameter we pass
(``provide_database_interface()``); the docket scheduling around them is not involved.

Prefect reads its settings from the environment when it is imported, so the measuring child
gets :func:`vacuum_environment` in its environment before it starts:
``PREFECT_SERVER_DATABASE_CONNECTION_URL`` (the copy, ``postgresql+asyncpg://``), ``PREFECT_HOME``
(a temporary folder), ``PREFECT_SERVER_SERVICES_DB_VACUUM_BATCH_SIZE`` (the benchmark's batch
size, which is also Prefect's default, 200) and ``..._RETENTION_PERIOD``, the seconds from the
moment the child is started back to the benchmark's cutoff. Prefect computes its cutoff as
``now() - retention_period`` when ``vacuum_old_flow_runs`` starts, a few seconds after that
(the child's imports), so its cutoff is those seconds later than the benchmark's; no root ends
within a day of the cutoff (``benchmarks.generate.MARGIN``), so it selects the same roots.
:func:`vacuum` checks the drift is under that margin and reports it.

Prefect's own session settings are used (server defaults: ``random_page_cost`` 4, JIT on), its
maintenance engine has no statement timeout and a pool of one connection, as in production.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from benchmarks.generate import MARGIN, Target

VACUUM = "db_vacuum"
#: Prefect's tasks, in the order its services schedule them, with the name of each phase.
PHASES = (
    ("flow runs", "vacuum_old_flow_runs"),
    ("orphan logs", "vacuum_orphaned_logs"),
    ("orphan artifacts", "vacuum_orphaned_artifacts"),
    ("stale collections", "vacuum_stale_artifact_collections"),
)


def vacuum_environment(
    database_url: str, cutoff: datetime, batch_size: int, home: str
) -> dict[str, str]:
    """Prefect's settings for a vacuum of ``database_url`` up to ``cutoff`` (set at spawn)."""
    retention = datetime.now(UTC) - cutoff
    return {
        "PREFECT_HOME": home,
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": Target.parse(database_url).async_url,
        "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": f"{retention.total_seconds():.0f}",
        "PREFECT_SERVER_SERVICES_DB_VACUUM_BATCH_SIZE": str(batch_size),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def import_prefect() -> None:
    """Import what :func:`vacuum` uses (outside the timing, like archiver's imports)."""
    from prefect.server.services import db_vacuum  # noqa: F401


def vacuum(cutoff: datetime) -> tuple[dict[str, float], float]:
    """Run the vacuum to completion: (seconds per phase, cutoff drift in seconds).

    Raises RuntimeError if Prefect's cutoff is not within a day of ``cutoff``.
    """
    from prefect.server.services import db_vacuum
    from prefect.settings.context import get_current_settings

    retention = get_current_settings().server.services.db_vacuum.retention_period
    drift = datetime.now(UTC) - retention - cutoff
    if abs(drift) >= MARGIN:
        raise RuntimeError(f"Prefect's cutoff is {drift} away from the benchmark's")
    return asyncio.run(_phases(db_vacuum)), drift / timedelta(seconds=1)


async def _phases(db_vacuum: object) -> dict[str, float]:
    from prefect.server.database import provide_database_interface
    from prefect.server.database.configurations import ENGINES

    db = provide_database_interface()
    seconds: dict[str, float] = {}
    try:
        for phase, name in PHASES:
            started = time.perf_counter()
            await getattr(db_vacuum, name)(db=db)
            seconds[phase] = time.perf_counter() - started
    finally:  # Prefect caches its engines per event loop; close their connections
        for engine in list(ENGINES.values()):
            await engine.dispose()
        ENGINES.clear()
    return seconds
