"""Executions of one statement by concurrent callers, sent together (core.db.statements.Batcher).

Each test holds a lock the statement needs, so the first execution's batch is in flight
(blocked) while the others arrive: they must then go together, as the second batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.raw import CONNECTION_LOST, raw_connection
from core.db.statements import BATCH_LIMIT, Batcher, Statement, batcher
from tests.support.waiting import wait_for

# Every execution first takes the gate row's lock, then inserts its number (unique), and
# ends its own backend when asked to.
PROBE = Statement("""
WITH gate AS (
    UPDATE batch_gate SET hits = hits + 1 RETURNING hits
), ins AS (
    INSERT INTO batch_probe (n) SELECT :n FROM gate RETURNING n
)
SELECT (SELECT n FROM ins) AS n, txid_current() AS tx,
    CASE WHEN :kill::boolean THEN pg_terminate_backend(pg_backend_pid()) END AS killed""")

# The same gate for a read, which is run again alone when its batch's connection is lost.
READ = Statement(
    "SELECT :n::int AS n, (SELECT hits FROM batch_gate FOR SHARE) AS hits,"
    " CASE WHEN :kill::boolean THEN pg_terminate_backend(pg_backend_pid()) END AS killed",
    read=True,
)

# The same gate for a statement run for its effect only (``executemany`` in a batch).
EFFECT = Statement("""
WITH gate AS (
    UPDATE batch_gate SET hits = hits + 1 RETURNING hits
)
INSERT INTO batch_probe (n, tx) SELECT :n, txid_current() FROM gate
WHERE NOT :kill::boolean OR pg_terminate_backend(pg_backend_pid()) IS NULL""")


@pytest.fixture
async def probe(engine: AsyncEngine) -> Batcher:
    async with raw_connection(engine) as conn:
        await conn.execute(
            "CREATE TABLE batch_gate (hits int NOT NULL);"
            " INSERT INTO batch_gate VALUES (0);"
            " CREATE TABLE batch_probe (n int PRIMARY KEY, tx bigint)"
        )
    return batcher(PROBE, engine)


@contextlib.asynccontextmanager
async def gate_held(engine: AsyncEngine) -> AsyncIterator[None]:
    """The gate row locked by another transaction until the block ends."""
    async with raw_connection(engine) as conn:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("SELECT * FROM batch_gate FOR UPDATE")
        try:
            yield
        finally:
            await transaction.rollback()


async def blocked_head(probe: Batcher, engine: AsyncEngine, n: int = 1) -> asyncio.Task[Any]:
    """Execution ``n`` sent alone, taken by the drain and blocked on the held gate."""
    head = asyncio.create_task(probe.run(engine, n=n, kill=False))

    async def head_sent() -> bool:
        return probe.waiting == 0  # the drain took it

    await wait_for(head_sent, timeout=10, message="the first batch to be taken")
    return head


async def run_behind_a_blocked_batch(
    probe: Batcher, engine: AsyncEngine, first: int, then: Sequence[dict[str, Any]]
) -> tuple[Any, list[Any]]:
    """Execution ``first`` sent alone and blocked on the gate, ``then`` arriving behind it;
    the gate opened once all wait. Each result is the row or the exception raised."""
    async with gate_held(engine):
        head = await blocked_head(probe, engine, first)
        rest = [asyncio.create_task(probe.run(engine, **values)) for values in then]

        async def all_waiting() -> bool:
            return probe.waiting == len(then)

        await wait_for(all_waiting, timeout=10, message="the others to wait behind it")
    results = await asyncio.wait_for(
        asyncio.gather(head, *rest, return_exceptions=True), timeout=20
    )
    return results[0], list(results[1:])


async def stored(engine: AsyncEngine) -> set[int]:
    async with raw_connection(engine) as conn:
        rows = await asyncio.wait_for(conn.fetch("SELECT n FROM batch_probe"), 5)
    return {row["n"] for row in rows}


async def test_executions_arriving_during_a_batch_go_together_in_one_transaction(
    engine: AsyncEngine, probe: Batcher
) -> None:
    head, rest = await run_behind_a_blocked_batch(
        probe, engine, 1, [{"n": n, "kill": False} for n in (2, 3, 4, 5)]
    )
    assert head["n"] == 1
    assert [row["n"] for row in rest] == [2, 3, 4, 5]
    assert len({row["tx"] for row in rest}) == 1, "the four waiting went as one transaction"
    assert rest[0]["tx"] != head["tx"]
    assert await stored(engine) == {1, 2, 3, 4, 5}


async def test_a_whole_batch_waiting_goes_out_beside_the_one_in_flight(
    engine: AsyncEngine, probe: Batcher
) -> None:
    async with gate_held(engine):
        head = await blocked_head(probe, engine)
        numbers = range(2, 2 + BATCH_LIMIT)
        whole = [asyncio.create_task(probe.run(engine, n=n, kill=False)) for n in numbers]

        async def second_sent() -> bool:
            return probe.waiting == 0 and probe.in_flight == 2

        await wait_for(second_sent, timeout=10, message="a whole batch to go out at once")
        later = [asyncio.create_task(probe.run(engine, n=n, kill=False)) for n in (500, 501)]

        async def later_waiting() -> bool:
            return probe.waiting == 2

        await wait_for(later_waiting, timeout=10, message="less than a batch to wait")
        assert probe.in_flight == 2, "less than a whole batch waits for one in flight"
    results = await asyncio.wait_for(asyncio.gather(head, *whole, *later), timeout=20)
    first, batch, rest = results[0], results[1 : 1 + BATCH_LIMIT], results[1 + BATCH_LIMIT :]
    assert [row["n"] for row in batch] == list(numbers)
    assert len({row["tx"] for row in batch}) == 1, "the whole batch went as one transaction"
    assert len({row["tx"] for row in rest}) == 1
    assert len({first["tx"], batch[0]["tx"], rest[0]["tx"]}) == 3
    assert await stored(engine) == {1, *numbers, 500, 501}
    assert probe.in_flight == 0


async def test_an_execution_alone_runs_at_once(engine: AsyncEngine, probe: Batcher) -> None:
    first = await asyncio.wait_for(probe.run(engine, n=1, kill=False), 10)
    second = await asyncio.wait_for(probe.run(engine, n=2, kill=False), 10)
    assert (first["n"], second["n"]) == (1, 2)
    assert first["tx"] != second["tx"]


async def test_a_rejected_batch_is_run_again_one_by_one(
    engine: AsyncEngine, probe: Batcher
) -> None:
    # 1 is inserted by the first batch, so the second batch's 1 violates the key: the
    # server rolls the whole batch back, and each of its executions runs again alone.
    head, rest = await run_behind_a_blocked_batch(
        probe, engine, 1, [{"n": n, "kill": False} for n in (2, 1, 3)]
    )
    assert head["n"] == 1
    assert isinstance(rest[1], asyncpg.UniqueViolationError)
    assert rest[0]["n"] == 2 and rest[2]["n"] == 3
    assert rest[0]["tx"] != rest[2]["tx"]
    assert await stored(engine) == {1, 2, 3}


async def test_an_argument_that_cannot_be_encoded_fails_only_its_caller(
    engine: AsyncEngine, probe: Batcher
) -> None:
    head, rest = await run_behind_a_blocked_batch(
        probe, engine, 1, [{"n": 2, "kill": False}, {"n": "three", "kill": False}]
    )
    assert head["n"] == 1 and rest[0]["n"] == 2
    assert isinstance(rest[1], asyncpg.DataError)
    assert await stored(engine) == {1, 2}


async def test_a_connection_lost_mid_batch_fails_every_caller_and_reruns_nothing(
    engine: AsyncEngine, probe: Batcher
) -> None:
    # Whether a batch whose connection died committed is unknown, so nothing of it is run
    # again: each caller hears the error (as it would alone) and its message is redelivered.
    head, rest = await run_behind_a_blocked_batch(
        probe, engine, 1, [{"n": 2, "kill": False}, {"n": 3, "kill": True}]
    )
    assert head["n"] == 1
    for result in rest:
        assert isinstance(result, CONNECTION_LOST), repr(result)
    assert await stored(engine) == {1}
    after = await asyncio.wait_for(probe.run(engine, n=4, kill=False), 10)
    assert after["n"] == 4


async def test_a_cancelled_caller_does_not_fail_the_others(
    engine: AsyncEngine, probe: Batcher
) -> None:
    async with gate_held(engine):
        head = await blocked_head(probe, engine)
        quitter = asyncio.create_task(probe.run(engine, n=2, kill=False))
        stayer = asyncio.create_task(probe.run(engine, n=3, kill=False))

        async def both_waiting() -> bool:
            return probe.waiting == 2

        await wait_for(both_waiting, timeout=10, message="two executions to wait")
        quitter.cancel()
    results = await asyncio.wait_for(
        asyncio.gather(head, quitter, stayer, return_exceptions=True), timeout=20
    )
    assert results[0]["n"] == 1
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[2]["n"] == 3
    # The cancelled caller's execution was already queued with the others: it still ran.
    assert await stored(engine) == {1, 2, 3}


async def test_a_read_batch_that_lost_its_connection_is_run_again_one_by_one(
    engine: AsyncEngine, probe: Batcher
) -> None:
    reads = batcher(READ, engine)
    head, rest = await run_behind_a_blocked_batch(
        reads, engine, 1, [{"n": 2, "kill": False}, {"n": 3, "kill": True}]
    )
    assert head["n"] == 1
    assert rest[0]["n"] == 2, "the read beside the one that ended its backend is answered"
    assert isinstance(rest[1], CONNECTION_LOST), "ending its backend every time, it fails"


async def test_statements_run_for_their_effect_go_together_too(
    engine: AsyncEngine, probe: Batcher
) -> None:
    effects = batcher(EFFECT, engine, rows=False)
    head, rest = await run_behind_a_blocked_batch(
        effects, engine, 1, [{"n": n, "kill": False} for n in (2, 3, 4)]
    )
    assert head is None and rest == [None, None, None]
    async with raw_connection(engine) as conn:
        rows = await asyncio.wait_for(conn.fetch("SELECT n, tx FROM batch_probe ORDER BY n"), 5)
    tx = {row["n"]: row["tx"] for row in rows}
    assert sorted(tx) == [1, 2, 3, 4]
    assert tx[2] == tx[3] == tx[4] != tx[1]


async def test_a_rejected_batch_of_effects_is_run_again_one_by_one(
    engine: AsyncEngine, probe: Batcher
) -> None:
    effects = batcher(EFFECT, engine, rows=False)
    head, rest = await run_behind_a_blocked_batch(
        effects, engine, 1, [{"n": n, "kill": False} for n in (2, 1, 3)]
    )
    assert head is None and rest[0] is None and rest[2] is None
    assert isinstance(rest[1], asyncpg.UniqueViolationError)
    assert await stored(engine) == {1, 2, 3}
