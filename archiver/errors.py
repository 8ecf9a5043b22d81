"""Errors that archiver reports to its users.

Every error says what went wrong and what to do next, in one line, and says
whether anything was deleted. Backend exceptions (asyncpg, sqlite3, botocore,
OSError) are translated into these at the adapter boundary, so callers only
ever catch ``ArchiverError``.

    ArchiverError
    ├── ConfigError          bad settings: fix the config or the environment
    ├── DatabaseError        cannot connect, wrong credentials, query failed
    │   ├── TransientDatabaseError  connection lost, deadlock, rows changed (worth a retry)
    │   │   └── ConcurrentChange   rows under the batch changed while it ran
    │   └── SchemaError      not a Prefect database, or one archiver does not understand
    ├── StorageError         cannot write, read or list the archive storage
    │   └── VerificationError  what storage holds differs from what was written
    └── BatchError           one batch failed; says which step and that it rolled back
"""

from __future__ import annotations

from typing import Any


class ArchiverError(Exception):
    """Base class. ``hint`` tells the user what to try next."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        #: What a run had done before it failed (a RunReport), for the CLI to show.
        self.partial_report: Any = None

    def __str__(self) -> str:
        text = self.message.rstrip(".")
        return f"{text}. Try: {self.hint}" if self.hint else text


class ConfigError(ArchiverError):
    """The settings are invalid."""


class DatabaseError(ArchiverError):
    """The database could not be reached or a statement failed."""


class TransientDatabaseError(DatabaseError):
    """The connection was lost or the server restarted; retrying the batch may succeed."""


class ConcurrentChange(TransientDatabaseError):
    """Rows under a batch changed while it ran; the batch rolled back and can be retried."""


class SchemaError(DatabaseError):
    """The database is not a Prefect database archiver can work on."""


class StorageError(ArchiverError):
    """The archive storage could not be written, read or listed."""


class VerificationError(StorageError):
    """A file read back from storage does not match what was written."""


class BatchError(ArchiverError):
    """A batch failed at ``step``; its transaction was rolled back."""

    def __init__(self, step: str, cause: ArchiverError) -> None:
        super().__init__(
            f"batch failed while {step}: {cause.message.rstrip('.')}; "
            "the batch was rolled back and nothing in it was deleted",
            hint=cause.hint,
        )
        self.step = step
        self.cause = cause
