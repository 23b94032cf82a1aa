"""SQL with named parameters for asyncpg, which only knows ``$1, $2, …``.

Hot-path statements are written once at import with ``:name`` placeholders (``::`` casts
are left alone) and called with keyword arguments, so a statement of a dozen parameters
stays readable and a missing argument is a ``KeyError`` naming it, not a shifted ``$n``.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.raw import raw_connection

_PLACEHOLDER = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


class Statement:
    """One SQL statement: ``sql`` for asyncpg and ``args(**values)`` in ``$n`` order."""

    __slots__ = ("names", "sql")

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self.sql = _PLACEHOLDER.sub(number, sql)
        self.names = tuple(names)

    def args(self, **values: Any) -> list[Any]:
        extra = values.keys() - set(self.names)
        if extra:
            raise TypeError(f"unknown statement parameter(s): {', '.join(sorted(extra))}")
        return [values[name] for name in self.names]

    async def fetchrow(self, engine: AsyncEngine, **values: Any) -> Any:
        """Run on a hot-pool connection of ``engine`` (autocommit); the first row or None."""
        async with raw_connection(engine) as conn:
            return await conn.fetchrow(self.sql, *self.args(**values))

    async def execute(self, engine: AsyncEngine, **values: Any) -> None:
        """Run on a hot-pool connection of ``engine`` (autocommit) for its effect."""
        async with raw_connection(engine) as conn:
            await conn.execute(self.sql, *self.args(**values))
