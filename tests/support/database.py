"""Per-test PostgreSQL databases cloned from a migrated template (fast isolation)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from core.db.engine import asyncpg_url, create_engine, plain_url, start_embedded_postgres
from core.db.migrate import upgrade


def admin_url(tmp_root: Path) -> str:
    """``DATABASE_URL`` when set (CI and this machine), else an embedded server."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return plain_url(url)
    return plain_url(start_embedded_postgres(tmp_root / "embedded"))


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


class DatabaseFactory:
    """Creates migrated databases: the template once, then one clone per test."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.template = f"bp_tpl_{uuid.uuid4().hex[:10]}"
        self.created: list[str] = []

    async def _admin(self) -> asyncpg.Connection:
        return await asyncio.wait_for(
            asyncpg.connect(with_database(self.server_url, "postgres")), timeout=30
        )

    async def build_template(self) -> None:
        conn = await self._admin()
        try:
            await conn.execute(f'CREATE DATABASE "{self.template}"')
        finally:
            await conn.close()
        engine = create_engine(
            asyncpg_url(with_database(self.server_url, self.template)), pool_size=1
        )
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    async def create(self) -> str:
        name = f"bp_t_{uuid.uuid4().hex[:12]}"
        conn = await self._admin()
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        finally:
            await conn.close()
        self.created.append(name)
        return with_database(self.server_url, name)

    async def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1].split("?", 1)[0]
        conn = await self._admin()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    async def drop_all(self) -> None:
        conn = await self._admin()
        try:
            for name in [*self.created, self.template]:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def fresh_database(factory: DatabaseFactory) -> AsyncIterator[str]:
    url = await factory.create()
    try:
        yield url
    finally:
        await factory.drop(url)
