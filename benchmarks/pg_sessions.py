"""One connection and one transaction per batch, through asyncpg or ADBC, for benchmarks.pg_paths.

Both sessions offer the same few calls (:class:`Session`), so a plan (benchmarks.pg_plans)
runs unchanged on either driver. Each call is timed by step and by table, wall seconds and the
CPU ticks of the connection's backend (``/proc/<pid>/stat``, read before and after).

Columns are read the way archiver's archive needs them (``archiver.archive.codec``):

* asyncpg: ``COPY (...) TO STDOUT (FORMAT csv, FORCE_QUOTE *)`` parsed by ``copy_csv.from_csv``,
  intervals selected as integer microseconds, with ``TimeZone`` UTC and ``DateStyle`` ISO for
  the transaction, exactly as archiver's reader does; or ``FORMAT binary``, kept as bytes
  (nothing here decodes PostgreSQL's binary COPY in Python).
* ADBC (``adbc_driver_postgresql``): the driver prepares the statement to learn its columns,
  then runs it as ``COPY (...) TO STDOUT (FORMAT binary)`` and decodes into Arrow in C++;
  UUIDs selected as text (ADBC's own UUID is 16 bytes, and Arrow has no cast to the
  canonical text), intervals as microseconds, the rest converted by :func:`to_archive_types`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg  # type: ignore[import-untyped]
import pyarrow as pa

from archiver.arrow_types import ARROW_TYPES
from archiver.models import Kind, TableShape
from archiver.source.copy_csv import from_csv
from benchmarks.backend_cpu import backend_ticks
from benchmarks.generate import Target

STEPS = ("select", "read", "returning", "delete", "decode", "commit")
SESSION = {"application_name": "benchmarks.pg_paths", "random_page_cost": "1.1", "jit": "off"}
_UUIDS = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")


def uuid_array(ids: Sequence[str]) -> str:
    """A ``uuid[]`` literal (COPY takes no parameters); refuses anything but UUIDs."""
    if not all(_UUIDS.fullmatch(value) for value in ids):
        raise ValueError("not a UUID")
    return "'{" + ",".join(ids) + "}'::uuid[]"


def select_list(shape: TableShape, *, uuid_text: bool) -> str:
    """The columns as COPY or ADBC reads them: intervals as integer microseconds (as archiver
    reads them today), UUIDs as text for ADBC (its native UUID is 16 bytes, and Arrow has no
    cast from those to the archive's canonical text)."""
    parts = []
    for column in shape.columns:
        name = f'"{column.name}"'
        if column.kind is Kind.INTERVAL:
            parts.append(f"(extract(epoch FROM {name}) * 1000000)::int8 AS {name}")
        elif column.kind is Kind.UUID and uuid_text:
            parts.append(f"{name}::text AS {name}")
        else:
            parts.append(name)
    return ", ".join(parts)


def to_archive_types(table: pa.Table, shape: TableShape) -> pa.Table:
    """ADBC's Arrow as the archive's types (``ARROW_TYPES``); zero-copy where it can be.

    ADBC gives jsonb as the ``arrow.json`` extension (its storage is the text), enums as
    string, int2/int4 as int16/int32, timestamptz as ``timestamp[us, UTC]``.
    """
    columns = []
    for index, column in enumerate(shape.columns):
        values = table.column(index)
        if isinstance(values.type, pa.ExtensionType):
            values = pa.chunked_array(
                [chunk.storage for chunk in values.chunks], values.type.storage_type
            )
        wanted = ARROW_TYPES[column.kind]
        if column.kind is Kind.INTERVAL:
            values = values.cast(pa.int64()).cast(wanted)
        elif values.type != wanted:
            values = values.cast(wanted)
        columns.append(values)
    return pa.Table.from_arrays(columns, names=shape.column_names)


def empty_table(shape: TableShape) -> pa.Table:
    return pa.table({c.name: pa.array([], ARROW_TYPES[c.kind]) for c in shape.columns})


class Session(Protocol):
    """What a variant asks of its connection. ``read`` and ``returning`` run a query (a
    SELECT, or a DELETE ... RETURNING) and hand back its rows as Arrow in the archive's types,
    or None when the session does not decode (``mixed-binary``)."""

    decodes: bool
    steps: Steps

    def backend_pid(self) -> int: ...
    def begin(self) -> None: ...
    def commit(self) -> None: ...
    def ids(self, sql: str) -> list[str]: ...
    def count(self, sql: str) -> int: ...
    def delete(self, sql: str) -> int: ...
    def read(self, sql: str, shape: TableShape, *, step: str = "read") -> pa.Table | None: ...
    def close(self) -> None: ...


@dataclass
class Steps:
    """Wall seconds and backend CPU ticks per step, and per step and table (``table`` is set
    by the plan before each call), summed over the batches."""

    pid: int = 0
    table: str = ""
    wall: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEPS, 0.0))
    ticks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEPS, 0))
    table_wall: dict[str, float] = field(default_factory=dict)
    table_ticks: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def timing(self, step: str) -> Iterator[None]:
        ticks, started = backend_ticks(self.pid) or 0, time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            spent = (backend_ticks(self.pid) or 0) - ticks
            self.wall[step] += seconds
            self.ticks[step] += spent
            key = f"{step} {self.table}" if self.table else step
            self.table_wall[key] = self.table_wall.get(key, 0.0) + seconds
            self.table_ticks[key] = self.table_ticks.get(key, 0) + spent


