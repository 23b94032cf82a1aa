"""A plain asyncpg pool beside SQLAlchemy's, for the hot paths.

Checking a connection out of SQLAlchemy's async pool and running one statement costs
about 0.8 ms of Python on these machines (greenlet switches, compilation, cache keys,
result metadata, autobegin and ROLLBACK) against about 0.1 ms for the same statement
on an asyncpg connection. The hot paths — polling a job, moving a job between stages,
leasing broker messages — use this pool; everything else stays on SQLAlchemy.

asyncpg prepares and caches each statement per connection. A statement runs in
autocommit unless the caller opens ``conn.transaction()``; one statement (CTEs and
all) is atomic on its own. JSON and JSONB go in and out through orjson, as on the
engine. The pool is created on first use, one per engine, and closed with the engine
(``core.db.engine.Engine.dispose``).

Behind PgBouncer in transaction mode, enable its prepared-statement support
(``max_prepared_statements``, PgBouncer 1.21+): see the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

_pools: weakref.WeakKeyDictionary[Any, asyncpg.Pool] = weakref.WeakKeyDictionary()
_locks: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


async def _init(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


async def _reset(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset sends RESET ALL, UNLISTEN * … on every release: a round
    # trip per statement. Hot-path code sets nothing on the session, so only an
    # abandoned transaction needs undoing.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def hot_pool(engine: AsyncEngine) -> asyncpg.Pool:
    """The asyncpg pool for ``engine``'s database, created on first use."""
    key = engine.sync_engine
    pool = _pools.get(key)
    if pool is not None:
        return pool
    lock = _locks.setdefault(key, asyncio.Lock())
    async with lock:
        pool = _pools.get(key)
        if pool is None:
            url = engine.url.set(drivername="postgresql")
            size = max(2, engine.pool.size())  # type: ignore[attr-defined]
            pool = await asyncpg.create_pool(
                url.render_as_string(hide_password=False),
                min_size=1,
                max_size=size,
                init=_init,
                reset=_reset,
                max_inactive_connection_lifetime=300.0,
            )
            _pools[key] = pool
    return pool


CONNECTION_LOST = (
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # e.g. terminated by an administrator
    OSError,
)
"""Errors that mean the connection is gone, not that the statement was wrong."""


def spurious_cancel(exc: BaseException) -> bool:
    """True for the ``CancelledError`` asyncpg raises from a statement whose connection
    the server terminated under it — a real cancellation shows on the current task."""
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling() == 0


@contextlib.asynccontextmanager
async def raw_connection(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection from ``engine``'s hot pool, returned on exit.

    A connection the server terminated mid-statement surfaces as
    ``ConnectionDoesNotExistError`` (a transient database error), never as a
    cancellation of the caller.
    """
    pool = await hot_pool(engine)
    conn = await pool.acquire()
    try:
        yield conn
    except asyncio.CancelledError as exc:
        if not spurious_cancel(exc):
            raise
        conn.terminate()  # its protocol state is unknown: never hand it out again
        raise asyncpg.ConnectionDoesNotExistError(
            "the connection was terminated during a statement"
        ) from exc
    except asyncpg.InternalClientError:
        conn.terminate()  # "another operation is in progress": the same
        raise
    finally:
        try:
            await pool.release(conn)
        except asyncpg.InternalClientError:
            pass  # terminated under us: asyncpg already took it back


async def close_hot_pool(engine: AsyncEngine) -> None:
    """Close ``engine``'s hot pool if one was opened (``Engine.dispose`` calls this)."""
    pool = _pools.pop(engine.sync_engine, None)
    if pool is not None:
        await pool.close()
