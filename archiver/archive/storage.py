"""Archive storage through fsspec: key layout, atomic writes, fresh read-back.

Keys are relative to the archive root (``storage_url``)::

    <table>/month=YYYY-MM/<batch_id>.parquet   one file per table per batch (Hive layout)
    _pending/<batch_id>.json                   intent marker, written before any data file
    _manifests/<batch_id>.json                 written after the database commit
    _reports/<run_id>.json                     a run's report (a summary, not a record)

Writes are atomic: object stores publish a PUT whole; on a local disk the file
is written under a dot-name (which pyarrow and DuckDB ignore) and renamed.
Reads for verification go to storage every time: the filesystem instance is
private (``skip_instance_cache``) and listing caches are dropped before a read.
Backend errors become :class:`StorageError` here, with a hint; transient ones
are retried first, as the storage's :class:`~archiver.models.RetryPolicy` says
(default :data:`STORAGE_RETRY`: four tries, waiting 0.2 s, 0.4 s and 0.8 s).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from archiver.errors import ConfigError, StorageError
from archiver.models import Backoff, RetryPolicy

T = TypeVar("T")
P = ParamSpec("P")
#: Retries of a storage call that failed for a transient reason (network, throttling, 5xx).
STORAGE_RETRY = RetryPolicy(attempts=4, backoff=Backoff(first=0.2, longest=3))
PENDING_DIR = "_pending"
MANIFEST_DIR = "_manifests"
REPORT_DIR = "_reports"


class TransientStorageError(StorageError):
    """A failure worth retrying (network, throttling, 5xx)."""


class MissingKeyError(StorageError):
    """The key (or the bucket or folder above it) does not exist."""


def data_key(table: str, partition: str, batch_id: str) -> str:
    return f"{table}/{partition}/{batch_id}.parquet"


def pending_key(batch_id: str) -> str:
    return f"{PENDING_DIR}/{batch_id}.json"


def manifest_key(batch_id: str) -> str:
    return f"{MANIFEST_DIR}/{batch_id}.json"


def report_key(run_id: str) -> str:
    return f"{REPORT_DIR}/{run_id}.json"


def _retrying(
    method: Callable[Concatenate[Storage, P], T],
) -> Callable[Concatenate[Storage, P], T]:
    """Retry ``method`` on TransientStorageError as its storage's policy says."""

    @functools.wraps(method)
    def call(self: Storage, /, *args: P.args, **kwargs: P.kwargs) -> T:
        policy = self.retry
        retrying = Retrying(
            retry=retry_if_exception_type(TransientStorageError),
            stop=stop_after_attempt(policy.attempts),
            wait=wait_exponential(multiplier=policy.backoff.first, max=policy.backoff.longest),
            reraise=True,
        )
        return retrying(method, self, *args, **kwargs)

    return call


class Storage:
    """One archive root on one fsspec filesystem. Methods are blocking; call them in a thread."""

    def __init__(
        self, url: str, options: dict[str, Any] | None = None, retry: RetryPolicy = STORAGE_RETRY
    ) -> None:
        self.url = url.rstrip("/")
        self.retry = retry
        options = dict(options or {})
        try:
            self.fs, self.root = url_to_fs(self.url, skip_instance_cache=True, **options)
        except (ValueError, ImportError, TypeError) as exc:
            raise ConfigError(
                f"cannot use storage_url {url!r}: {exc}",
                hint="use a local folder or an fsspec URL such as s3://bucket/prefix",
            ) from None
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def key_of(self, path: str) -> str:
        """The key of a full filesystem path under the root."""
        return str(path).removeprefix(self.root + "/")

    def describe(self, key: str = "") -> str:
        return f"{self.url}/{key}" if key else self.url

    @_retrying
    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` so that readers see all of it or nothing."""
        path = self.path(key)
        with self._translate("writing", key):
            if self.is_local:
                _write_durably(path, data)
            else:
                self.fs.pipe_file(path, data)

    @_retrying
    def get(self, key: str) -> bytes:
        """Read ``key`` from storage itself, never from a cache."""
        with self._translate("reading", key):
            self.fs.invalidate_cache()
            data: bytes = self.fs.cat_file(self.path(key))
            return data

    @_retrying
    def delete(self, key: str) -> None:
        """Remove ``key`` (and a local partial write of it); a missing key is fine."""
        path = self.path(key)
        doomed = [path, _partial_path(path)] if self.is_local else [path]
        with self._translate("deleting", key):
            self.fs.invalidate_cache()
            for victim in doomed:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(victim)

    @_retrying
    def list(self, folder: str) -> list[str]:
        """Keys directly under ``folder`` (relative to the root), sorted."""
        path = self.path(folder)
        with self._translate("listing", folder):
            self.fs.invalidate_cache()
            if not self.fs.exists(path):
                return []
            names = self.fs.ls(path, detail=False)
        prefix = self.root + "/"
        return sorted(str(name).removeprefix(prefix) for name in names)

    def check_reachable(self) -> None:
        """Fail early, before any database work, if the archive root cannot be reached."""
        with self._translate("checking", ""):
            self.fs.invalidate_cache()
            if self.is_local:
                self.fs.makedirs(self.root, exist_ok=True)
            else:  # a real request: exists() would hide denied credentials as "missing"
                self.fs.ls(self.root.split("/", 1)[0], detail=False)

    @contextmanager
    def _translate(self, action: str, key: str) -> Iterator[None]:
        where = self.describe(key)
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError as exc:
            raise MissingKeyError(
                f"{action} {where} failed: not found ({exc})",
                hint="check that the bucket or folder in storage_url exists",
            ) from None
        except PermissionError as exc:
            raise StorageError(
                f"{action} {where} failed: access denied ({exc})",
                hint="check the credentials in storage_options or the environment",
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageError(
                    f"{action} {where} failed: no space left on the device",
                    hint="free space or point storage_url at a larger volume",
                ) from None
            if exc.errno in (errno.EROFS, errno.EACCES):
                raise StorageError(
                    f"{action} {where} failed: {exc.strerror}",
                    hint="make storage_url writable by this user",
                ) from None
            raise TransientStorageError(f"{action} {where} failed: {_one_line(exc)}") from exc
        except Exception as exc:  # botocore/aiohttp errors that s3fs does not translate
            raise TransientStorageError(
                f"{action} {where} failed: {type(exc).__name__}: {_one_line(exc)}",
                hint="check storage_url, the endpoint and the network",
            ) from exc


def _write_durably(path: str, data: bytes) -> None:
    """Write, fsync, rename into place, fsync the folder: the file survives a power cut.

    The database COMMIT that follows is durable, so the archive must be too.
    """
    folder = posixpath.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temporary = _partial_path(path)
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    # os.replace, not fs.mv: shutil.move would move *into* a folder in the way.
    os.replace(temporary, path)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _partial_path(path: str) -> str:
    """Where a local write of ``path`` goes before it is renamed into place."""
    folder, name = posixpath.split(path)
    return f"{folder}/.{name}.partial"


def partial_target(key: str) -> str | None:
    """The key that ``key`` is a half-done local write of, if it is one."""
    folder, name = posixpath.split(key)
    if not (name.startswith(".") and name.endswith(".partial")):
        return None
    return posixpath.join(folder, name[1 : -len(".partial")])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
