"""The Prefect database: engines, reflection, selection of run trees, deletion, the ledger.

Owns every SQL statement archiver sends: connecting (asyncpg, aiosqlite) and translating
driver errors, reflecting Prefect's schema, selecting and locking expired run trees, the
keyset walks of the sweeps, deleting archived rows with checked counts, artifact
collections, the ledger, maintenance, and writing restored rows.

The modules, from the bottom up: ``dialect`` (what differs between PostgreSQL
and SQLite: binding lists, times, chunk sizes), ``engine`` (connections and
driver errors), ``schema`` (reflection and its safety checks), ``reader`` (a
batch's set-based reads, with ``copy_csv`` for PostgreSQL's COPY into Arrow),
``retention`` (policies as SQL), ``trees`` (selecting, locking and gathering
expired run trees), ``keyset`` (the one-pass walk of the sweeps) and
``sweep_rows`` (what each sweep takes), ``collections``, ``deletion``,
``ledger``, ``restore_rows`` (inserting restored rows), ``maintenance`` and
``health`` (facts for doctor and plan).

May import only the base modules (errors, models, policy, arrow_types, version).
Never imports ``archiver.archive`` (storage) or ``archiver.engine``.
"""
