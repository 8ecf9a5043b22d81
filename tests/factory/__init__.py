"""Test harness objects and Prefect-shaped run data written with plain SQL.

Import it as ``from tests import factory`` and use ``factory.make_tree(...)``; every name a
test needs is here. Where each thing is made, for a reader who wants to change it:

* ``database``: :class:`TestDatabase`, sync engines and URLs for one Prefect database;
* ``storage``: :class:`TestStorage`, one archive root (a local folder or S3 on moto);
* ``values``: values as Prefect binds them per dialect (``adapt``), and back (``normalize``);
* ``schema``: ``RUN_TABLES``, ``TREE_TABLES`` and state types, as the tests know them;
* ``trees``: :func:`make_tree` and :func:`make_trees`, whole run trees level by level, built
  from ``flow_runs`` (a flow run and its inputs), ``tasks`` (task runs, cache rows, a
  subflow's parent task run), ``states`` (timelines and state rows), ``logs``,
  ``artifacts`` and ``content`` (ids and realistic JSON, names and messages);
* ``build``: :class:`Tree` (the ids handed back), ``Batch`` (the rows to write) and writing;
* ``rows``: single rows: :func:`make_flow`, :func:`make_deployment`, :func:`make_log`,
  :func:`make_artifact`;
* ``snapshots``: :func:`snapshot`, :func:`snapshot_ids` and :func:`snapshot_diff`.

Ids handed back are always lowercase ``str``.
"""

from tests.factory.build import Tree
from tests.factory.content import LONG_LOG_LENGTH, uuid4
from tests.factory.database import (
    PG_ADMIN_DSN,
    PG_HOST,
    PG_PORT,
    PG_USER,
    TestDatabase,
    postgres_url,
)
from tests.factory.rows import SQL_NULL, make_artifact, make_deployment, make_flow, make_log
from tests.factory.schema import RUN_TABLES, TREE_TABLES
from tests.factory.snapshots import (
    Rows,
    Snapshot,
    TableDiff,
    db_rows,
    snapshot,
    snapshot_diff,
    snapshot_ids,
)
from tests.factory.storage import TestStorage
from tests.factory.trees import make_tree, make_trees

__all__ = [
    "LONG_LOG_LENGTH",
    "PG_ADMIN_DSN",
    "PG_HOST",
    "PG_PORT",
    "PG_USER",
    "RUN_TABLES",
    "SQL_NULL",
    "TREE_TABLES",
    "Rows",
    "Snapshot",
    "TableDiff",
    "TestDatabase",
    "TestStorage",
    "Tree",
    "db_rows",
    "make_artifact",
    "make_deployment",
    "make_flow",
    "make_log",
    "make_tree",
    "make_trees",
    "postgres_url",
    "snapshot",
    "snapshot_diff",
    "snapshot_ids",
    "uuid4",
]
