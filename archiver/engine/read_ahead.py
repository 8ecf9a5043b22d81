"""Reading ahead (PostgreSQL): the next batches locked, read and encoded while one is written.

A batch read ahead runs in its own transaction on its own connection. It starts
only once the batch before it holds every lock it will take (:meth:`ReadAhead.locked`),
and its roots come after that batch's last root, so the two share no run; a
collection both touch was locked by the earlier one first, so the later one waits
for that COMMIT and then plans on the row it left. Nothing is written while
reading ahead: a crash leaves nothing to recover, and a batch read ahead that will
not be archived (a limit, a stop, a failure before it) is rolled back unused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable

from archiver.engine.batch import PreparedBatch
from archiver.engine.results import BatchReport
from archiver.models import Root

#: What reading a batch ends with: the batch in its open transaction; or, when every
#: root of the slice was held back, its last root and no batch; or None: nothing left.
Read = PreparedBatch | tuple[Root, BatchReport | None] | None
#: Starts reading the batch after a root, in the read-ahead generation given.
Start = Callable[[Root, int], Awaitable[Read]]


class ReadAhead:
    """Up to ``depth`` batches being read on their own connections, oldest first."""

    def __init__(self, depth: int, start: Start) -> None:
        self.depth = depth
        self.start = start
        self.may_follow: int | None = None  # batches the batch limit still allows
        self.generation = 0  # bumped when the batches read ahead are dropped
        self._ahead: deque[tuple[Root, asyncio.Task[Read]]] = deque()
        self._stalled: Root | None = None  # the last root of a batch whose successor waits

    def locked(self, last: Root, generation: int) -> None:
        """A batch ending at ``last`` holds all its locks: the next may start reading,
        unless enough are read ahead already (then it starts when one is taken)."""
        if generation != self.generation:
            return  # its pipeline was dropped
        room = self.depth if self.may_follow is None else min(self.depth, self.may_follow)
        if len(self._ahead) >= room:
            self._stalled = last
            return
        self._stalled = None
        self._ahead.append((last, asyncio.create_task(self._read(last, generation))))

    async def take(self, after: Root | None) -> asyncio.Task[Read] | None:
        """The reading of the batch after ``after``, if it was started ahead."""
        if not self._ahead:
            return None
        if self._ahead[0][0] != after:  # a retried batch moved the keyset: start afresh
            await self.drop()
            return None
        _, task = self._ahead.popleft()
        if self._stalled is not None:
            self.locked(self._stalled, self.generation)
        return task

    async def drop(self) -> None:
        """Roll back the batches read ahead that will not be archived. Idempotent."""
        self.generation += 1  # their own successors are not started any more
        self._stalled = None
        while self._ahead:
            _, task = self._ahead.popleft()
            with contextlib.suppress(Exception):
                prepared = await task
                if isinstance(prepared, PreparedBatch):
                    await prepared.release()

    async def _read(self, last: Root, generation: int) -> Read:
        return await self.start(last, generation)
