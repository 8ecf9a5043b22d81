"""PostgreSQL: reading a table's rows with ``COPY ... TO STDOUT`` as CSV, straight into Arrow.

Reading rows through asyncpg and SQLAlchemy builds a Python object per value;
COPY hands back text that Arrow's C++ CSV parser turns into columns in the
archive's types (``archiver.arrow_types``), with no Python object per value.
The COPY runs on the batch's own connection and transaction, so the rows are
read under the batch's locks.

COPY takes no parameters: the ids are inlined as one ``uuid[]`` literal after
being checked to be UUIDs. A value the CSV text cannot carry raises
``pa.ArrowInvalid``; the reader then reads rows instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from archiver.arrow_types import ARROW_TYPES
from archiver.models import Column, Kind, TableShape
from archiver.source.dialect import chunks, uuid_array_literal

#: COPY output larger than this is parsed in a thread (Arrow releases the GIL), so the
#: event loop keeps serving the other batch's connection meanwhile.
_PARSE_IN_THREAD = 1 << 20


class CopyReader:
    """Reads rows of one PostgreSQL connection with COPY; set up on first use."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.quote = conn.dialect.identifier_preparer.quote
        self._asyncpg: Any = None

    async def rows(
        self, shape: TableShape, column: str, ids: Sequence[str], *, lock: bool, extra: str
    ) -> pa.Table:
        """The rows of ``shape`` whose ``column`` is in ``ids`` (and ``extra`` holds).

        ``lock``: ``FOR UPDATE``. Raises ``pa.ArrowInvalid`` when a value does not
        parse, and SQLAlchemy's DBAPIError for the database's own errors.
        """
        driver = await self._driver()
        parts: list[bytes] = []

        async def sink(data: bytes) -> None:
            parts.append(data)

        suffix = " FOR UPDATE" if lock else ""
        select = ", ".join(self._column(c) for c in shape.columns)
        for chunk in chunks("postgresql", ids):
            where = f"{self.quote(column)} = ANY({uuid_array_literal(chunk)}){extra}"
            sql = f"SELECT {select} FROM {shape.name} WHERE {where}{suffix}"
            try:
                await driver.copy_from_query(sql, output=sink, format="csv", force_quote=True)
            except Exception as exc:  # asyncpg's own errors: wrap them as SQLAlchemy would
                raise DBAPIError(f"COPY ({sql[:200]}...)", None, exc) from exc
        data = b"".join(parts)
        if len(data) > _PARSE_IN_THREAD:
            return await asyncio.to_thread(from_csv, data, shape)
        return from_csv(data, shape)

    async def _driver(self) -> Any:
        """The asyncpg connection under the SQLAlchemy one, with ISO UTC text output."""
        if self._asyncpg is None:
            raw = await self.conn.get_raw_connection()
            self._asyncpg = raw.driver_connection
            # Only until the batch's transaction ends; binary reads are unaffected.
            await self.conn.execute(text("SET LOCAL TimeZone = 'UTC'"))
            await self.conn.execute(text("SET LOCAL DateStyle = 'ISO'"))
        return self._asyncpg

    def _column(self, column: Column) -> str:
        name = self.quote(column.name)
        if column.kind is Kind.INTERVAL:
            return f"(extract(epoch FROM {name}) * 1000000)::int8 AS {name}"
        return name


def from_csv(data: bytes, shape: TableShape) -> pa.Table:
    """Parse PostgreSQL ``COPY ... (FORMAT csv, FORCE_QUOTE *)`` output into archive types.

    Column-wise, in Arrow's C++ parser: no Python object per value. The COPY must
    quote every non-NULL value (so an unquoted empty field is NULL and ``""`` is an
    empty string), write timestamps in ISO style and intervals as integer
    microseconds. Raises ``pa.ArrowInvalid`` on anything else; callers fall back
    to reading rows.
    """
    read_types = {
        column.name: pa.int64() if column.kind is Kind.INTERVAL else ARROW_TYPES[column.kind]
        for column in shape.columns
    }
    if not data:
        return pa.table({name: pa.array([], kind) for name, kind in read_types.items()})
    table = pcsv.read_csv(
        pa.BufferReader(data),
        # One thread: batches are a few MB, and the other batch in flight uses the other core.
        read_options=pcsv.ReadOptions(column_names=shape.column_names, use_threads=False),
        parse_options=pcsv.ParseOptions(newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(
            column_types=read_types,
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            true_values=["t"],
            false_values=["f"],
        ),
    )
    for index, column in enumerate(shape.columns):
        if column.kind is Kind.INTERVAL:
            durations = table.column(index).cast(pa.duration("us"))
            table = table.set_column(index, column.name, durations)
    return table
