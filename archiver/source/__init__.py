"""The Prefect database: engines, reflection, selection of run trees, deletion, the ledger.

Owns every SQL statement archiver sends: connecting (asyncpg, aiosqlite) and translating
driver errors, reflecting Prefect's schema, selecting and locking expired run trees, the
keyset walks of the sweeps, deleting archived rows with checked counts, artifact
collections, the ledger, maintenance, and writing restored rows.

May import only the base modules (errors, models, policy, arrow_types, version). Never imports
``archiver.archive`` (storage) or ``archiver.engine``.
"""
