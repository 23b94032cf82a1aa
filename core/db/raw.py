"""A plain asyncpg pool beside SQLAlchemy's, for the hot paths.

Checking a connection out of SQLAlchemy's async pool and running one statement costs
about 0.8 ms of Python on these machines (greenlet switches, compilation, cache keys,
result metadata, autobegin and ROLLBACK) against about 0.1 ms for the same statement
on an asyncpg connection. The hot paths — polling a job, moving a job between stages,
leasing broker messages — use this pool; everything else stays on SQLAlchemy.

asyncpg prepares and caches each statement per connection. A statement runs in
autocommit unless the caller opens ``conn.transaction()``; one statement (CTEs and
all) is atomic on its own. JSON and JSONB go in and out through orjson, as on the
engine, in the binary format (UTF-8 bytes both ways). The pool is created on first use,
one per engine, and closed with the engine (``core.db.engine.Engine.dispose``).

Behind PgBouncer in transaction mode, enable its prepared-statement support
(``max_prepared_statements``, PgBouncer 1.21+): see the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import orjson
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")

_pools: weakref.WeakKeyDictionary[Any, asyncpg.Pool] = weakref.WeakKeyDictionary()
_locks: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class EncodedJson:
    """JSON already encoded (UTF-8): the json and jsonb codecs send ``data`` as it is, so
    a caller that encoded a document for another use (the next stage's claim, a webhook
    body) neither encodes it twice nor keeps it as a ``str``, which takes two bytes a
    character once one character is outside Latin-1 (a dash, an ellipsis)."""

    data: bytes


_JSONB_VERSION = b"\x01"
"""jsonb's binary form: this version byte, then the JSON text."""


def _json(value: Any) -> bytes:
    if type(value) is EncodedJson:
        return value.data
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def _jsonb(value: Any) -> bytes:
    return _JSONB_VERSION + _json(value)


def _from_jsonb(data: bytes) -> Any:
    if data[:1] != _JSONB_VERSION:
        raise ValueError(f"unsupported jsonb format version {data[:1]!r}")
    return orjson.loads(memoryview(data)[1:])


async def _init(conn: asyncpg.Connection) -> None:
    # Every hot-path statement finds its rows by key, so the generic plan is the plan:
    # without this, PostgreSQL plans each prepared statement five more times on every new
    # connection before settling on it (5% of its CPU in the concurrency benchmark, where
    # the hand-offs' CTE statements are the costly ones to plan). A session setting rather
    # than a startup parameter, which PgBouncer would refuse; behind it in transaction
    # mode the setting stays with the server connection.
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    # Binary: values go out and come back as UTF-8 bytes, not as str in between.
    for name, encoder, decoder in (("json", _json, orjson.loads), ("jsonb", _jsonb, _from_jsonb)):
        await conn.set_type_codec(
            name, encoder=encoder, decoder=decoder, schema="pg_catalog", format="binary"
        )


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


def database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database could not be reached, refused more clients or
    dropped the connection — worth retrying shortly — rather than that a statement was
    wrong. Covers errors from the hot pool and from SQLAlchemy's engine alike."""
    if isinstance(exc, DBAPIError):
        # The driver's own error is the cause of the DB-API error SQLAlchemy wraps.
        driver = exc.orig.__cause__ if exc.orig is not None else None
        return bool(exc.connection_invalidated) or (
            driver is not None and database_unavailable(driver)
        )
    if isinstance(exc, SQLAlchemyTimeoutError):
        return True  # every pooled connection busy for the whole pool timeout
    return isinstance(
        exc, (*CONNECTION_LOST, asyncpg.InternalClientError, asyncpg.TooManyConnectionsError)
    )


def spurious_cancel(exc: BaseException) -> bool:
    """True for the ``CancelledError`` asyncpg raises from a statement whose connection
    the server terminated under it — a real cancellation shows on the current task."""
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling() == 0


