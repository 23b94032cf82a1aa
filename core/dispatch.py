"""Hand-offs that survive crashes: the next message is written in the same transaction as
the state change that causes it, then published after commit.

With a broker that can enqueue inside our transaction (the ``postgres`` broker) the queue
row itself is written there. Otherwise the message goes to the ``outbox`` table and is
published right after commit; the relay republishes rows a crash left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.broker import Broker, Delivery, Message

if TYPE_CHECKING:
    from core.broker.postgres_consumer import Hold

logger = logging.getLogger("blogpipe.dispatch")


class Dispatcher:
    """Stages messages inside transactions and publishes them after commit."""

    def __init__(self, engine: AsyncEngine, broker: Broker) -> None:
        self.engine = engine
        self.broker = broker
        self.transactional = hasattr(broker, "publish_in_transaction")

    async def stage(self, conn: AsyncConnection, topic: str, message: Message) -> int | None:
        """Write ``message`` in ``conn``'s transaction; return an outbox id to flush, if any."""
        if self.transactional:
            await self.broker.publish_in_transaction(conn, topic, message)  # type: ignore[attr-defined]
            return None
        row = await conn.execute(
            text(
                "INSERT INTO outbox (topic, data, attributes) VALUES (:topic, :data, :attributes)"
                " RETURNING id"
            ),
            {
                "topic": topic,
                "data": message.data,
                "attributes": orjson.dumps(message.attributes).decode(),
            },
        )
        return int(row.scalar_one())

    def staging(self, name: str, guard: str, prefix: str) -> str:
        """A data-modifying CTE ``name AS (…)`` that stages one message where ``guard`` (an
        SQL condition) holds, for hot-path statements that do a whole transition at once.

        Its parameters are ``:<prefix>_topic``, ``:<prefix>_data`` and
        ``:<prefix>_attributes`` (``staging_args``), and with a broker that stages in the
        statement also ``:<prefix>_hold`` and ``:<prefix>_hold_secs`` (``hold``). It yields
        ``outbox_id``, NULL when the broker took the message in the transaction itself, and
        ``held_id``, the copy staged leased to a consumer in this process. Such a broker
        also deletes the queue row ``:<prefix>_ack`` names: the delivery the statement
        finishes (``hold``'s ``ack``).
        """
        staging_sql = getattr(self.broker, "staging_sql", None)
        if self.transactional and staging_sql is not None:
            return str(staging_sql(name, guard, prefix))
        return (
            f"{name} AS (INSERT INTO outbox (topic, data, attributes)"
            f" SELECT :{prefix}_topic::text, :{prefix}_data::bytea, :{prefix}_attributes::jsonb"
            f" WHERE {guard} RETURNING id AS outbox_id, NULL::bigint AS held_id)"
        )

    def hold(
        self, prefix: str, topic: str, ack: Delivery | None = None
    ) -> tuple[dict[str, object], Hold | None]:
        """The ``staging`` CTE's hold parameters for a message to ``topic``, and the room
        reserved with a consumer of it in this process, if any (``PostgresBroker.hold``).

        After the statement, pass its ``held_id`` to ``Hold.deliver`` (or call
        ``Hold.release`` if it failed): that consumer then handles the message at once.
        ``ack`` is the delivery the statement finishes, if any: the statement deletes its
        queue row (call ``acked`` once it committed, so the consumer does not again).
        """
        hold_for = getattr(self.broker, "hold", None)
        if not self.transactional or hold_for is None:
            return {}, None
        ack_id = int(ack.message_id) if ack is not None and ack.message_id.isdigit() else None
        args: dict[str, object] = {f"{prefix}_ack": ack_id}
        hold: Hold | None = hold_for(topic)
        if hold is None:
            return {**args, f"{prefix}_hold": None, f"{prefix}_hold_secs": None}, None
        return {**args, **hold.args(prefix)}, hold

    def room_for(self, topic: str, within: float) -> contextlib.AbstractAsyncContextManager[None]:
        """Wait until a consumer of ``topic`` in this process could take one more message
        in memory, at most ``within`` seconds (``PostgresBroker.room_for``); at once with a
        broker that has no consumers in this process to wait for."""
        room_for = getattr(self.broker, "room_for", None)
        if self.transactional and room_for is not None:
            return cast(contextlib.AbstractAsyncContextManager[None], room_for(topic, within))
        return contextlib.nullcontext()

    def acked(self, delivery: Delivery) -> None:
        """``delivery`` was acked by the statement ``hold(…, ack=delivery)`` staged for."""
        acked = getattr(self.broker, "acked", None)
        if self.transactional and acked is not None:
            acked(delivery)

    @staticmethod
    def staging_args(prefix: str, topic: str, message: Message) -> dict[str, object]:
        """The parameters of a ``staging`` CTE for ``message`` on ``topic``."""
        return {
            f"{prefix}_topic": topic,
            f"{prefix}_data": message.data,
            f"{prefix}_attributes": message.attributes,
        }

    async def flush(self, outbox_ids: Sequence[int | None]) -> int:
        """Publish the given outbox rows now (after their transaction committed).

        A failure here is logged, not raised: the state change is committed and the rows
        stay in the outbox, where the relay publishes them within seconds.
        """
        ids = [outbox_id for outbox_id in outbox_ids if outbox_id is not None]
        if not ids:
            return 0
        try:
            return await self._publish_rows("id = ANY(:ids)", {"ids": ids})
        except Exception as exc:
            logger.warning(
                "Publishing %d outbox message(s) failed (%s); the relay will retry",
                len(ids),
                exc,
                extra={"action": "outbox_publish_failed", "count": len(ids)},
            )
            return 0

    async def relay_once(self, *, older_than: float = 2.0, limit: int = 200) -> int:
        """Publish outbox rows left behind (a crash between commit and publish)."""
        published = await self._publish_rows(
            "created_at < now() - make_interval(secs => :age)",
            {"age": older_than},
            limit=limit,
        )
        if published:
            logger.warning(
                "Relay republished %d outbox message(s) left unpublished",
                published,
                extra={"action": "outbox_relayed", "count": published},
            )
        return published

    async def run_relay(self, *, interval: float = 1.0, older_than: float = 2.0) -> None:
        """Run the relay until cancelled."""
        if self.transactional:
            return
        while True:
            try:
                await self.relay_once(older_than=older_than)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Outbox relay failed; retrying", extra={"action": "relay_error"})
            await asyncio.sleep(interval)

    async def _publish_rows(
        self, where: str, params: dict[str, object], *, limit: int = 1000
    ) -> int:
        # Rows stay locked while they are published, so the relay and the normal path
        # never publish the same row twice; a crash mid-publish leaves them for the relay.
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    text(
                        f"SELECT id, topic, data, attributes FROM outbox WHERE {where}"
                        f" ORDER BY id LIMIT {int(limit)} FOR UPDATE SKIP LOCKED"
                    ),
                    params,
                )
            ).all()
            if not rows:
                return 0
            await asyncio.gather(
                *(
                    self.broker.publish(row.topic, Message(bytes(row.data), dict(row.attributes)))
                    for row in rows
                )
            )
            await conn.execute(
                text("DELETE FROM outbox WHERE id = ANY(:ids)"), {"ids": [row.id for row in rows]}
            )
        return len(rows)
