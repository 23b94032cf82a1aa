"""SQL with named parameters for asyncpg, which only knows ``$1, $2, …``.

Hot-path statements are written once at import with ``:name`` placeholders (``::`` casts
are left alone) and called with keyword arguments, so a statement of a dozen parameters
stays readable and a missing argument is a ``KeyError`` naming it, not a shifted ``$n``.

``Batcher`` sends concurrent callers' executions of one statement together: the pipeline's
hand-offs, job submissions and webhook settlements, which under load arrive many at once.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.raw import (
    CONNECTION_LOST,
    database_unavailable,
    raw_connection,
    read_on_live_connection,
)

_PLACEHOLDER = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


class Statement:
    """One SQL statement: ``sql`` for asyncpg and ``args(**values)`` in ``$n`` order."""

    __slots__ = ("names", "read", "sql")

    def __init__(self, sql: str, *, read: bool = False) -> None:
        # A read may run again when its connection turns out dead (a write may have
        # committed before its answer was lost, so it is never rerun that way).
        self.read = read
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self.sql = _PLACEHOLDER.sub(number, sql)
        self.names = tuple(names)

    def args(self, **values: Any) -> list[Any]:
        extra = values.keys() - set(self.names)
        if extra:
            raise TypeError(f"unknown statement parameter(s): {', '.join(sorted(extra))}")
        return [values[name] for name in self.names]

    async def fetchrow(self, engine: AsyncEngine, **values: Any) -> Any:
        """Run on a hot-pool connection of ``engine`` (autocommit); the first row or None."""
        async with raw_connection(engine) as conn:
            return await conn.fetchrow(self.sql, *self.args(**values))

    async def fetchrow_batched(self, engine: AsyncEngine, **values: Any) -> Any:
        """As ``fetchrow``, sent together with concurrent callers' executions of this
        statement (``Batcher``): for single statements that return one row."""
        return await batcher(self, engine).run(engine, **values)

    async def execute_batched(self, engine: AsyncEngine, **values: Any) -> None:
        """As ``execute``, sent together with concurrent callers' executions of this
        statement (``Batcher``)."""
        await batcher(self, engine, rows=False).run(engine, **values)

    async def execute(self, engine: AsyncEngine, **values: Any) -> None:
        """Run on a hot-pool connection of ``engine`` (autocommit) for its effect."""
        async with raw_connection(engine) as conn:
            await conn.execute(self.sql, *self.args(**values))


_Waiting = tuple[list[Any], asyncio.Future[Any]]
"""An execution's arguments and the future its caller awaits."""

BATCH_LIMIT = 64
"""At most this many executions of one statement go to the server together."""

IN_FLIGHT_LIMIT = 3
"""At most this many batches of one statement in flight at once; a second or third goes
out only when a whole batch waits (so light load still sends one batch at a time, each as
large as the load makes it). With one batch at a time, 2,000 jobs in flight queued their
hand-offs behind it while the database used well under its two cores."""


