"""Values as Prefect binds them per dialect, and back into one comparable form.

Going in (:func:`adapt`), a Python value becomes what Prefect binds:

* SQLite: UUIDs as lowercase hyphenated text, timestamps as naive UTC text
  ``'%Y-%m-%d %H:%M:%S.%f'``, intervals as ``1970-01-01 HH:MM:SS.ffffff`` text (epoch plus the
  duration), booleans as 0/1, JSON as text (SQLite's NUMERIC affinity turns a bare JSON number
  into INTEGER/REAL, exactly as it does for Prefect).
* PostgreSQL: aware UTC datetimes, timedeltas, and JSON/enum/uuid values as strings; psycopg
  sends ``str`` with the *unknown* type, so PostgreSQL types them from the target column
  (``jsonb``, ``json``, ``uuid``, the ``state_type`` enum) without casts.

Coming out (:func:`normalize`), a raw driver value of a column kind becomes the same Python
value on both dialects.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
_EPOCH_NAIVE = datetime(1970, 1, 1)

#: Statement parameters: one row, or a list of rows for executemany.
Params = Mapping[str, Any] | Sequence[Mapping[str, Any]] | None


def sqlite_time(value: datetime) -> str:
    """Prefect's SQLite text for a timestamp: naive UTC, always six fraction digits."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
    return value.astimezone(UTC).strftime(SQLITE_TIME_FORMAT)


def sqlite_interval(value: timedelta) -> str:
    """Prefect's SQLite text for an interval: the epoch plus the duration."""
    return (_EPOCH_NAIVE + value).strftime(SQLITE_TIME_FORMAT)


def adapt(value: Any, dialect: str) -> Any:
    """Turn a Python value into what Prefect binds for ``dialect``.

    datetimes must be aware; on SQLite they become Prefect's text, timedeltas become
    epoch-plus-duration text and booleans 0/1. UUID objects become lowercase strings.
    """
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
        return sqlite_time(value) if dialect == "sqlite" else value.astimezone(UTC)
    if isinstance(value, timedelta):
        return sqlite_interval(value) if dialect == "sqlite" else value
    if isinstance(value, bool):
        return int(value) if dialect == "sqlite" else value
    return value


def adapt_params(params: Params, dialect: str) -> dict[str, Any] | list[dict[str, Any]] | None:
    """:func:`adapt` every value of one row of parameters, or of each row of a list."""
    if params is None:
        return None
    if isinstance(params, Mapping):
        return {key: adapt(value, dialect) for key, value in params.items()}
    return [{key: adapt(value, dialect) for key, value in row.items()} for row in params]


def canonical_json(value: Any) -> str | None:
    """A comparable text for a JSON document as any driver returns it.

    SQL NULL stays ``None``; JSON ``null`` becomes the text ``"null"``. Text is parsed and
    re-dumped with sorted keys and no whitespace, so jsonb's normalisation, SQLite's bare
    numbers (``1`` as an int) and Parquet strings all compare equal.
    """
    if value is None:
        return None
    parsed = json.loads(value) if isinstance(value, str | bytes) else value
    return json.dumps(parsed, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def normalize(kind: str, value: Any) -> Any:
    """Normalise a raw driver value of a column ``kind`` (see
    :func:`tests.factory.snapshots.column_kinds`)."""
    if value is None:
        return None
    if kind == "uuid":
        return str(value).lower()
    if kind == "timestamp":
        return _to_utc(value)
    if kind == "interval":
        return _to_interval(value)
    if kind == "json":
        return canonical_json(value)
    if kind == "bool":
        return bool(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return value


def _to_utc(value: Any) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _to_interval(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):  # SQLite server default '0' (NUMERIC affinity)
        return timedelta(seconds=value)
    textual = str(value)
    try:
        return timedelta(seconds=float(textual))
    except ValueError:
        return datetime.fromisoformat(textual).replace(tzinfo=None) - _EPOCH_NAIVE
