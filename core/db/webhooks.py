"""Webhook deliveries, their attempt log, and endpoint health, in PostgreSQL.

The retry schedule is durable: a delivery's next attempt time lives in
``webhook_deliveries.next_attempt_at``. A sender claims due deliveries with
``FOR UPDATE SKIP LOCKED`` and holds them for a short lease (``status = 'sending'`` with
``next_attempt_at`` as the lease end), so several notifier processes never send the same
attempt twice and a crashed sender's delivery is retried once its lease runs out. The
attempt number doubles as a fencing token: a sender whose lease was taken over cannot
record over the newer attempt.

What runs for every delivery (reading the event's job, storing the delivery, claiming,
settling an attempt) runs on the asyncpg hot pool, one statement each
(``core.db.webhook_sql``); the operator's reads and actions stay on SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.db import webhook_sql as sql
from core.db.jobs import JobRecord
from core.db.raw import EncodedJson, raw_connection
from core.db.webhook_records import (
    EXCERPT_LIMIT,
    FAILED,
    HELD,
    PENDING,
    PROGRESS_EVENT,
    SENDING,
    SKIPPED,
    SUCCEEDED,
    AttemptOutcome,
    ClaimedDelivery,
    DeliveryHistory,
    EndpointSecrets,
    EventJob,
    Health,
    NewDelivery,
    Settlement,
    Sweep,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    delivery_id_for,
)
from core.db.webhook_sql import ATTEMPT_COLUMNS, DELIVERY_COLUMNS, ENDPOINT_COLUMNS

__all__ = [
    "DeliveryRepository",
    "PENDING",
    "SENDING",
    "SUCCEEDED",
    "FAILED",
    "HELD",
    "SKIPPED",
    "PROGRESS_EVENT",
    "EXCERPT_LIMIT",
    "Health",
    "delivery_id_for",
    "WebhookDelivery",
    "WebhookAttempt",
    "DeliveryHistory",
    "AttemptOutcome",
    "WebhookEndpoint",
    "EndpointSecrets",
    "ClaimedDelivery",
    "Sweep",
    "Settlement",
    "EventJob",
    "NewDelivery",
]

_GET_DELIVERY = f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1"


def _delivery(row: Mapping[str, Any]) -> WebhookDelivery:
    return WebhookDelivery(**dict(row))


def _clean(value: str | None, limit: int) -> str | None:
    # Postgres text cannot hold NUL; excerpts and errors are bounded.
    return value[:limit].replace("\x00", "") if value is not None else None


class DeliveryRepository:
    """Stores, claims and settles webhook deliveries; keeps endpoint health."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def event_job(self, job_id: UUID) -> EventJob | None:
        """The job an event is about (whatever its tenant), or None if it is gone."""
        row = await sql.EVENT_JOB.fetchrow_batched(self.engine, id=job_id)
        if row["id"] is None:
            return None
        fields = dict(row)
        updates, runs = fields.pop("updates"), fields.pop("runs")
        return EventJob(JobRecord(**fields), updates, runs)

    async def create(self, new: NewDelivery) -> tuple[WebhookDelivery, bool]:
        """Store a delivery for an event once; return it and whether it was new.

        A ``job.progress`` delivery older than another delivery of the same job is stored as
        ``skipped``, and storing any delivery skips the unsent progress deliveries before it:
        progress is never sent after a later event. A disabled endpoint gets ``held`` ones.
        """
        delivery, created, _ = await self._store(new, send_now=False, lease_seconds=0.0)
        return delivery, created

    async def create_claimed(
        self, new: NewDelivery, *, lease_seconds: float
    ) -> tuple[WebhookDelivery, bool, ClaimedDelivery | None]:
        """``create``, with the new delivery claimed for its first attempt in the same
        statement when nothing earlier of its job and endpoint is unsettled (what
        ``claim_due`` would do next, without the round trip); the claim, or None."""
        return await self._store(new, send_now=True, lease_seconds=lease_seconds)

    async def _store(
        self, new: NewDelivery, *, send_now: bool, lease_seconds: float
    ) -> tuple[WebhookDelivery, bool, ClaimedDelivery | None]:
        delivery_id = delivery_id_for(new.event_id)
        # Sent together with concurrent stores: under load many events arrive at once.
        row = await sql.CREATE.fetchrow_batched(
            self.engine,
            id=delivery_id,
            job_id=new.job_id,
            tenant=new.tenant,
            event_id=new.event_id,
            event_type=new.event_type,
            url=new.url,
            payload=new.payload if new.body is None else EncodedJson(new.body),
            occurred_at=new.occurred_at,
            send_now=send_now,
            lease=float(lease_seconds),
        )
        if row["id"] is None:  # a concurrent handler stored it first
            async with raw_connection(self.engine) as conn:
                stored = await conn.fetchrow(_GET_DELIVERY, delivery_id)
            assert stored is not None
            return _delivery(stored), False, None
        fields = dict(row)
        created = fields.pop("created")
        secrets = {name: fields.pop(name) for name in sql.SECRET_COLUMNS}
        if created:
            fields["payload"] = new.payload  # what was stored; not read back
        delivery = WebhookDelivery(**fields)
        if not created or delivery.status != SENDING:  # an existing one is someone else's
            return delivery, created, None
        has_row = any(value is not None for value in secrets.values())
        claimed = ClaimedDelivery(
            delivery, EndpointSecrets(**secrets) if has_row else None, new.body
        )
        return delivery, created, claimed

    async def claim_due(self, *, limit: int, lease_seconds: float) -> list[WebhookDelivery]:
        """Claim up to ``limit`` due deliveries for one attempt each, for ``lease_seconds``.

        A delivery waits while an earlier delivery of the same job and endpoint is
        unsettled, so one job's events reach the receiver in order.
        """
        sweep = await self.claim_for_sending(limit=limit, lease_seconds=lease_seconds)
        return [c.delivery for c in sweep.claimed]

    async def claim_for_sending(self, *, limit: int, lease_seconds: float) -> Sweep:
        """``claim_due``, with the secrets each delivery's endpoint signs with."""
        statement = sql.CLAIM
        async with raw_connection(self.engine) as conn:
            rows = await conn.fetch(
                statement.sql, *statement.args(limit=limit, lease=lease_seconds)
            )
        if rows[0]["id"] is None:
            due_in = rows[0]["due_in"]
            return Sweep([], max(0.0, due_in) if due_in is not None else None)
        claimed = []
        for row in rows:
            fields = dict(row)
            del fields["due_in"]
            secrets = {name: fields.pop(name) for name in sql.SECRET_COLUMNS}
            has_row = any(value is not None for value in secrets.values())
            claimed.append(
                ClaimedDelivery(
                    WebhookDelivery(**fields), EndpointSecrets(**secrets) if has_row else None
                )
            )
        return Sweep(claimed)

    async def record_attempt(
        self,
        delivery: WebhookDelivery,
        outcome: AttemptOutcome,
        *,
        status: str,
        retry_in: float | None,
    ) -> bool:
        """Log the attempt ``delivery.attempt_count`` and settle the delivery as ``status``
        (``pending`` again after ``retry_in`` seconds, ``succeeded`` or ``failed``).

        Returns False, logging nothing, when the lease was lost to another sender.
        """
        settlement = await self.settle(delivery, outcome, status=status, retry_in=retry_in)
        return settlement.recorded

    async def settle(
        self,
        delivery: WebhookDelivery,
        outcome: AttemptOutcome,
        *,
        status: str,
        retry_in: float | None,
        health: Health | None = None,
    ) -> Settlement:
        """``record_attempt``, counting the attempt for or against the endpoint's health in
        the same statement: a success ends a failure run, a failure extends it."""
        error = _clean(outcome.error, 1000)
        # Sent together with concurrent settlements: under load many attempts end at once.
        row = await sql.SETTLE.fetchrow_batched(
            self.engine,
            id=delivery.id,
            attempt=delivery.attempt_count,
            status=status,
            code=outcome.status_code,
            error=error,
            retry_in=float(retry_in or 0.0),
            trigger=delivery.trigger,
            attempt_url=outcome.url,
            latency_ms=outcome.latency_ms,
            excerpt=_clean(outcome.response_excerpt, EXCERPT_LIMIT),
            tenant=delivery.tenant,
            url=delivery.url,
            health=health or "none",
        )
        endpoint = None
        if row["tenant"] is not None:
            endpoint = WebhookEndpoint(**{k: v for k, v in row.items() if k != "recorded"})
        return Settlement(row["recorded"], endpoint)

    async def release(self, delivery: WebhookDelivery) -> None:
        """Hand a claimed delivery back unsent (shutdown): due now, attempt not counted."""
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now(),"
                    " attempt_count = attempt_count - 1, updated_at = now()"
                    " WHERE id = :id AND status = 'sending' AND attempt_count = :attempt"
                ),
                {"id": delivery.id, "attempt": delivery.attempt_count},
            )

    async def get(self, delivery_id: UUID) -> WebhookDelivery | None:
        """One delivery, or None."""
        async with self.engine.connect() as conn:
            return await self._get(conn, delivery_id)

    async def history(self, delivery_id: UUID) -> DeliveryHistory | None:
        """One delivery with its attempts, or None."""
        async with self.engine.connect() as conn:
            delivery = await self._get(conn, delivery_id)
            if delivery is None:
                return None
            return DeliveryHistory(delivery, await self._attempts(conn, [delivery.id]))

    async def list_for_job(self, job_id: UUID) -> list[DeliveryHistory]:
        """A job's deliveries (oldest first), each with its attempts."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE job_id = :job_id"
                    " ORDER BY occurred_at, created_at, id"
                ),
                {"job_id": job_id},
            )
            deliveries = [WebhookDelivery(**dict(row._mapping)) for row in rows]
            attempts = await self._attempts(conn, [d.id for d in deliveries])
        return [
            DeliveryHistory(d, [a for a in attempts if a.delivery_id == d.id]) for d in deliveries
        ]

    async def redeliver(
        self, delivery_id: UUID, *, trigger: str = "manual"
    ) -> WebhookDelivery | None:
        """Queue one more attempt now (unless one is in flight); None if not found or in flight."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now(),"
                        " trigger = :trigger, updated_at = now()"
                        " WHERE id = :id AND status <> 'sending'"
                        f" RETURNING {DELIVERY_COLUMNS}"
                    ),
                    {"id": delivery_id, "trigger": trigger},
                )
            ).first()
        return WebhookDelivery(**dict(row._mapping)) if row else None

    async def recover(
        self, *, since: datetime, cap: int, dry_run: bool, tenant: str | None = None
    ) -> tuple[int, list[UUID]]:
        """Re-queue failed deliveries created since ``since`` (at most ``cap``, oldest first).

        Returns how many match in all and the ids re-queued (would be, on a dry run).
        """
        where = "status = 'failed' AND created_at >= :since"
        params: dict[str, Any] = {"since": since, "cap": cap}
        if tenant is not None:
            where += " AND tenant = :tenant"
            params["tenant"] = tenant
        async with self.engine.begin() as conn:
            total = (
                await conn.execute(
                    text(f"SELECT count(*) FROM webhook_deliveries WHERE {where}"), params
                )
            ).scalar_one()
            select = (
                f"SELECT id FROM webhook_deliveries WHERE {where}"
                " ORDER BY created_at, id LIMIT :cap"
            )
            if dry_run:
                ids = [row[0] for row in await conn.execute(text(select), params)]
            else:
                rows = await conn.execute(
                    text(
                        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now(),"
                        " trigger = 'recover', updated_at = now()"
                        f" WHERE id IN ({select} FOR UPDATE SKIP LOCKED) RETURNING id"
                    ),
                    params,
                )
                ids = [row[0] for row in rows]
        return int(total), ids

    async def endpoint(self, tenant: str, url: str) -> WebhookEndpoint | None:
        """The endpoint's health and secrets, or None if nothing was ever sent to it."""
        async with self.engine.connect() as conn:
            return await self._select_endpoint(conn, tenant, url)

    async def disable_endpoint(self, tenant: str, url: str, reason: str) -> int:
        """Disable an endpoint and hold its unsent deliveries; return how many were held."""
        async with self.engine.begin() as conn:
            await self._insert_endpoint(conn, tenant, url)
            await conn.execute(
                text(
                    "UPDATE webhook_endpoints SET status = 'disabled', disabled_at = now(),"
                    " disabled_reason = :reason, updated_at = now()"
                    " WHERE tenant = :tenant AND url = :url"
                ),
                {"tenant": tenant, "url": url, "reason": reason},
            )
        return await self.hold_pending(tenant, url)

    async def hold_pending(self, tenant: str, url: str) -> int:
        """Hold an endpoint's scheduled deliveries (it is disabled); return how many."""
        async with self.engine.begin() as conn:
            held = await conn.execute(
                text(
                    "UPDATE webhook_deliveries SET status = 'held', next_attempt_at = NULL,"
                    " updated_at = now() WHERE tenant = :tenant AND url = :url"
                    " AND status = 'pending' AND trigger = 'schedule'"
                ),
                {"tenant": tenant, "url": url},
            )
        return int(held.rowcount)

    async def enable_endpoint(self, tenant: str, url: str, *, recover_held: bool = True) -> int:
        """Re-enable an endpoint; optionally resume its held deliveries. Returns how many."""
        async with self.engine.begin() as conn:
            await self._insert_endpoint(conn, tenant, url)
            await conn.execute(
                text(
                    "UPDATE webhook_endpoints SET status = 'enabled', disabled_at = NULL,"
                    " disabled_reason = NULL, consecutive_failures = 0, failing_since = NULL,"
                    " updated_at = now() WHERE tenant = :tenant AND url = :url"
                ),
                {"tenant": tenant, "url": url},
            )
            if not recover_held:
                return 0
            resumed = await conn.execute(
                text(
                    "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now(),"
                    " updated_at = now() WHERE tenant = :tenant AND url = :url AND status = 'held'"
                ),
                {"tenant": tenant, "url": url},
            )
        return int(resumed.rowcount)

    async def set_endpoint_secret(
        self, tenant: str, url: str, secret: str, *, overlap: timedelta = timedelta(hours=24)
    ) -> None:
        """Give an endpoint a new secret; the old one keeps signing for ``overlap``."""
        async with self.engine.begin() as conn:
            await self._insert_endpoint(conn, tenant, url)
            await conn.execute(
                text(
                    "UPDATE webhook_endpoints SET previous_secret = secret,"
                    " previous_secret_expires_at = CASE WHEN secret IS NULL THEN NULL"
                    "   ELSE now() + make_interval(secs => :overlap) END,"
                    " secret = :secret, updated_at = now() WHERE tenant = :tenant AND url = :url"
                ),
                {
                    "tenant": tenant,
                    "url": url,
                    "secret": secret,
                    "overlap": overlap.total_seconds(),
                },
            )

    async def _get(self, conn: AsyncConnection, delivery_id: UUID) -> WebhookDelivery | None:
        row = (
            await conn.execute(
                text(f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = :id"),
                {"id": delivery_id},
            )
        ).first()
        return WebhookDelivery(**dict(row._mapping)) if row else None

    async def _attempts(self, conn: AsyncConnection, ids: Sequence[UUID]) -> list[WebhookAttempt]:
        if not ids:
            return []
        rows = await conn.execute(
            text(
                f"SELECT {ATTEMPT_COLUMNS} FROM webhook_attempts WHERE delivery_id = ANY(:ids)"
                " ORDER BY delivery_id, attempt, id"
            ),
            {"ids": list(ids)},
        )
        return [WebhookAttempt(**dict(row._mapping)) for row in rows]

    async def _insert_endpoint(self, conn: AsyncConnection, tenant: str, url: str) -> None:
        await conn.execute(
            text(
                "INSERT INTO webhook_endpoints (tenant, url) VALUES (:tenant, :url)"
                " ON CONFLICT (tenant, url) DO NOTHING"
            ),
            {"tenant": tenant, "url": url},
        )

    async def _select_endpoint(
        self, conn: AsyncConnection, tenant: str, url: str
    ) -> WebhookEndpoint | None:
        row = (
            await conn.execute(
                text(
                    f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints"
                    " WHERE tenant = :tenant AND url = :url"
                ),
                {"tenant": tenant, "url": url},
            )
        ).first()
        return WebhookEndpoint(**dict(row._mapping)) if row else None
