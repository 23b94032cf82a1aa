"""Migrations produce exactly the schema the code declares."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import asyncpg
import orjson
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.engine import asyncpg_url, create_engine
from core.db.schema import metadata
from tests.support.database import DatabaseFactory, with_database
from tests.support.waiting import wait_for


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


async def test_a_progress_update_of_a_job_writes_no_index(engine: AsyncEngine) -> None:
    """Only status is indexed among the columns a stage hand-off changes, so those
    updates are HOT (heap-only) while the page has room (fillfactor 80)."""

    async def hot_updates() -> int:
        async with engine.connect() as connection:
            await connection.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
            return int(
                (
                    await connection.exec_driver_sql(
                        "SELECT pg_stat_get_tuples_hot_updated('jobs'::regclass)"
                    )
                ).scalar_one()
            )

    before = await hot_updates()
    async with engine.connect() as connection:
        job_id = (
            await connection.exec_driver_sql(
                "INSERT INTO jobs (id, tenant, status, request) VALUES"
                " (gen_random_uuid(), 'default', 'processing', '{}') RETURNING id"
            )
        ).scalar_one()
        await connection.commit()
        for step in range(1, 6):
            await connection.execute(
                text(
                    "UPDATE jobs SET progress_percentage = :pct, current_stage = 'draft',"
                    " updated_at = now() WHERE id = :id"
                ),
                {"pct": step * 10.0, "id": job_id},
            )
            await connection.commit()
        await connection.exec_driver_sql("SELECT pg_stat_force_next_flush()")
        await connection.commit()
        options = (
            await connection.exec_driver_sql(
                "SELECT reloptions FROM pg_class WHERE relname = 'jobs'"
            )
        ).scalar_one()
    assert options == ["fillfactor=80"]

    async def all_hot() -> bool:
        return await hot_updates() - before >= 5

    await wait_for(all_hot, timeout=20, message="five HOT updates of the job row")


async def test_the_run_time_estimate_reads_recent_completed_jobs_through_an_index(
    engine: AsyncEngine,
) -> None:
    from core.db.jobs import _ESTIMATE_QUERY

    async with engine.begin() as connection:
        # Steer the planner off the alternatives a tiny table would win with, so what is
        # checked is that the index can serve this very query.
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            await connection.exec_driver_sql(f"SET LOCAL {setting} = off")
        plan = "\n".join(
            row[0] for row in await connection.exec_driver_sql(f"EXPLAIN {_ESTIMATE_QUERY}")
        )
    assert "ix_jobs_completed_recent" in plan, plan


def test_head_revision_is_the_newest_migration() -> None:
    from alembic.script import ScriptDirectory

    from core.db.migrate import HEAD_REVISION, alembic_config

    assert ScriptDirectory.from_config(alembic_config()).get_heads() == [HEAD_REVISION]


async def _empty_database(database_factory: DatabaseFactory) -> AsyncEngine:
    name = f"bp_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncio.wait_for(
        asyncpg.connect(with_database(database_factory.server_url, "postgres")), 30
    )
    try:
        await asyncio.wait_for(admin.execute(f'CREATE DATABASE "{name}"'), 30)
    finally:
        await asyncio.wait_for(admin.close(), 30)
    database_factory.created.append(name)
    return create_engine(asyncpg_url(with_database(database_factory.server_url, name)), pool_size=1)


async def test_a_database_at_head_is_not_migrated_again_and_an_empty_one_is(
    engine: AsyncEngine, database_factory: DatabaseFactory
) -> None:
    from core.db.migrate import HEAD_REVISION, current_revision, upgrade_unless_current

    assert await asyncio.wait_for(current_revision(engine), 30) == HEAD_REVISION
    assert await asyncio.wait_for(upgrade_unless_current(engine), 30) is False

    empty = await _empty_database(database_factory)
    try:
        assert await asyncio.wait_for(current_revision(empty), 30) is None
        assert await asyncio.wait_for(upgrade_unless_current(empty), 60) is True
        assert await asyncio.wait_for(current_revision(empty), 30) == HEAD_REVISION
        async with empty.connect() as connection:
            tables = await connection.exec_driver_sql("SELECT to_regclass('jobs') IS NOT NULL")
            assert tables.scalar_one() is True
    finally:
        await empty.dispose()
        await database_factory.drop(empty.url.render_as_string(hide_password=False))


async def test_documents_survive_the_move_to_json_and_back(
    database_factory: DatabaseFactory,
) -> None:
    """0009 retypes results, outputs and payloads (jsonb -> json) keeping every value and
    the columns' lz4 compression, and its downgrade turns them back."""
    from core.db.migrate import downgrade, upgrade

    empty = await _empty_database(database_factory)

    async def documents() -> list[tuple[str, str, object]]:
        async with empty.connect() as connection:
            rows = await connection.exec_driver_sql(
                "SELECT 'result', pg_typeof(result)::text, result::jsonb FROM jobs"
                " UNION ALL SELECT 'output', pg_typeof(output)::text, output::jsonb FROM stage_runs"
                " UNION ALL SELECT 'payload', pg_typeof(payload)::text, payload::jsonb"
                " FROM webhook_deliveries ORDER BY 1"
            )
            return [tuple(row) for row in rows]

    result = {"title": "Gifts \u2014 for teens", "content": "x" * 5000, "n": [1, 2.5, None]}
    try:
        await asyncio.wait_for(upgrade(empty, "0008_broker_notify_available"), 60)
        job = "'00000000-0000-0000-0000-000000000001'"
        rows = (
            ("jobs (id, status, request, result)", f"{job}, 'completed', '{{}}'", result),
            (
                "stage_runs (job_id, stage, generation, attempt, status, output)",
                f"{job}, 'seo', 1, 1, 'succeeded'",
                result,
            ),
            (
                "webhook_deliveries (job_id, id, event_id, event_type, url, status, payload)",
                f"{job}, gen_random_uuid(), 'evt_1', 'job.completed', 'https://example.com/hook',"
                " 'succeeded'",
                {"data": result},
            ),
        )
        async with empty.begin() as connection:
            for table, values, document in rows:
                await connection.execute(
                    text(f"INSERT INTO {table} VALUES ({values}, CAST(:doc AS jsonb))"),
                    {"doc": orjson.dumps(document).decode()},
                )
        before = await asyncio.wait_for(documents(), 30)
        assert [kind for _, kind, _ in before] == ["jsonb"] * 3

        await asyncio.wait_for(upgrade(empty), 60)
        after = await asyncio.wait_for(documents(), 30)
        assert [kind for _, kind, _ in after] == ["json"] * 3
        assert [(name, value) for name, _, value in after] == [
            (name, value) for name, _, value in before
        ]
        await test_large_json_columns_use_lz4_when_the_server_has_it(empty)

        await asyncio.wait_for(downgrade(empty, "0008_broker_notify_available"), 60)
        back = await asyncio.wait_for(documents(), 30)
        assert back == before
        await test_large_json_columns_use_lz4_when_the_server_has_it(empty)
    finally:
        await empty.dispose()
        await database_factory.drop(empty.url.render_as_string(hide_password=False))


OPEN_RUNTIME = """
import asyncio, sys
from blogpipe.runtime import Runtime
from core.settings import Settings

async def main() -> None:
    runtime = await Runtime.open(Settings(database_url=sys.argv[1]), migrate=True)
    await runtime.close()
    print("alembic" in sys.modules)

asyncio.run(main())
"""


def test_a_process_starting_on_a_database_at_head_does_not_load_alembic(
    database_url: str,
) -> None:
    """alembic is about 11 MB of each ``blogpipe dev`` process that would never use it."""
    result = subprocess.run(
        [sys.executable, "-c", OPEN_RUNTIME, database_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