class AsyncpgSession:
    """asyncpg, driven from synchronous code by a loop of its own; COPY ... TO STDOUT."""

    def __init__(self, url: str, copy_format: str) -> None:
        self.loop = asyncio.new_event_loop()
        target = Target.parse(url).url
        self.conn: Any = self.loop.run_until_complete(
            asyncpg.connect(
                host=target.host, port=target.port, user=target.username,
                database=target.database, server_settings=SESSION,
            )
        )  # fmt: skip
        self.copy_format = copy_format  # csv | binary
        self.decodes = copy_format == "csv"
        self.steps = Steps(pid=self.backend_pid())
        self.transaction: Any = None

    def _run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)

    def backend_pid(self) -> int:
        return int(self._run(self.conn.fetchval("SELECT pg_backend_pid()")))

    def begin(self) -> None:
        with self.steps.timing("select"):
            self.transaction = self.conn.transaction()
            self._run(self.transaction.start())
            # As archiver's reader: ISO UTC text for the CSV parser, for this transaction.
            self._run(self.conn.execute("SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO'"))

    def commit(self) -> None:
        with self.steps.timing("commit"):
            self._run(self.transaction.commit())

    def ids(self, sql: str) -> list[str]:
        with self.steps.timing("select"):
            return [str(row[0]) for row in self._run(self.conn.fetch(sql))]

    def count(self, sql: str) -> int:
        with self.steps.timing("delete"):
            return int(self._run(self.conn.fetchval(sql)))

    def delete(self, sql: str) -> int:
        with self.steps.timing("delete"):
            status = self._run(self.conn.execute(sql))
        return int(status.split()[-1])

    def read(self, sql: str, shape: TableShape, *, step: str = "read") -> pa.Table | None:
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(data)

        options: dict[str, Any] = {"format": self.copy_format}
        if self.copy_format == "csv":
            options["force_quote"] = True
        with self.steps.timing(step):
            self._run(self.conn.copy_from_query(sql, output=sink, **options))
        if not self.decodes:
            return None
        with self.steps.timing("decode"):
            return from_csv(b"".join(chunks), shape)

    def close(self) -> None:
        self._run(self.conn.close())
        self.loop.close()


class AdbcSession:
    """ADBC's DB-API connection (autocommit off: every statement in one transaction until
    commit); queries come back as Arrow (binary COPY, decoded in C++)."""

    decodes = True

    def __init__(self, url: str) -> None:
        import adbc_driver_postgresql.dbapi as adbc  # type: ignore[import-untyped]

        options = "%20".join(f"-c%20{k}%3D{v.replace('.', '%2E')}" for k, v in SESSION.items())
        self.conn = adbc.connect(f"{url}?options={options}")
        self.cursor = self.conn.cursor()
        self.steps = Steps(pid=self.backend_pid())

    def backend_pid(self) -> int:
        self.cursor.execute("SELECT pg_backend_pid()")
        row = self.cursor.fetchone()
        assert row is not None
        return int(row[0])

    def begin(self) -> None:  # the DB-API opens the transaction with the first statement
        pass

    def commit(self) -> None:
        with self.steps.timing("commit"):
            self.conn.commit()

    def ids(self, sql: str) -> list[str]:
        with self.steps.timing("select"):
            self.cursor.execute(sql)
            return [str(value) for value in self.cursor.fetch_arrow_table().column(0).to_pylist()]

    def count(self, sql: str) -> int:
        with self.steps.timing("delete"):
            self.cursor.execute(sql)
            row = self.cursor.fetchone()
        assert row is not None
        return int(row[0])

    def delete(self, sql: str) -> int:
        """``sql`` is a DELETE; ADBC's rowcount is -1 for it, so count what it returns."""
        with self.steps.timing("delete"):
            self.cursor.execute(f"WITH gone AS ({sql} RETURNING 1) SELECT count(*) FROM gone")
            row = self.cursor.fetchone()
        assert row is not None
        return int(row[0])

    def read(self, sql: str, shape: TableShape, *, step: str = "read") -> pa.Table:
        with self.steps.timing(step):
            self.cursor.execute(sql)
            table = self.cursor.fetch_arrow_table()
        with self.steps.timing("decode"):
            return to_archive_types(table, shape)

    def close(self) -> None:
        self.cursor.close()
        self.conn.close()
