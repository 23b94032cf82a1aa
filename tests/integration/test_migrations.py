"""Migrations produce exactly the schema the code declares."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.schema import metadata
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
