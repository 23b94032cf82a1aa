"""Fault injection for the delivery-guarantee tests: duplicated deliveries, publishes that
fail after commit, dropped database connections, and the row counts that prove nothing
was lost or done twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import pytest

from core.constants import STAGES, stage_topic
from core.db.engine import plain_url
from core.dispatch import Dispatcher
from core.errors import BrokerError

STAGE_TOPICS = frozenset(stage_topic(stage) for stage in STAGES)


def broker_env(kind: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """Pipeline environment overrides for a broker kind (``pubsub`` starts the emulator)."""
    if kind == "postgres":
        return {"BLOGPIPE_BROKER": "postgres"}
    emulator = request.getfixturevalue("pubsub_emulator")
    return {
        "BLOGPIPE_BROKER": "pubsub",
        "BLOGPIPE_TASK_QUEUE": "local",
        "GOOGLE_CLOUD_PROJECT": emulator.project("bp-faults"),
        "PUBSUB_EMULATOR_HOST": emulator.host,
        "BLOGPIPE_MIN_BACKOFF": "0",
        "BLOGPIPE_MAX_ATTEMPTS": "5",
    }


BROKERS = ["postgres", pytest.param("pubsub", marks=pytest.mark.pubsub)]


def duplicate_stage_messages(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every stage message is published twice (both brokers); returns the extra counts."""
    import blogpipe.runtime

    extra: Counter[str] = Counter()
    build = blogpipe.runtime.build_broker

    def doubled(settings: Any, engine: Any) -> Any:
        broker = build(settings, engine)
        publish = broker.publish

        async def publish_twice(topic: str, message: Any) -> str:
            if topic in STAGE_TOPICS:
                extra[topic] += 1
                await publish(topic, message)
            return await publish(topic, message)

        broker.publish = publish_twice  # type: ignore[method-assign]
        if hasattr(broker, "staging_sql"):
            # Hand-offs inside a transition statement: fan each stage message out twice.
            staging_sql = broker.staging_sql
            topics = ", ".join(f"'{topic}'" for topic in sorted(STAGE_TOPICS))

            def staging_twice(name: str, guard: str, prefix: str) -> str:
                copies = f"CASE WHEN :{prefix}_topic::text IN ({topics}) THEN 2 ELSE 1 END"
                held = f"s.name = :{prefix}_hold::text"
                sql = str(staging_sql(name, guard, prefix))
                assert held in sql
                # The copy handed to a local consumer is the first; the second is available
                # at once, to whichever consumer leases it.
                return sql.replace(held, f"{held} AND copy.n = 1").replace(
                    "FROM broker_subscriptions s",
                    f"FROM broker_subscriptions s CROSS JOIN generate_series(1, {copies}) copy(n)",
                )

            broker.staging_sql = staging_twice
            staging_args = Dispatcher.staging_args

            def counted(prefix: str, topic: str, message: Any) -> dict[str, object]:
                if topic in STAGE_TOPICS:
                    extra[topic] += 1
                return staging_args(prefix, topic, message)

            monkeypatch.setattr(Dispatcher, "staging_args", staticmethod(counted))
        return broker

    monkeypatch.setattr(blogpipe.runtime, "build_broker", doubled)
    return extra


def fail_first_publish(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Use the outbox on every broker, and fail the first publish of every message after
    its transaction committed (as if the process died there); the relay must publish it."""
    import blogpipe.runtime

    failed: Counter[str] = Counter()
    seen: set[bytes] = set()
    init = Dispatcher.__init__

    def outbox_init(self: Dispatcher, engine: Any, broker: Any) -> None:
        init(self, engine, broker)
        self.transactional = False

    build = blogpipe.runtime.build_broker

    def flaky(settings: Any, engine: Any) -> Any:
        broker = build(settings, engine)
        publish = broker.publish

        async def publish_or_fail(topic: str, message: Any) -> str:
            if message.data not in seen:
                seen.add(message.data)
                failed[topic] += 1
                raise BrokerError(f"injected publish failure on {topic}")
            return await publish(topic, message)

        broker.publish = publish_or_fail  # type: ignore[method-assign]
        return broker

    monkeypatch.setattr(Dispatcher, "__init__", outbox_init)
    monkeypatch.setattr(blogpipe.runtime, "build_broker", flaky)
    return failed


async def terminate_backends(database_url: str) -> int:
    """Kill every other connection to the test database (``pg_terminate_backend``)."""
    conn = await asyncio.wait_for(asyncpg.connect(plain_url(database_url)), 10)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return int(killed)


async def scalar(database_url: str, sql: str, *args: Any) -> Any:
    """One value from the test database, on a connection of its own."""
    conn = await asyncio.wait_for(asyncpg.connect(plain_url(database_url)), 10)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def duplicate_outputs(database_url: str) -> int:
    """(job, stage, generation) triples with more than one stored output; must be 0."""
    return int(
        await scalar(
            database_url,
            "SELECT count(*) FROM (SELECT 1 FROM stage_runs WHERE status = 'succeeded'"
            " GROUP BY job_id, stage, generation HAVING count(*) > 1) d",
        )
    )
