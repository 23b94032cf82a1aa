"""The asyncpg hot pool beside SQLAlchemy's (core.db.raw)."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.engine import create_engine
from core.db.raw import (
    CONNECTION_LOST,
    EncodedJson,
    hot_pool,
    raw_connection,
    read_on_live_connection,
)
from tests.support.waiting import wait_for


async def test_json_goes_through_orjson_both_ways(engine: AsyncEngine) -> None:
    async with raw_connection(engine) as conn:
        value = await asyncio.wait_for(
            conn.fetchval("SELECT $1::jsonb || '{\"b\": 2}'::jsonb", {"a": [1, "x"]}), 5
        )
    assert value == {"a": [1, "x"], "b": 2}


async def test_json_and_jsonb_travel_as_utf8_bytes_both_ways(engine: AsyncEngine) -> None:
    document = {"title": "Tea \u2615 \u2014 a guide\u2026", "n": [1, 2.5, None]}
    encoded = EncodedJson(orjson.dumps(document))
    async with raw_connection(engine) as conn:
        row = await asyncio.wait_for(
            conn.fetchrow(
                "SELECT $1::jsonb AS b, $2::json AS j, $3::jsonb AS e, $4::json AS ej,"
                " ($3::jsonb ->> 'title') AS title, '{\"k\": \"\u00e9\"}'::json AS literal",
                document,
                document,
                encoded,
                encoded,
            ),
            5,
        )
    assert row is not None
    assert row["b"] == row["j"] == row["e"] == row["ej"] == document
    assert row["title"] == document["title"]  # stored as text, not as escaped bytes
    assert row["literal"] == {"k": "\u00e9"}


async def test_an_abandoned_transaction_is_rolled_back_on_release(engine: AsyncEngine) -> None:
    async with raw_connection(engine) as conn:
        await conn.execute("CREATE TABLE raw_probe (n int)")
    async with raw_connection(engine) as conn:
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO raw_probe VALUES (1)")
    pool = await hot_pool(engine)
    async with pool.acquire() as conn:
        assert not conn.is_in_transaction()
        assert await asyncio.wait_for(conn.fetchval("SELECT count(*) FROM raw_probe"), 5) == 0


async def test_disposing_the_engine_closes_the_hot_pool(database_url: str) -> None:
    engine = create_engine(database_url, pool_size=2)
    async with raw_connection(engine) as conn:
        backend = await conn.fetchval("SELECT pg_backend_pid()")
    pool = await hot_pool(engine)
    await asyncio.wait_for(engine.dispose(), 10)
    assert pool.is_closing()
    probe = create_engine(database_url, pool_size=1)

    async def backend_gone() -> bool:
        async with raw_connection(probe) as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", backend
            )
        return bool(count == 0)

    try:
        await wait_for(backend_gone, timeout=10, message="the hot pool's backend to exit")
    finally:
        await probe.dispose()


async def test_a_backend_terminated_mid_statement_is_an_error_not_a_cancellation(
    engine: AsyncEngine,
) -> None:
    async def sleeper() -> None:
        async with raw_connection(engine) as conn:
            await conn.execute("SELECT pg_sleep(30)")

    task = asyncio.create_task(sleeper())
    async with raw_connection(engine) as admin:

        async def sleeping() -> bool:
            found = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
            )
            return bool(found)

        await wait_for(sleeping, timeout=10, message="the sleeping statement")
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query = 'SELECT pg_sleep(30)'"
        )
    done, _ = await asyncio.wait({task}, timeout=10)
    assert task in done and not task.cancelled()
    assert isinstance(task.exception(), asyncpg.PostgresError | asyncpg.InterfaceError)
    async with raw_connection(engine) as conn:  # the pool hands out a working connection
        assert await asyncio.wait_for(conn.fetchval("SELECT 41 + 1"), 5) == 42


def _terminate_from_another_loop(database_url: str, backends: list[int]) -> None:
    """Ends ``backends`` and waits until they are gone, from a thread with its own event
    loop: the caller's loop, blocked meanwhile, has not yet seen any of it."""

    async def terminate() -> None:
        conn = await asyncpg.connect(database_url.replace("+asyncpg", ""))
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", backends
            )

            async def gone() -> bool:
                left = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", backends
                )
                return bool(left == 0)

            await wait_for(gone, timeout=10, message="the terminated backends to exit")
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(terminate(),))
    thread.start()
    thread.join(30)
    assert not thread.is_alive()


