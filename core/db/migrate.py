"""Apply Alembic migrations programmatically (``blogpipe migrate``, ``make run``, tests).

alembic itself (about 11 MB resident) loads only when a migration is to run: a process
starting on a database already at ``HEAD_REVISION`` reads one row and goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

HEAD_REVISION = "0009_documents_as_json"
"""The newest migration's revision (a test checks it is alembic's head)."""


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at our migrations folder."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the database at ``engine`` up to ``revision``."""
    await _migrate(engine, "upgrade", revision)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Take the database at ``engine`` back down to ``revision``."""
    await _migrate(engine, "downgrade", revision)


async def _migrate(engine: AsyncEngine, direction: str, revision: str) -> None:
    from alembic import command

    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        getattr(command, direction)(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(run)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None before the first migration."""
    async with engine.connect() as connection:
        try:
            row = (
                await connection.execute(text("SELECT version_num FROM alembic_version"))
            ).first()
        except ProgrammingError:  # no alembic_version table yet
            return None
    return str(row[0]) if row else None


async def upgrade_unless_current(engine: AsyncEngine) -> bool:
    """Migrate to head unless the database is there already; whether it migrated."""
    if await current_revision(engine) == HEAD_REVISION:
        return False
    await upgrade(engine)
    return True