SUSPECT_SECONDS = 5.0
"""After a connection of a pool is found dead, how long each connection it hands out is
checked first (``SELECT 1``): long enough for the others that died with it to be weeded
out, short enough that the check costs nothing in normal running."""

_suspect_until: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
"""Per engine (as ``_pools``), until when its hot pool's connections are checked."""


def _suspect(engine: AsyncEngine) -> None:
    _suspect_until[engine.sync_engine] = asyncio.get_running_loop().time() + SUSPECT_SECONDS


async def _acquire_live(engine: AsyncEngine, pool: asyncpg.Pool) -> asyncpg.Connection:
    """A connection of ``pool``; while it is suspect, one that answered a ping.

    When the server ends its backends (a restart, a failover), every idle connection in
    the pool is dead but shows it only when used, so a write handed one would fail and
    its work (a stage's LLM output) be redone. The first failure makes the pool suspect;
    until then connections are handed out unchecked.
    """
    conn = await pool.acquire()
    if asyncio.get_running_loop().time() >= _suspect_until.get(engine.sync_engine, 0.0):
        return conn
    for _ in range(pool.get_max_size()):
        try:
            await conn.execute("SELECT 1")
            return conn
        except (*CONNECTION_LOST, asyncpg.InternalClientError, asyncio.CancelledError) as exc:
            conn.terminate()  # dead, or cancelled mid-ping: never hand it out again
            with contextlib.suppress(asyncpg.InternalClientError):
                await pool.release(conn)
            if isinstance(exc, asyncio.CancelledError) and not spurious_cancel(exc):
                raise
        conn = await pool.acquire()
    return conn  # every try dead: let the caller's statement say what is wrong


@contextlib.asynccontextmanager
async def raw_connection(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection from ``engine``'s hot pool, returned on exit.

    A connection the server terminated mid-statement surfaces as
    ``ConnectionDoesNotExistError`` (a transient database error), never as a
    cancellation of the caller. After one is found dead, the pool's connections are
    checked before use for a few seconds (``SUSPECT_SECONDS``).
    """
    pool = await hot_pool(engine)
    conn = await _acquire_live(engine, pool)
    try:
        yield conn
    except asyncio.CancelledError as exc:
        if not spurious_cancel(exc):
            raise
        _suspect(engine)
        conn.terminate()  # its protocol state is unknown: never hand it out again
        raise asyncpg.ConnectionDoesNotExistError(
            "the connection was terminated during a statement"
        ) from exc
    except asyncpg.InternalClientError:
        _suspect(engine)
        conn.terminate()  # "another operation is in progress": the same
        raise
    except CONNECTION_LOST:
        _suspect(engine)
        raise
    finally:
        try:
            await pool.release(conn)
        except asyncpg.InternalClientError:
            pass  # terminated under us: asyncpg already took it back


async def read_on_live_connection(
    engine: AsyncEngine, read: Callable[[asyncpg.Connection], Awaitable[T]]
) -> T:
    """``read(conn)`` on a hot-pool connection, run once more if that connection turns out
    dead. Only for reads: the statement may have run before its answer was lost.

    The failure makes the pool check the connections it hands out (``_acquire_live``),
    so the second try gets a live one even when every pooled connection died together (a
    restart, a failover). A connection that cannot be opened at all is not retried: the
    database is down, and the caller hears so.
    """
    for last in (False, True):
        used = False
        try:
            async with raw_connection(engine) as conn:
                used = True
                return await read(conn)
        except (*CONNECTION_LOST, asyncpg.InternalClientError):
            if not used or last:
                raise
    raise AssertionError("unreachable")  # the last try returns or raises


async def close_hot_pool(engine: AsyncEngine) -> None:
    """Close ``engine``'s hot pool if one was opened (``Engine.dispose`` calls this)."""
    pool = _pools.pop(engine.sync_engine, None)
    if pool is not None:
        await pool.close()
