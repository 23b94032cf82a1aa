"""API keys: random, shown once, stored as a SHA-256 hash, bound to a tenant and scopes.

Keys carry 32 random bytes, so a plain SHA-256 is enough to store them (no password
stretching needed): nobody can brute-force 256 bits from the hash, and a lookup by hash
costs one indexed query.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.db import audit
from core.errors import BlogpipeError

KEY_PREFIX = "bp_live_"
SCOPE_JOBS_WRITE = "jobs:write"
SCOPE_JOBS_READ = "jobs:read"
SCOPE_OPERATOR = "operator"
SCOPES: tuple[str, ...] = (SCOPE_JOBS_WRITE, SCOPE_JOBS_READ, SCOPE_OPERATOR)

# bp_live_ + 43 urlsafe base64 characters (32 bytes); anything else is not one of ours.
_KEY_SHAPE = re.compile(rf"^{KEY_PREFIX}[A-Za-z0-9_-]{{43}}$")
_TENANT_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DISPLAY_CHARS = len(KEY_PREFIX) + 4

# ``last_used_at`` is written at most once a minute per key, so authentication stays a read.
_LAST_USED_EVERY = timedelta(seconds=60)
_COLUMNS = "id, tenant, name, prefix, scopes, created_at, revoked_at, last_used_at"


class ApiKeyError(BlogpipeError):
    """A key cannot be created as asked (bad tenant or scope)."""


@dataclass(frozen=True)
class ApiKey:
    """A stored key, without the key itself (only its hash is kept)."""

    id: str
    tenant: str
    name: str | None
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "prefix": self.prefix,
            "scopes": list(self.scopes),
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
        }

    @classmethod
    def from_row(cls, row: Any) -> ApiKey:
        data = dict(row._mapping)
        data["scopes"] = tuple(data["scopes"])
        return cls(**data)


def generate_key() -> str:
    """A new secret key: ``bp_live_`` and 32 random bytes, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(value: str) -> bool:
    """True when ``value`` has the shape of a key we issue (no database needed)."""
    return bool(_KEY_SHAPE.match(value))


def validate_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Known scopes, de-duplicated in canonical order; ApiKeyError names an unknown one."""
    wanted = set(scopes)
    unknown = sorted(wanted - set(SCOPES))
    if unknown:
        raise ApiKeyError(f"Unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}")
    if not wanted:
        raise ApiKeyError(f"A key needs at least one scope: {', '.join(SCOPES)}")
    return tuple(scope for scope in SCOPES if scope in wanted)


def validate_tenant(tenant: str) -> str:
    if not _TENANT_SHAPE.match(tenant):
        raise ApiKeyError(
            "A tenant is 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return tenant


class ApiKeyRepository:
    """Creates, lists, revokes and authenticates keys."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(
        self,
        tenant: str,
        scopes: Iterable[str],
        *,
        name: str | None = None,
        actor: audit.Actor | None = None,
    ) -> tuple[ApiKey, str]:
        """Store a new key; returns it with the secret, which is never available again."""
        tenant = validate_tenant(tenant)
        canonical = validate_scopes(scopes)
        secret = generate_key()
        key_id = "key_" + secrets.token_hex(8)
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "INSERT INTO api_keys (id, tenant, name, prefix, key_hash, scopes)"
                        " VALUES (:id, :tenant, :name, :prefix, :hash, :scopes)"
                        f" RETURNING {_COLUMNS}"
                    ),
                    {
                        "id": key_id,
                        "tenant": tenant,
                        "name": name,
                        "prefix": secret[:_DISPLAY_CHARS],
                        "hash": hash_key(secret),
                        "scopes": orjson.dumps(list(canonical)).decode(),
                    },
                )
            ).one()
            key = ApiKey.from_row(row)
            await audit.record(
                conn,
                actor or audit.Actor.system(tenant),
                "api_key.created",
                key.id,
                {"tenant": tenant, "scopes": list(canonical), "name": name},
            )
        return key, secret

    async def list(self, *, tenant: str | None = None) -> list[ApiKey]:
        """Every key (revoked ones too), oldest first."""
        query = f"SELECT {_COLUMNS} FROM api_keys"
        params: dict[str, Any] = {}
        if tenant is not None:
            query += " WHERE tenant = :tenant"
            params["tenant"] = tenant
        async with self.engine.connect() as conn:
            rows = await conn.execute(text(query + " ORDER BY created_at, id"), params)
            return [ApiKey.from_row(row) for row in rows]

    async def get(self, key_id: str) -> ApiKey | None:
        async with self.engine.connect() as conn:
            return await self._get(conn, key_id)

    async def revoke(self, key_id: str, *, actor: audit.Actor | None = None) -> ApiKey | None:
        """Revoke a key (idempotent); None if there is no such key."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
                        f" WHERE id = :id RETURNING {_COLUMNS}"
                    ),
                    {"id": key_id},
                )
            ).first()
            if row is None:
                return None
            key = ApiKey.from_row(row)
            await audit.record(
                conn,
                actor or audit.Actor.system(key.tenant),
                "api_key.revoked",
                key.id,
                {"tenant": key.tenant},
            )
        return key

    async def authenticate(self, secret: str) -> ApiKey | None:
        """The active key whose secret this is, or None (unknown, revoked or malformed)."""
        if not looks_like_key(secret):
            return None
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        f"SELECT {_COLUMNS} FROM api_keys"
                        " WHERE key_hash = :hash AND revoked_at IS NULL"
                    ),
                    {"hash": hash_key(secret)},
                )
            ).first()
            if row is None:
                return None
            key = ApiKey.from_row(row)
            if key.last_used_at is None or _stale(key.last_used_at):
                await conn.execute(
                    text(
                        "UPDATE api_keys SET last_used_at = now() WHERE id = :id AND"
                        " (last_used_at IS NULL OR last_used_at < now() - interval '60 seconds')"
                    ),
                    {"id": key.id},
                )
                await conn.commit()
        return key

    async def _get(self, conn: AsyncConnection, key_id: str) -> ApiKey | None:
        row = (
            await conn.execute(
                text(f"SELECT {_COLUMNS} FROM api_keys WHERE id = :id"), {"id": key_id}
            )
        ).first()
        return ApiKey.from_row(row) if row else None


def _stale(last_used_at: datetime) -> bool:
    return datetime.now(UTC) - last_used_at > _LAST_USED_EVERY
