"""The API's connection pool: autocommit connections, so each notify_api call is one transaction and one round trip."""

from __future__ import annotations

import select
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool


async def check_idle_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's check at checkout, with no round trip for a healthy connection.

    An idle connection has nothing to read unless the server has said goodbye (a restart sends FATAL and closes the
    socket; a crash closes it): only then is the connection checked for real (`check_connection` sends an empty
    query, which raises and makes the pool try another). Checking every checkout with a round trip cost each
    request a second round trip (12% of the API process's samples under load)."""
    try:
        readable = bool(select.select([conn.pgconn.socket], [], [], 0)[0])
    except (OSError, ValueError, psycopg.OperationalError):
        readable = True
    if readable or conn.broken:
        await AsyncConnectionPool.check_connection(conn)


class Database:
    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 10, timeout: float = 5.0) -> None:
        self.pool = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            kwargs={"autocommit": True, "application_name": "dispatcher-api"},
            check=check_idle_connection,
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
