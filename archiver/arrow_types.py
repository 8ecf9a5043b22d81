"""The archive's Arrow type for each column kind, shared by the writer and the reader.

``archiver.archive.codec`` writes Parquet in these types and checks files read
back against them; ``archiver.source`` parses PostgreSQL's COPY output straight
into them. The two must agree exactly, and source and archive never import each
other, so the mapping lives here, below both.
"""

from __future__ import annotations

import pyarrow as pa

from archiver.models import Kind

ARROW_TYPES: dict[Kind, pa.DataType] = {
    Kind.UUID: pa.string(),
    Kind.TIMESTAMP: pa.timestamp("us", tz="UTC"),
    Kind.INTERVAL: pa.duration("us"),
    Kind.JSON: pa.string(),
    Kind.BOOLEAN: pa.bool_(),
    # int64 for every integer: SQLite does not enforce SMALLINT or INTEGER widths.
    Kind.INT16: pa.int64(),
    Kind.INT32: pa.int64(),
    Kind.INT64: pa.int64(),
    Kind.FLOAT: pa.float64(),
    Kind.STRING: pa.string(),
}
