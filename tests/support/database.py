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
        await self._drop(url.rsplit("/", 1)[1].split("?", 1)[0])

    async def drop_all(self) -> None:
        for name in [*self.created, self.template]:
            await self._drop(name)

    async def _drop(self, name: str, attempts: int = 3) -> None:
        # Fault tests terminate backends; an admin connection caught in that is retried
        # with a new one rather than failing the session's teardown.
        for attempt in range(1, attempts + 1):
            try:
                conn = await self._admin()
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    await conn.close()
                return
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                if attempt == attempts:
                    raise


async def fresh_database(factory: DatabaseFactory) -> AsyncIterator[str]:
    url = await factory.create()
    try:
        yield url
    finally:
        await factory.drop(url)
