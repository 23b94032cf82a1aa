"""Polls of ``GET /api/v1/blog/jobs/{id}``, read in batches, with completed jobs' answers
kept encoded.

The polls that arrive while a read is in flight wait and go together in the next one, so
under load one statement serves many polls (one checkout, one round trip, one executor
start). Each poll still reads its job after it arrived.

A completed job's document does not change until the job row does: a replay or a
deletion is the only way out of ``completed``, and each changes ``updated_at`` (a
replay also the generation). So the encoded document of a completed job is kept,
keyed by both, and the read asks Postgres only whether they still match. When they do,
the job's result, progress updates and stage runs are neither built by Postgres nor
encoded again here: the poll costs an index lookup. Jobs in any other state are read
in full every time (a cancelled or failed job's last stage run may still be settling).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from core import jsonbytes
from core.db.raw import read_on_live_connection

CACHED_STATUS = "completed"
DEFAULT_CACHE_BYTES = 32 * 2**20

Render = Callable[[asyncpg.Record, float], bytes]
"""Encodes the document for a full row, given the current estimated run time."""


@dataclass(frozen=True)
class Polled:
    """A poll's answer: the job's tenant (for the caller's scope check) and its document."""

    tenant: str
    body: bytes


@dataclass(frozen=True)
class _Kept:
    tenant: str
    updated_at: datetime
    generation: int
    body: bytes


class PollReads:
    """Batched polling reads with a bounded, validated cache of completed jobs' bodies.

    ``query`` takes ``$1`` the job ids, and ``$2``/``$3``/``$4`` the ids, ``updated_at``
    and generations of the kept bodies; it returns ``id``, ``tenant`` and ``fresh``
    (the kept body still holds) for every job found, and the full row where not fresh.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        query: str,
        render: Render,
        estimate: Callable[[], Awaitable[float]],
        *,
        readers: int = 2,
        batch: int = 64,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.engine = engine
        self.query = query
        self.render = render
        self.estimate = estimate
        self.readers = readers
        self.batch = batch
        self.cache_bytes = cache_bytes
        self.hits = 0
        self._kept: OrderedDict[UUID, _Kept] = OrderedDict()
        self._kept_bytes = 0
        self._waiting: list[tuple[UUID, asyncio.Future[Polled | None]]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def kept(self) -> int:
        """How many completed jobs' bodies are kept."""
        return len(self._kept)

    async def read(self, job_id: UUID) -> Polled | None:
        """The job's answer (whatever its tenant), or None when there is no such job."""
        future: asyncio.Future[Polled | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((job_id, future))
        if self._running < self.readers:
            self._running += 1
            task = asyncio.create_task(self._read_while_waiting())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _read_while_waiting(self) -> None:
        # The count drops in the same step that finds nobody waiting, so a poll that
        # arrives later always finds a reader running or starts one.
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self.batch], self._waiting[self.batch :]
                await self._read_batch(batch)
        finally:
            self._running -= 1

    async def _read_batch(self, batch: list[tuple[UUID, asyncio.Future[Polled | None]]]) -> None:
        try:
            answers = await self._answers(list({job_id for job_id, _ in batch}))
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        for job_id, future in batch:
            if not future.done():
                future.set_result(answers.get(job_id))

    async def _answers(self, ids: list[UUID]) -> dict[UUID, Polled]:
        # What is kept now: another reader may replace an entry while this one reads.
        kept = {job_id: self._kept[job_id] for job_id in ids if job_id in self._kept}
        args = (
            ids,
            list(kept),
            [entry.updated_at for entry in kept.values()],
            [entry.generation for entry in kept.values()],
        )

        async def fetch(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return await conn.fetch(self.query, *args)

        rows = await read_on_live_connection(self.engine, fetch)
        answers: dict[UUID, Polled] = {}
        estimate: float | None = None
        for row in rows:
            job_id = row["id"]
            entry = kept.get(job_id)
            if row["fresh"] and entry is not None:
                self.hits += 1
                if job_id in self._kept:
                    self._kept.move_to_end(job_id)
                answers[job_id] = Polled(entry.tenant, entry.body)
                continue
            if estimate is None:
                estimate = await self.estimate()
            body = self.render(row, estimate)
            answers[job_id] = Polled(row["tenant"], body)
            self._forget(job_id)
            if row["status"] == CACHED_STATUS:
                # Kept: in a buffer of its length, so the byte budget is what it holds.
                sized = jsonbytes.right_sized(body)
                self._keep(
                    job_id, _Kept(row["tenant"], row["updated_at"], row["generation"], sized)
                )
        for job_id in ids:
            if job_id not in answers:
                self._forget(job_id)  # deleted (retention) since it was kept
        return answers

    def _keep(self, job_id: UUID, entry: _Kept) -> None:
        if len(entry.body) > self.cache_bytes:
            return
        self._kept[job_id] = entry
        self._kept_bytes += len(entry.body)
        while self._kept_bytes > self.cache_bytes:
            _, oldest = self._kept.popitem(last=False)
            self._kept_bytes -= len(oldest.body)

    def _forget(self, job_id: UUID) -> None:
        entry = self._kept.pop(job_id, None)
        if entry is not None:
            self._kept_bytes -= len(entry.body)
