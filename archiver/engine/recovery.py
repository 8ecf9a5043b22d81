"""Resolving batches whose fate was left open by a crash.

A pending marker in storage means a batch started writing and has not finished
publishing. Its fate is whatever the ledger says, because the ledger row
commits in the same transaction as the DELETEs:

* ledger has the batch: it committed. Rewrite its manifest from the ledger
  (idempotent) and drop the marker.
* ledger lacks it and no transaction still holds it: it rolled back. Remove the
  files the marker lists, then the marker.
* still held (PostgreSQL advisory lock) by a live archiver: leave it alone.
* written by archiver on another database (another source id): leave it alone;
  only that database's ledger can tell its fate.

On SQLite the recovery transaction takes the write lock, which an in-flight
batch holds for its whole life, so anything found unlocked is abandoned.
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from archiver.archive.manifest import BatchManifest, PendingMarker
from archiver.archive.storage import (
    PENDING_DIR,
    MissingKeyError,
    Storage,
    manifest_key,
    partial_target,
)
from archiver.source import ledger
from archiver.source.engine import translate_error, write_transaction_options


async def recover(engine: AsyncEngine, storage: Storage, source_id: str | None = None) -> list[str]:
    """Resolve every open batch of this database; return one line per batch it touched.

    ``source_id`` is this database's (see :func:`ensure_source`), when the caller has it.
    """
    source_id = source_id or await ensure_source(engine)
    try:
        messages = []
        for key in await asyncio.to_thread(storage.list, PENDING_DIR):
            target = partial_target(key)
            if target is not None and target.endswith(".json"):
                message = await _drop_partial_marker(engine, storage, key, target)
                messages += [message] if message else []
                continue
            if not key.endswith(".json"):
                continue
            try:
                data = await asyncio.to_thread(storage.get, key)
            except MissingKeyError:
                continue  # its archiver finished it between our listing and reading
            marker = PendingMarker.from_json(data, key)
            if marker.source_id != source_id:
                messages.append(f"batch {marker.batch_id} belongs to another database: left alone")
                continue
            message = await _resolve(engine, storage, key, marker)
            if message:
                messages.append(message)
        return messages
    except SQLAlchemyError as exc:
        raise translate_error(exc, str(engine.url)) from None


async def ensure_source(engine: AsyncEngine) -> str:
    """Create the ledger if needed; return this database's source id."""
    try:
        async with engine.connect() as conn:
            # A write in its own IMMEDIATE transaction: upgrading a SQLite read
            # transaction to a write fails at once (SQLITE_BUSY) if another writer
            # committed meanwhile, without waiting for busy_timeout.
            await write_transaction_options(conn)
            async with conn.begin():
                return await ledger.ensure_ledger(conn)
    except (SQLAlchemyError, OSError) as exc:
        raise translate_error(exc, str(engine.url)) from None


async def _resolve(
    engine: AsyncEngine, storage: Storage, marker_key: str, marker: PendingMarker
) -> str | None:
    async with _unless_in_flight(engine, marker.batch_id) as conn:
        if conn is None:
            return None
        committed = await ledger.committed_manifest(conn, marker.batch_id)
        # Storage work happens while we hold the batch's lock, so no second
        # recoverer can act on the same batch at the same time.
        return await asyncio.to_thread(_settle, storage, marker_key, marker, committed)


async def _drop_partial_marker(
    engine: AsyncEngine, storage: Storage, key: str, marker_key: str
) -> str | None:
    """A batch writes no data file before its marker is complete, so a half-written
    marker whose batch is no longer running stands for nothing: remove it."""
    batch_id = posixpath.basename(marker_key).removesuffix(".json")
    async with _unless_in_flight(engine, batch_id) as conn:
        if conn is None:
            return None
        await asyncio.to_thread(storage.delete, key)
    return f"batch {batch_id} had stopped while writing its marker: removed the partial marker"


@asynccontextmanager
async def _unless_in_flight(
    engine: AsyncEngine, batch_id: str
) -> AsyncIterator[AsyncConnection | None]:
    """A write transaction in which ``batch_id`` is known not to be running (None if it is)."""
    async with engine.connect() as conn:
        await write_transaction_options(conn)
        async with conn.begin():
            yield None if await ledger.batch_in_flight(conn, batch_id) else conn


def _settle(storage: Storage, marker_key: str, marker: PendingMarker, committed: str | None) -> str:
    if committed is not None:
        manifest = BatchManifest.from_json(committed, f"ledger entry {marker.batch_id}")
        if manifest.files:  # a rewrite that restored every run of a batch leaves none
            storage.put(manifest_key(marker.batch_id), committed.encode())
        for key in marker.replaces:
            storage.delete(key)
        storage.delete(marker_key)
        return f"batch {marker.batch_id} had committed: wrote its missing manifest"
    for key in marker.keys:
        storage.delete(key)
    storage.delete(marker_key)
    return f"batch {marker.batch_id} had rolled back: removed {len(marker.keys)} files it wrote"
