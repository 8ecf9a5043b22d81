"""What retention policies cost the selection of a batch, as a ratio to no policy.

    python -m benchmarks.policy_selection --database-url postgresql+asyncpg://.../bench

On a database made by ``benchmarks.generate`` it walks the expired backlog the way
``archiver run`` does (``lock_roots``, keyset on ``(end_time, id)``, ``--batch-size``
roots per batch), first with only ``retention_period`` and then with a compliance
policy: the production deployment kept 400 days, the last 10 runs of every
deployment kept, failed runs 180 days, the rest 30 days. Each batch is rolled
back, so nothing is deleted and runs the policy keeps stay in front of the walk
(a harder case than a real run, where the archived runs are gone). It prints the
median and slowest batch of each walk, the early and late batches of the policy
walk (flat means the cost does not grow with the backlog), their ratio to the
baseline, and the time of the run report's count and of ``count_by_rule``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from archiver.models import Root
from archiver.policy import RetentionPolicy, Rule
from archiver.source.engine import DatabaseOptions, create_engine
from archiver.source.retention import Selection, count_by_rule, select_expired
from archiver.source.trees import count_expired, lock_roots

COMPLIANCE = (
    Rule(name="production", deployment="bench-flow-0/bench-deployment-0", retention="P400D"),
    Rule(name="last-10", keep_last=10),
    Rule(name="failed", state=["FAILED", "CRASHED"], retention="P180D"),
)


async def walk(engine: AsyncEngine, selection: Selection, batch_size: int) -> list[float]:
    """Seconds per lock_roots call over the whole backlog, each batch rolled back."""
    seconds: list[float] = []
    after: Root | None = None
    async with engine.connect() as conn:
        while True:
            transaction = await conn.begin()
            started = time.perf_counter()
            roots = await lock_roots(conn, selection.upper_cutoff, batch_size, after, selection)
            seconds.append(time.perf_counter() - started)
            await transaction.rollback()
            if not roots:
                return seconds
            after = roots[-1]


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:6.1f} ms, max {max(values) * 1000:6.1f} ms"


async def main(url: str, batch_size: int) -> None:
    engine = create_engine(DatabaseOptions(url.replace("sqlite://", "sqlite+aiosqlite://", 1)))
    now = datetime.now(UTC)
    plain = RetentionPolicy((), timedelta(days=30))
    policy = RetentionPolicy(COMPLIANCE, timedelta(days=30))
    selections = {}
    async with engine.connect() as conn:
        for name, chosen in (("retention_period only", plain), ("compliance policy", policy)):
            started = time.perf_counter()
            selections[name] = await select_expired(conn, chosen, now)
            print(f"select_expired, {name}: {time.perf_counter() - started:.2f} s")
    walks = {name: await walk(engine, s, batch_size) for name, s in selections.items()}
    for name, seconds in walks.items():
        print(f"{name:22} {len(seconds) - 1:4} batches  {ms(seconds)}")
    base, ruled = walks["retention_period only"], walks["compliance policy"]
    for name, seconds in walks.items():
        tenth = max(1, len(seconds) // 10)
        print(f"  first 10% of batches   {ms(seconds[:tenth])}")
        print(f"  last 10% of batches    {ms(seconds[-tenth - 1 : -1] or seconds)}  ({name})")
    ratio = statistics.median(ruled) / statistics.median(base)
    print(f"ratio policy / baseline (median batch): {ratio:.2f}")
    async with engine.connect() as conn:
        for name, selection in selections.items():
            started = time.perf_counter()
            expired, _, _ = await count_expired(conn, selection.upper_cutoff, selection)
            print(
                f"run report count, {name}: {expired} runs in {time.perf_counter() - started:.2f} s"
            )
        started = time.perf_counter()
        counts = await count_by_rule(conn, policy, now)
        print(f"count_by_rule: {time.perf_counter() - started:.2f} s")
        for count in counts:
            print(f"  {count.rule:12} archive {count.selected:7} keep {count.kept:7}", end="")
            print(f" held {count.held}")
    await engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--batch-size", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.database_url, args.batch_size))
