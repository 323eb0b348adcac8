"""LISTEN/NOTIFY through a session-mode pgmux (in transaction mode LISTEN pins a client to its
server instead): asyncpg's add_listener and psycopg 3's notifies(), notifications sent by
another connection with NOTIFY and pg_notify, each delivered to its listener, in order, with
its payload. Usage: python_listen_check.py HOST PORT USER PASSWORD DATABASE LISTENERS"""
import asyncio
import sys
import threading

import asyncpg
import psycopg

HOST, PORT, USER, PASSWORD, DB, LISTENERS = sys.argv[1:7]
LISTENERS = int(LISTENERS)
DSN = f"host={HOST} port={PORT} user={USER} password={PASSWORD} dbname={DB}"
PAYLOADS = 5
# a deadline for notifications to arrive; never reached when all is well
DEADLINE = 60


async def asyncpg_listener(i, ready):
    conn = await asyncpg.connect(host=HOST, port=int(PORT), user=USER, password=PASSWORD, database=DB)
    try:
        got = asyncio.Queue()
        channel = f"py_apg_ch_{i}"

        def deliver(_conn, _pid, ch, payload):
            got.put_nowait((ch, payload))

        await conn.add_listener(channel, deliver)
        ready.release()
        received = [await asyncio.wait_for(got.get(), DEADLINE) for _ in range(PAYLOADS)]
        assert received == [(channel, f"m{i}-{k}") for k in range(PAYLOADS)], received
        await conn.remove_listener(channel, deliver)
        assert await conn.fetchval("SELECT $1::int", i) == i
    finally:
        await conn.close()


async def asyncpg_notifications():
    ready = asyncio.Semaphore(0)
    notifier = await asyncpg.connect(host=HOST, port=int(PORT), user=USER, password=PASSWORD, database=DB)
    try:
        tasks = [asyncio.create_task(asyncpg_listener(i, ready)) for i in range(LISTENERS)]
        for _ in range(LISTENERS):
            await asyncio.wait_for(ready.acquire(), DEADLINE)
        for k in range(PAYLOADS):
            for i in range(LISTENERS):
                if k % 2:
                    await notifier.execute(f"NOTIFY py_apg_ch_{i}, 'm{i}-{k}'")
                else:
                    await notifier.execute("SELECT pg_notify($1, $2)", f"py_apg_ch_{i}", f"m{i}-{k}")
        await asyncio.gather(*tasks)
    finally:
        await notifier.close()


def psycopg_notifications():
    errors = []
    listening = threading.Barrier(LISTENERS + 1, timeout=DEADLINE)

    def listener(i):
        try:
            with psycopg.connect(DSN, autocommit=True) as conn:
                conn.execute(f"LISTEN py_psy_ch_{i}")
                listening.wait()
                got = [(n.channel, n.payload) for n in conn.notifies(timeout=DEADLINE, stop_after=PAYLOADS)]
                assert got == [(f"py_psy_ch_{i}", f"p{i}-{k}") for k in range(PAYLOADS)], got
                assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        except Exception as e:  # noqa: BLE001 - report every failure
            errors.append(f"psycopg listener {i}: {e!r}")
            listening.abort()

    threads = [threading.Thread(target=listener, args=(i,)) for i in range(LISTENERS)]
    for t in threads:
        t.start()
    try:
        listening.wait()
        with psycopg.connect(DSN, autocommit=True) as conn:
            for k in range(PAYLOADS):
                for i in range(LISTENERS):
                    conn.execute("SELECT pg_notify(%s, %s)", (f"py_psy_ch_{i}", f"p{i}-{k}"))
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    return errors


def main():
    asyncio.run(asyncpg_notifications())
    errors = psycopg_notifications()
    if errors:
        print("\n".join(errors[:10]))
        sys.exit(1)
    print(f"asyncpg {asyncpg.__version__}, psycopg {psycopg.__version__} LISTEN/NOTIFY: {LISTENERS} clients ok")


main()
