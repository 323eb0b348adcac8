"""asyncpg cancels in batches: cancellers cut short their `SELECT pg_sleep(0.02)` (a simple
Query, so it may wait in a batch with others) with a timeout of 5 to 30 ms, so asyncpg sends a
CancelRequest for each; bystanders run `SELECT 1` meanwhile. A bystander must never get a
cancel (57014): a cancel reaches only the query of the client that sent it, whatever ran
ahead of or behind that query in its batch. asyncpg closes a connection whose timed-out query
it could not settle in time; the canceller then connects again.
Usage: asyncpg_cancel_storm.py HOST PORT USER PASSWORD DATABASE SECONDS"""
import asyncio
import random
import sys
import time

import asyncpg

HOST, PORT, USER, PASSWORD, DB, SECONDS = sys.argv[1:7]
seen = {"bystander_queries": 0, "bystander_cancelled": 0, "cancels": 0}


async def connect():
    return await asyncpg.connect(
        host=HOST, port=int(PORT), user=USER, password=PASSWORD, database=DB, statement_cache_size=0
    )


async def canceller(end):
    conn = await connect()
    while time.monotonic() < end:
        try:
            await conn.execute("SELECT pg_sleep(0.02)", timeout=random.uniform(0.005, 0.03))
        except asyncio.TimeoutError:
            seen["cancels"] += 1
        except asyncpg.QueryCanceledError:
            pass
        except asyncpg.InterfaceError:
            conn = await connect()
    await conn.close()


async def bystander(end):
    conn = await connect()
    while time.monotonic() < end:
        try:
            await conn.execute("SELECT 1")
            seen["bystander_queries"] += 1
        except asyncpg.QueryCanceledError:
            seen["bystander_cancelled"] += 1
    await conn.close()


async def main():
    end = time.monotonic() + float(SECONDS)
    await asyncio.gather(*(canceller(end) for _ in range(8)), *(bystander(end) for _ in range(12)))
    print(seen)
    if seen["bystander_cancelled"] or not seen["cancels"] or not seen["bystander_queries"]:
        sys.exit(1)
    print("clients ok")


asyncio.run(main())
