"""A run's state history: a timeline of (type, name, timestamp), and its state rows.

A timeline leads up to its final state the way Prefect's runs do (Scheduled, Late, Pending,
Running, AwaitingRetry, Retrying, ...), oldest first, its first state on a whole second.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from tests.factory.build import Batch, Tree
from tests.factory.content import state_details, uuid7
from tests.factory.schema import STATE_NAMES, TERMINAL_STATE_TYPES

_STATE_MESSAGES: dict[str, str | None] = {
    "COMPLETED": "All states completed.",
    "FAILED": "Flow run encountered an exception: ValueError('ünïcode ✗ \"boom\"')",
    "CANCELLED": "Cancelled by the user ✋",
    "CRASHED": "Execution was interrupted by an unexpected exception: SIGTERM",
}


def _prefix(count: int) -> list[tuple[str, str]]:
    """``count`` states that lead up to a final state (ending in RUNNING when possible)."""
    if count <= 0:
        return []
    base = [("SCHEDULED", "Scheduled"), ("PENDING", "Pending"), ("RUNNING", "Running")]
    if count <= 3:
        return base[3 - count :]
    extra = count - 3
    seq = [base[0]] + ([("SCHEDULED", "Late")] if extra % 2 else []) + base[1:]
    seq += [("SCHEDULED", "AwaitingRetry"), ("RUNNING", "Retrying")] * (extra // 2)
    return seq


@dataclass
class Timeline:
    states: list[tuple[str, str, datetime]]  # (type, name, timestamp), oldest first

    @property
    def final_type(self) -> str:
        return self.states[-1][0]

    @property
    def final_name(self) -> str:
        return self.states[-1][1]

    @property
    def final_time(self) -> datetime:
        return self.states[-1][2]

    @property
    def first_time(self) -> datetime:
        return self.states[0][2]

    @property
    def terminal(self) -> bool:
        return self.final_type in TERMINAL_STATE_TYPES

    @property
    def run_count(self) -> int:
        return sum(1 for state in self.states if state[0] == "RUNNING")

    @property
    def start_time(self) -> datetime | None:
        for state_type, _name, at in self.states:
            if state_type == "RUNNING":
                return at
        return self.final_time if self.terminal else None

    @property
    def total_run_time(self) -> timedelta:
        total = timedelta(0)
        for (state_type, _n, at), (_t, _n2, after) in zip(
            self.states, self.states[1:], strict=False
        ):
            if state_type == "RUNNING":
                total += after - at
        return total


def build_timeline(count: int, final_type: str, anchor: datetime, step: timedelta) -> Timeline:
    count = max(1, count)
    if final_type in TERMINAL_STATE_TYPES:
        seq = [*_prefix(count - 1), (final_type, STATE_NAMES[final_type])]
    else:
        name = "Late" if final_type == "SCHEDULED" and count > 1 else STATE_NAMES[final_type]
        seq = [*_prefix(count)[: count - 1], (final_type, name)]
    times = [anchor - step * (count - 1 - i) for i in range(count)]
    if count > 1:  # the first state lands on a whole second: microsecond 0 is exercised
        times[0] = times[0].replace(microsecond=0)
    return Timeline([(t, n, at) for (t, n), at in zip(seq, times, strict=True)])


def add_run_states(
    batch: Batch,
    tree: Tree,
    table: str,
    parent_column: str,
    parent_id: str,
    timeline: Timeline,
    *,
    flow_run_id: str,
    task_run_id: str | None = None,
    child_flow_run_id: str | None = None,
    final_data: str | None = None,
    final_result_artifact_id: str | None = None,
    cache_key: str | None = None,
    cache_expiration: datetime | None = None,
) -> list[str]:
    """A state row per state of ``timeline`` into ``table`` (``flow_run_state`` or
    ``task_run_state``), pointing at ``parent_id`` through ``parent_column``; only the final
    state carries a message, ``data``, a result artifact and the cache key. Their ids."""
    ids: list[str] = []
    last = len(timeline.states) - 1
    for index, (state_type, name, at) in enumerate(timeline.states):
        state_id = uuid7(at)
        ids.append(state_id)
        is_final = index == last
        batch.add(
            table,
            {
                "id": state_id,
                "created": at + timedelta(microseconds=731),
                "updated": at + timedelta(microseconds=731),
                "type": state_type,
                "timestamp": at,
                "name": name,
                "message": _STATE_MESSAGES.get(state_type) if is_final else None,
                "state_details": state_details(
                    flow_run_id=flow_run_id,
                    task_run_id=task_run_id,
                    child_flow_run_id=child_flow_run_id,
                    scheduled_time=at if state_type == "SCHEDULED" else None,
                    cache_key=cache_key if is_final else None,
                    cache_expiration=cache_expiration if is_final else None,
                ),
                "data": final_data if is_final else None,
                parent_column: parent_id,
                "result_artifact_id": final_result_artifact_id if is_final else None,
            },
        )
    (tree.flow_run_state_ids if table == "flow_run_state" else tree.task_run_state_ids).extend(ids)
    return ids
