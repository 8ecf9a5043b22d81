"""archiver: archive expired Prefect runs to Parquet, verify, then delete them.

The library is the product; the ``archiver`` command is a thin layer over it::

    import asyncio
    from archiver import RunOptions, run
    from archiver.source.engine import DatabaseOptions

    report = asyncio.run(run(RunOptions(database=DatabaseOptions(url), storage_url="s3://...")))
"""

from archiver.archive.catalog import open_archive
from archiver.archive.verify import verify_archive
from archiver.engine.options import RunOptions
from archiver.engine.results import BatchReport, RunReport
from archiver.engine.run import run
from archiver.errors import ArchiverError
from archiver.version import __version__

__all__ = [
    "ArchiverError",
    "BatchReport",
    "RunOptions",
    "RunReport",
    "__version__",
    "open_archive",
    "run",
    "verify_archive",
]
