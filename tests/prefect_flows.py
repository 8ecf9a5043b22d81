"""Real Prefect flows, run by Prefect itself against the database under test.

    PREFECT_HOME=... PREFECT_SERVER_DATABASE_CONNECTION_URL=... python -m tests.prefect_flows N

Each parent run has tasks, a subflow with its own task, logs, a keyed artifact and a
markdown artifact, so the database holds what Prefect really writes for such runs.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact


@task
def add(x: int, y: int) -> int:
    get_run_logger().info("adding %s and %s", x, y)
    return x + y


@flow
def child(n: int) -> int:
    get_run_logger().info("child %s: ünïcödé ✓", n)
    create_markdown_artifact(f"# child {n}", key="child-report")
    return add(n, 1)


@flow
def parent(n: int = 2) -> int:
    total = sum(add(i, i) + child(i) for i in range(n))
    get_run_logger().info("total %s", total)
    return total


if __name__ == "__main__":
    for _ in range(int(sys.argv[1])):
        parent()
