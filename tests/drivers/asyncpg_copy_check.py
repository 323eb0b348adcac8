"""asyncpg's COPY helpers through pgmux in front of a primary with replicas: each prepares a
SELECT of the table (a read) before its COPY, which must still reach the primary. The table
asyncpg_copy (c int, r int, k int) exists, empty, on every server.
Usage: asyncpg_copy_check.py HOST PORT USER PASSWORD DATABASE CLIENTS"""
import asyncio
import sys

import asyncpg

HOST, PORT, USER, PASSWORD, DB, CLIENTS = sys.argv[1:7]


async def worker(i):
    conn = await asyncpg.connect(host=HOST, port=int(PORT), user=USER, password=PASSWORD, database=DB)
    try:
        for j in range(5):
            rows = [(i, j, k) for k in range(10)]
            res = await conn.copy_records_to_table("asyncpg_copy", records=rows, columns=["c", "r", "k"])
            assert res == "COPY 10", res
        # a read in between goes wherever reads go; the COPY after it still writes
        assert await conn.fetchval("SELECT $1::int", i) == i
        res = await conn.copy_records_to_table("asyncpg_copy", records=[(i, 99, 0)], columns=["c", "r", "k"])
        assert res == "COPY 1", res
        n = await conn.fetchval("SELECT count(*) FROM asyncpg_copy WHERE c = $1 /* pgmux:primary */", i)
        assert n == 51, n
    finally:
        await conn.close()


async def main():
    results = await asyncio.gather(*(worker(i) for i in range(int(CLIENTS))), return_exceptions=True)
    errors = [f"client {i}: {r!r}" for i, r in enumerate(results) if isinstance(r, BaseException)]
    if errors:
        print("\n".join(errors[:10]))
        sys.exit(1)
    print(f"asyncpg {asyncpg.__version__} COPY: {CLIENTS} clients ok")


asyncio.run(main())
