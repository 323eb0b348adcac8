"""asyncpg through pgmux with its statement cache on (named prepared statements for every
query), explicit prepared statements and transactions; many connections at once.
Usage: asyncpg_check.py HOST PORT USER PASSWORD DATABASE CLIENTS"""
import asyncio
import sys

import asyncpg

HOST, PORT, USER, PASSWORD, DB, CLIENTS = sys.argv[1:7]


async def worker(i):
    conn = await asyncpg.connect(host=HOST, port=int(PORT), user=USER, password=PASSWORD, database=DB)
    try:
        for j in range(30):
            v = await conn.fetchval("SELECT $1::int * 3", i * 100 + j)
            assert v == (i * 100 + j) * 3, v
            row = await conn.fetchrow("SELECT $1::text || $2::text AS s, $3::int8 AS n", "a", str(j), j)
            assert row["s"] == f"a{j}" and row["n"] == j, row
        stmt = await conn.prepare("SELECT $1::int + 1")
        for j in range(10):
            assert await stmt.fetchval(j) == j + 1
        async with conn.transaction():
            assert await conn.fetchval("SELECT $1::int", 7) == 7
    finally:
        await conn.close()


async def main():
    results = await asyncio.gather(*(worker(i) for i in range(int(CLIENTS))), return_exceptions=True)
    errors = [f"client {i}: {r!r}" for i, r in enumerate(results) if isinstance(r, BaseException)]
    if errors:
        print("\n".join(errors[:10]))
        sys.exit(1)
    print(f"asyncpg {asyncpg.__version__}: {CLIENTS} clients ok")


asyncio.run(main())
