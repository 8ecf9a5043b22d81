"""The Prefect database: engines, reflection, selection of run trees, deletion, the ledger."""