async def _terminate_pooled_connections(
    engine: AsyncEngine, database_url: str, count: int
) -> list[int]:
    """Fills ``engine``'s hot pool with ``count`` idle connections and ends their backends
    (``_terminate_from_another_loop``); returns their pids."""
    pool = await hot_pool(engine)
    held = [await asyncio.wait_for(pool.acquire(), 10) for _ in range(count)]
    backends = [
        await asyncio.wait_for(conn.fetchval("SELECT pg_backend_pid()"), 5) for conn in held
    ]
    for conn in held:
        await pool.release(conn)
    _terminate_from_another_loop(database_url, backends)
    return backends


async def test_a_read_outlives_every_pooled_connection_being_terminated(database_url: str) -> None:
    engine = create_engine(database_url, pool_size=4)
    try:
        backends = await _terminate_pooled_connections(engine, database_url, 4)

        async def read(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval("SELECT pg_backend_pid()"))

        # A plain read lands on a dead connection; the retrying one finds a live one.
        with pytest.raises((*CONNECTION_LOST, asyncpg.InternalClientError)):
            async with raw_connection(engine) as conn:
                await asyncio.wait_for(read(conn), 5)
        backend = await asyncio.wait_for(read_on_live_connection(engine, read), 10)
        assert backend not in backends
    finally:
        await asyncio.wait_for(engine.dispose(), 10)


async def test_a_read_is_not_retried_when_no_connection_can_be_opened() -> None:
    engine = create_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none", pool_size=2)
    calls = 0

    async def read(conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1

    try:
        with pytest.raises(OSError):
            await asyncio.wait_for(read_on_live_connection(engine, read), 10)
        assert calls == 0
    finally:
        await asyncio.wait_for(engine.dispose(), 10)


async def test_after_one_dead_connection_the_next_statement_gets_a_live_one(
    database_url: str,
) -> None:
    engine = create_engine(database_url, pool_size=4)
    try:
        backends = await _terminate_pooled_connections(engine, database_url, 4)

        # asyncio.timeout, not wait_for: no task in between, so the loop does not get to
        # notice the other connections' ends before they are handed out.
        async with asyncio.timeout(10):
            with pytest.raises((*CONNECTION_LOST, asyncpg.InternalClientError)):
                async with raw_connection(engine) as conn:
                    await conn.fetchval("SELECT $1::int", 1)
            # The other three pooled connections died too; a write is not retried, so
            # the pool must hand out a live connection by itself. (Prepared statements,
            # as the hot paths run.)
            async with raw_connection(engine) as conn:
                backend = await conn.fetchval("SELECT pg_backend_pid() + $1", 0)
        assert backend not in backends
    finally:
        await asyncio.wait_for(engine.dispose(), 10)


async def test_a_hot_pool_statement_is_planned_once_per_connection(engine: AsyncEngine) -> None:
    # The generic plan from the first execution on, not five custom plans first.
    async with raw_connection(engine) as conn:
        for _ in range(7):
            await asyncio.wait_for(conn.fetchval("SELECT id FROM jobs WHERE id = $1", None), 5)
        plans = await asyncio.wait_for(
            conn.fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement = 'SELECT id FROM jobs WHERE id = $1'"
            ),
            5,
        )
    assert (plans["generic_plans"], plans["custom_plans"]) == (7, 0)
