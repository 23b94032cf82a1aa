"""Shared fixtures: a migrated database per test, and the emulators (see tests/support)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.engine import asyncpg_url, create_engine
from tests.support.database import DatabaseFactory, admin_url

pytest_plugins = [
    "tests.support.pubsub_emulator",
    "tests.support.cloudtasks_emulator",
    "tests.support.receiver",
]


@pytest.fixture(scope="session")
async def database_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[DatabaseFactory]:
    factory = DatabaseFactory(admin_url(tmp_path_factory.mktemp("pg")))
    await factory.build_template()
    yield factory
    await factory.drop_all()


@pytest.fixture
async def database_url(database_factory: DatabaseFactory) -> AsyncIterator[str]:
    """A fresh, migrated database for this test (asyncpg-dialect URL)."""
    url = await database_factory.create()
    yield asyncpg_url(url)
    await database_factory.drop(url)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, pool_size=5)
    yield engine
    await engine.dispose()
