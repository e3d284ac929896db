"""The API's connection pool: autocommit connections, so each notify_api call is one transaction and one round trip."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool


class Database:
    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 10, timeout: float = 5.0) -> None:
        self.pool = AsyncConnectionPool(
            url, min_size=min_size, max_size=max_size, timeout=timeout, open=False,
            kwargs={"autocommit": True, "application_name": "dispatcher-api"},
            check=AsyncConnectionPool.check_connection,
        )

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def one(self, query: Any, params: Any = None) -> tuple[Any, ...] | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchone()

    async def ping(self) -> bool:
        try:
            async with self.pool.connection(timeout=2.0) as conn:
                await conn.execute("select 1")
            return True
        except (psycopg.Error, Exception):
            return False