class Batcher:
    """One statement's executions by concurrent callers, sent to the server together.

    A caller that finds no batch of this statement in flight sends its own at once (alone,
    when nothing else waits: an idle system pays no delay); executions that arrive while
    one is in flight wait for it and then go together, in one round trip and one
    transaction (asyncpg's ``fetchmany``: one Sync, one commit). Under load that saves
    the per-statement protocol and commit work of both sides. When a whole batch
    (``BATCH_LIMIT``) is waiting, it goes out at once on another connection, up to
    ``IN_FLIGHT_LIMIT`` batches in flight: a backlog is worked off by several server
    processes (cores) side by side instead of one batch at a time.

    Each execution must be a single statement returning exactly one row (unless run for
    its effect only, ``rows=False``: asyncpg's ``executemany``), and safe to run
    in one transaction with other callers' executions (the pipeline's hand-offs lock only
    their own job's rows; should two batches still deadlock, the server rejects one).
    When the server rejects a batch (one execution's constraint violation, a deadlock
    with another transaction) nothing of it was committed, so each execution is run again
    alone and its caller gets its own row or error. When the connection is lost, whether
    the batch committed is unknown: every caller gets the error, as each would alone.
    """

    __slots__ = ("_drainers", "_pending", "_rows", "_statement")

    def __init__(self, statement: Statement, *, rows: bool = True) -> None:
        self._statement = statement
        self._rows = rows  # whether each execution's one row is wanted (else run for effect)
        self._pending: list[_Waiting] = []
        self._drainers: set[asyncio.Task[None]] = set()  # the tasks sending batches

    @property
    def waiting(self) -> int:
        """Executions waiting for a batch in flight to finish."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Batches being sent (each by its own task, on its own connection)."""
        return len(self._drainers)

    async def run(self, engine: AsyncEngine, **values: Any) -> Any:
        """Run the statement with ``values`` on ``engine``'s hot pool (alone or with
        others); its one row, or None when rows are not wanted."""
        args = self._statement.args(**values)
        future = asyncio.get_running_loop().create_future()
        self._pending.append((args, future))
        drainers = self._drainers
        if not drainers or (len(self._pending) >= BATCH_LIMIT and len(drainers) < IN_FLIGHT_LIMIT):
            drainers.add(asyncio.get_running_loop().create_task(self._drain(engine)))
        return await future

    async def _drain(self, engine: AsyncEngine) -> None:
        try:
            while self._pending:
                batch = self._pending[:BATCH_LIMIT]
                del self._pending[:BATCH_LIMIT]
                await self._send(engine, batch)
        except BaseException as exc:
            # Cancelled (the loop is closing): nobody is left to send what waits.
            for _, future in self._pending:
                _settle(future, error=exc)
            self._pending.clear()
            raise
        finally:
            # Here, not in a done callback: a caller arriving after the last batch was
            # taken must find this task gone and start another.
            self._drainers.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _send(self, engine: AsyncEngine, batch: list[_Waiting]) -> None:
        if len(batch) == 1:
            await self._alone(engine, *batch[0])
            return
        sql = self._statement.sql
        try:
            async with raw_connection(engine) as conn:
                if self._rows:
                    rows = await conn.fetchmany(sql, [args for args, _ in batch])
                else:
                    await conn.executemany(sql, [args for args, _ in batch])
                    rows = [None] * len(batch)
        except BaseException as exc:
            rerun = _rolled_back(exc) or (self._statement.read and _connection_lost(exc))
            if isinstance(exc, Exception) and rerun:
                await asyncio.gather(*(self._alone(engine, args, future) for args, future in batch))
                return
            for _, future in batch:
                _settle(future, error=exc)
            if not isinstance(exc, Exception):
                raise
            return
        if len(rows) != len(batch):
            error = RuntimeError(f"a batched statement returned {len(rows)} rows for {len(batch)}")
            for _, future in batch:
                _settle(future, error=error)
            return
        for (_, future), row in zip(batch, rows, strict=True):
            _settle(future, row)

    async def _alone(
        self, engine: AsyncEngine, args: list[Any], future: asyncio.Future[Any]
    ) -> None:
        sql = self._statement.sql

        async def fetch(conn: asyncpg.Connection) -> Any:
            if self._rows:
                return await conn.fetchrow(sql, *args)
            await conn.execute(sql, *args)
            return None

        try:
            if self._statement.read:
                row = await read_on_live_connection(engine, fetch)
            else:
                async with raw_connection(engine) as conn:
                    row = await fetch(conn)
        except BaseException as exc:
            _settle(future, error=exc)
            if not isinstance(exc, Exception):
                raise
        else:
            _settle(future, row)


def _rolled_back(exc: BaseException) -> bool:
    """Whether the server certainly committed nothing of a batch that raised ``exc``: it
    rejected a statement (the transaction was rolled back), or an argument could not be
    encoded (nothing was sent)."""
    if isinstance(exc, asyncpg.DataError):
        return True
    return isinstance(exc, asyncpg.PostgresError) and not database_unavailable(exc)


def _connection_lost(exc: BaseException) -> bool:
    return isinstance(exc, (*CONNECTION_LOST, asyncpg.InternalClientError))


def _settle(
    future: asyncio.Future[Any], row: Any = None, *, error: BaseException | None = None
) -> None:
    if future.done():
        return  # its caller was cancelled
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(row)


_batchers: weakref.WeakKeyDictionary[Any, dict[tuple[Statement, bool], Batcher]] = (
    weakref.WeakKeyDictionary()
)


def batcher(statement: Statement, engine: AsyncEngine, *, rows: bool = True) -> Batcher:
    """The ``Batcher`` of ``statement`` for ``engine``'s database (one per pair; pass the
    engine to its ``run``), returning each execution's row or (``rows=False``) nothing."""
    per_engine = _batchers.setdefault(engine.sync_engine, {})
    found = per_engine.get((statement, rows))
    if found is None:
        found = per_engine[statement, rows] = Batcher(statement, rows=rows)
    return found
