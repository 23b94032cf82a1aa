"""Migrations produce exactly the schema the code declares."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.schema import metadata


async def test_migrations_match_models(engine: AsyncEngine) -> None:
    def diff(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    async with engine.connect() as connection:
        differences = await connection.run_sync(diff)
    assert differences == []


async def test_large_json_columns_use_lz4_when_the_server_has_it(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        available = (
            await connection.exec_driver_sql(
                "SELECT 'lz4' = ANY(enumvals) FROM pg_settings"
                " WHERE name = 'default_toast_compression'"
            )
        ).scalar()
        rows = (
            await connection.exec_driver_sql(
                "SELECT c.relname || '.' || a.attname, a.attcompression::text FROM pg_attribute a"
                " JOIN pg_class c ON c.oid = a.attrelid WHERE (c.relname, a.attname::text) IN"
                " (('jobs', 'request'), ('jobs', 'result'), ('stage_runs', 'output'),"
                " ('webhook_deliveries', 'payload'))"
            )
        ).all()
    assert len(rows) == 4
    expected = "l" if available else ""
    assert {column: method for column, method in rows} == {column: expected for column, _ in rows}
