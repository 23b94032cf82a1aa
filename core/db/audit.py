"""The audit log: operator actions (replay, cancel, redeliver, key changes) — who, when,
what, on what, from which key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


@dataclass(frozen=True)
class Actor:
    """Who did something: an API key of a tenant, the CLI, or blogpipe itself."""

    tenant: str
    name: str
    key_id: str | None = None

    @classmethod
    def api_key(cls, key_id: str, tenant: str) -> Actor:
        return cls(tenant=tenant, name=f"api-key:{key_id}", key_id=key_id)

    @classmethod
    def cli(cls, tenant: str) -> Actor:
        return cls(tenant=tenant, name="cli")

    @classmethod
    def system(cls, tenant: str) -> Actor:
        return cls(tenant=tenant, name="system")

    @classmethod
    def anonymous(cls, tenant: str = "default") -> Actor:
        """A caller of an API running with ``BLOGPIPE_AUTH=none``."""
        return cls(tenant=tenant, name="anonymous")


@dataclass(frozen=True)
class AuditEntry:
    """A row of ``audit_log``."""

    id: int
    occurred_at: datetime
    tenant: str
    actor: str
    key_id: str | None
    action: str
    target: str
    details: dict[str, Any]


_INSERT = text(
    "INSERT INTO audit_log (tenant, actor, key_id, action, target, details)"
    " VALUES (:tenant, :actor, :key_id, :action, :target, :details)"
)


async def record(
    conn_or_engine: AsyncConnection | AsyncEngine,
    actor: Actor,
    action: str,
    target: str,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Write one entry; inside the caller's transaction when given a connection."""
    params = {
        "tenant": actor.tenant,
        "actor": actor.name,
        "key_id": actor.key_id,
        "action": action,
        "target": target,
        "details": orjson.dumps(dict(details or {}), default=str).decode(),
    }
    if isinstance(conn_or_engine, AsyncConnection):
        await conn_or_engine.execute(_INSERT, params)
        return
    async with conn_or_engine.begin() as conn:
        await conn.execute(_INSERT, params)


async def entries(
    engine: AsyncEngine, *, tenant: str | None = None, limit: int = 100
) -> list[AuditEntry]:
    """The newest entries first."""
    query = "SELECT id, occurred_at, tenant, actor, key_id, action, target, details FROM audit_log"
    params: dict[str, Any] = {"limit": limit}
    if tenant is not None:
        query += " WHERE tenant = :tenant"
        params["tenant"] = tenant
    async with engine.connect() as conn:
        rows = await conn.execute(text(query + " ORDER BY id DESC LIMIT :limit"), params)
        return [AuditEntry(**dict(row._mapping)) for row in rows]
