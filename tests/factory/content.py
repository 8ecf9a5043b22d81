"""Ids and realistic values: UUIDv7s, Prefect's JSON documents, unicode names and messages.

Every JSON document is returned as its text, as Prefect binds it.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from datetime import datetime
from typing import Any

#: Length of the one long log message written for every root flow run.
LONG_LOG_LENGTH = 20_000


def uuid4() -> str:
    return str(uuid.uuid4())


def uuid7(at: datetime) -> str:
    """A UUIDv7-shaped id for ``at`` (Prefect's state, log and client task-run ids)."""
    milliseconds = int(at.timestamp() * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = (rand >> 62) & 0xFFF
    rand_b = rand & ((1 << 62) - 1)
    value = (milliseconds << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


_ADJECTIVES = ("crimson", "amber", "silent", "brave", "lucid", "witty", "mellow", "rapid")
_ANIMALS = ("otter", "heron", "lynx", "marmot", "ibis", "gecko", "tapir", "quokka")


def slug() -> str:
    return f"{random.choice(_ADJECTIVES)}-{random.choice(_ANIMALS)}-{random.randrange(10**6)}"


def parameters(index: int) -> str:
    return dumps(
        {
            "run_index": index,
            "city": "Zürich",
            "greeting": "こんにちは 🦆",
            "nested": {
                "list": [1, 2.5, None, True, "x"],
                "deep": {"empty": {}, "quote": 'say "hi"\n\ttab'},
            },
            "ratio": 0.1,
        }
    )


def empirical_policy_flow() -> str:
    return dumps(
        {
            "max_retries": 0,
            "retry_delay_seconds": 0.0,
            "retries": 0,
            "retry_delay": 0,
            "pause_keys": [],
            "resuming": False,
            "retry_type": None,
        }
    )


def empirical_policy_task() -> str:
    return dumps(
        {
            "max_retries": 0,
            "retry_delay_seconds": 0.0,
            "retries": 0,
            "retry_delay": 0,
            "retry_jitter_factor": None,
        }
    )


def state_details(
    *,
    flow_run_id: str | None,
    task_run_id: str | None = None,
    child_flow_run_id: str | None = None,
    scheduled_time: datetime | None = None,
    cache_key: str | None = None,
    cache_expiration: datetime | None = None,
) -> str:
    return dumps(
        {
            "flow_run_id": flow_run_id,
            "task_run_id": task_run_id,
            "child_flow_run_id": child_flow_run_id,
            "scheduled_time": scheduled_time.isoformat() if scheduled_time else None,
            "cache_key": cache_key,
            "cache_expiration": cache_expiration.isoformat() if cache_expiration else None,
            "deferred": False,
            "untrackable_result": False,
            "pause_timeout": None,
            "pause_reschedule": False,
            "pause_key": None,
            "run_input_keyset": None,
            "refresh_cache": None,
            "retriable": None,
            "transition_id": uuid4(),
            "task_parameters_id": None,
            "traceparent": None,
            "deployment_concurrency_lease_id": None,
        }
    )


def result_reference() -> str:
    return dumps(
        {
            "storage_key": f"/root/.prefect/storage/{uuid.uuid4().hex}",
            "expiration": None,
            "serializer": {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None},
            "storage_block_id": None,
            "prefect_version": "3.9.1",
        }
    )


def long_message(run_id: str) -> str:
    head = f"Long log for {run_id}: ünïcode ✓ 🦆 "
    body = "0123456789abcdef" * (LONG_LOG_LENGTH // 16 + 1)
    return (head + body)[:LONG_LOG_LENGTH]
