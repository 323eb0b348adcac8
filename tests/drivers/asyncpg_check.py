"""asyncpg through pgmux in transaction mode, many connections at once so statements move
between servers. Each client, on a connection of its own, with a statement cache of 3 (so it
evicts and closes statements), the default (100) or none (unnamed statements), by client
number, runs:
  - more distinct texts than its cache holds, repeated;
  - prepare() of a statement with many parameters, fetched many times, its parameter and
    column descriptions;
  - executemany;
  - cursors inside a transaction (iterated with a small prefetch; fetchrow, forward, fetch);
  - copy_records_to_table, copy_to_table (CSV), copy_from_query, copy_from_table;
  - transactions at each isolation level, read-only, deferrable, nested (savepoints) with a
    rollback, and a failed one;
  - set_type_codec (json, jsonb), a custom enum and a composite type (asyncpg introspects
    pg_type through pgmux), arrays of them;
  - errors with their sqlstate (42601, 23505, 22012, 42P01), the connection usable after;
  - a query cut short by timeout= (asyncpg sends a CancelRequest), the connection usable after;
  - error paths: executemany failing in the middle (atomic: none of it kept), then one whose
    writes must reach the primary; a large copy_records_to_table refused early; a COPY whose
    source fails (asyncpg sends CopyFail); COPY TO and a read cut short by timeout= and by
    statement_timeout; a connection closed (terminate()) in the middle of a statement marked
    apg_abandoned, which tests/drivers.rs checks no server still runs.
A read-only transaction on a connection that has not written runs on a replica when reads are
split. Then an asyncpg pool shared by many tasks: its reset on release (`SELECT
pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`) must undo a session setting.
Every result is checked; exits non-zero on any wrong result or error. The tables py_apg_items
(c int, k int, v text, PRIMARY KEY (c, k)), py_apg_copy (c int, k int, t text) and py_apg_uniq
(id int PRIMARY KEY), the enum py_apg_mood ('sad', 'ok', 'happy') and the composite
py_apg_pair (a int, b text) exist, empty, on every server.
Usage: asyncpg_check.py HOST PORT USER PASSWORD DATABASE CLIENTS alone|split"""
import asyncio
import datetime
import decimal
import io
import json
import sys
import uuid

import asyncpg

HOST, PORT, USER, PASSWORD, DB, CLIENTS, TOPOLOGY = sys.argv[1:8]
CLIENTS = int(CLIENTS)
SPLIT = TOPOLOGY == "split"
CACHE_SIZES = [3, 100, 0]
# the check each client is in, told if the run outlives its deadline
STEP = {}


def connect(**kw):
    return asyncpg.connect(host=HOST, port=int(PORT), user=USER, password=PASSWORD, database=DB, **kw)


async def expect_error(conn, exc, sqlstate, query, *args):
    try:
        await conn.execute(query, *args) if not args else await conn.fetch(query, *args)
    except exc as e:
        assert e.sqlstate == sqlstate, (query, e.sqlstate, e)
    else:
        raise AssertionError(f"{query} did not fail")
    assert await conn.fetchval("SELECT 'after error'::text") == "after error"


async def check_cache(conn, i):
    for j in range(6):
        for q in range(8):
            row = await conn.fetchrow(f"SELECT $1::int * {q + 1} AS n, $2::text || '{q}' AS s", i * 100 + j, f"c{i}")
            assert (row["n"], row["s"]) == ((i * 100 + j) * (q + 1), f"c{i}{q}"), row
    # the same text with other argument types
    assert await conn.fetchval("SELECT $1::numeric + 1", decimal.Decimal("1.5")) == decimal.Decimal("2.5")
    assert await conn.fetchval("SELECT $1::float8 + 1", 1.5) == 2.5


async def check_prepare(conn, i):
    n = 40
    kinds = ["int4", "text", "int8", "numeric", "bool", "float8", "date", "uuid"]
    typs = [kinds[p % len(kinds)] for p in range(n)]
    stmt = await conn.prepare("SELECT " + ", ".join(f"${p + 1}::{t} AS c{p}" for p, t in enumerate(typs)))
    assert [p.name for p in stmt.get_parameters()] == typs, stmt.get_parameters()
    assert [a.name for a in stmt.get_attributes()] == [f"c{p}" for p in range(n)]

    def value(p, j):
        t = typs[p]
        return {
            "int4": p * j,
            "text": f"t{i}-{p}-{j}",
            "int8": 2**40 + p + j,
            "numeric": decimal.Decimal(p) / 7 + j,
            "bool": (p + j) % 2 == 0,
            "float8": p / 4 + j,
            "date": datetime.date(2020, 1, 1) + datetime.timedelta(days=p + j),
            "uuid": uuid.UUID(int=i * 10**6 + p * 1000 + j),
        }[t]

    for j in range(8):
        args = [value(p, j) for p in range(n)]
        row = await stmt.fetchrow(*args)
        assert list(row.values()) == args, (row, args)
    # a second statement object of its own, and fetch/fetchval of many rows
    series = await conn.prepare("SELECT g, g * $1::int FROM generate_series(1, $2::int) g")
    for j in range(5):
        rows = await series.fetch(i + 1, 100 + j)
        assert [tuple(r) for r in rows] == [(g, g * (i + 1)) for g in range(1, 101 + j)]
    assert await series.fetchval(3, 1, column=1) == 3


async def check_executemany(conn, i):
    await conn.executemany(
        "INSERT INTO py_apg_items (c, k, v) VALUES ($1, $2, $3)", [(i, k, f"v{k}") for k in range(50)]
    )
    await conn.executemany("UPDATE py_apg_items SET v = v || $1 WHERE c = $2 AND k = $3", [("!", i, k) for k in range(5)])
    row = await conn.fetchrow(
        "SELECT count(*) AS n, sum(k) AS s, count(*) FILTER (WHERE v LIKE '%!') AS bang FROM py_apg_items WHERE c = $1", i
    )
    assert tuple(row) == (50, sum(range(50)), 5), row


async def check_cursors(conn, i):
    async with conn.transaction():
        got = [r[0] async for r in conn.cursor("SELECT g FROM generate_series(1, $1::int) g", 500, prefetch=7)]
        assert got == list(range(1, 501)), got[:20]
        cur = await conn.cursor("SELECT k, v FROM py_apg_items WHERE c = $1 ORDER BY k", i)
        assert tuple(await cur.fetchrow()) == (0, "v0!")
        assert await cur.forward(10) == 10
        assert [tuple(r) for r in await cur.fetch(3)] == [(k, f"v{k}") for k in range(11, 14)]
        # another statement while the cursor is open, then back to the cursor
        assert await conn.fetchval("SELECT $1::int", i) == i
        assert (await cur.fetchrow())["k"] == 14
        # half read, left open: the transaction's end closes it
        half = conn.cursor("SELECT g FROM generate_series(1, 100000) g", prefetch=50)
        n = 0
        async for _ in half:
            n += 1
            if n == 120:
                break
    assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1


async def check_copy(conn, i):
    res = await conn.copy_records_to_table(
        "py_apg_copy", records=[(i, k, f"r{k}" if k % 5 else None) for k in range(300)], columns=["c", "k", "t"]
    )
    assert res == "COPY 300", res
    csv = "".join(f"{i},{k},csv {k}\n" for k in range(300, 350)).encode()
    res = await conn.copy_to_table("py_apg_copy", source=io.BytesIO(csv), columns=["c", "k", "t"], format="csv")
    assert res == "COPY 50", res
    out = io.BytesIO()
    res = await conn.copy_from_query(
        "SELECT k, t FROM py_apg_copy WHERE c = $1 ORDER BY k", i, output=out, format="csv"
    )
    assert res == "COPY 350", res
    lines = out.getvalue().decode().splitlines()
    assert lines[:6] == ["0,", "1,r1", "2,r2", "3,r3", "4,r4", "5,"], lines[:6]
    assert lines[-1] == "349,csv 349", lines[-1]
    chunks = []

    async def sink(data):
        chunks.append(data)

    res = await conn.copy_from_table("py_apg_copy", columns=["k"], output=sink, format="text")
    assert res.startswith("COPY "), res
    assert int(res.split()[1]) >= 350
    # a COPY that fails on a duplicate key, the connection usable after
    await conn.execute(f"INSERT INTO py_apg_uniq VALUES ({i * 1000 + 7})")
    try:
        await conn.copy_records_to_table("py_apg_uniq", records=[(i * 1000 + k,) for k in range(20)])
    except asyncpg.UniqueViolationError as e:
        assert e.sqlstate == "23505"
    else:
        raise AssertionError("the duplicate key went in")
    assert await conn.fetchval("SELECT count(*) FROM py_apg_uniq WHERE id / 1000 = $1", i) == 1


async def check_transactions(conn, i):
    for isolation in ("serializable", "repeatable_read", "read_committed"):
        for readonly in (False, True):
            async with conn.transaction(isolation=isolation, readonly=readonly):
                level = await conn.fetchval("SHOW transaction_isolation")
                assert level == isolation.replace("_", " "), (isolation, level)
                assert await conn.fetchval("SHOW transaction_read_only") == ("on" if readonly else "off")
                if not readonly:
                    await conn.execute(
                        "INSERT INTO py_apg_items VALUES ($1, $2, $3)", i, 1000 + len(isolation), isolation
                    )
    async with conn.transaction(isolation="serializable", readonly=True, deferrable=True):
        assert await conn.fetchval("SHOW transaction_deferrable") == "on"
    # nested: a savepoint rolled back, the outer transaction committed
    async with conn.transaction():
        await conn.execute("INSERT INTO py_apg_items VALUES ($1, 2000, 'outer')", i)
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO py_apg_items VALUES ($1, 2001, 'inner')", i)
                raise KeyError("roll the savepoint back")
        except KeyError:
            pass
        async with conn.transaction():
            await conn.execute("INSERT INTO py_apg_items VALUES ($1, 2002, 'inner kept')", i)
    # a failed transaction rolls back
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO py_apg_items VALUES ($1, 2003, 'lost')", i)
            await conn.execute("SELECT 1 / 0")
    except asyncpg.DivisionByZeroError:
        pass
    # one rolled back by hand
    tr = conn.transaction()
    await tr.start()
    await conn.execute("INSERT INTO py_apg_items VALUES ($1, 2004, 'rolled back')", i)
    await tr.rollback()
    rows = await conn.fetch("SELECT k, v FROM py_apg_items WHERE c = $1 AND k >= 1000 ORDER BY k", i)
    want = sorted((1000 + len(s), s) for s in ("serializable", "repeatable_read", "read_committed"))
    assert [tuple(r) for r in rows] == want + [(2000, "outer"), (2002, "inner kept")], rows


async def check_codecs(conn, i):
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        doc = {"client": i, "list": [1, "two", None], "nested": {"ok": True}}
        assert await conn.fetchval(f"SELECT $1::{typ}", doc) == doc
        assert await conn.fetchval(f"SELECT $1::{typ} -> 'list'", doc) == [1, "two", None]
    # a type asyncpg does not know: it reads pg_type through pgmux to decode it
    assert await conn.fetchval("SELECT $1::py_apg_mood", "happy") == "happy"
    assert await conn.fetchval("SELECT $1::py_apg_mood[]", ["sad", None, "ok"]) == ["sad", None, "ok"]
    pair = await conn.fetchval("SELECT $1::py_apg_pair", (i, f"p{i}"))
    assert tuple(pair) == (i, f"p{i}") and pair["b"] == f"p{i}", pair
    pairs = await conn.fetchval("SELECT ARRAY[ROW(1, 'a'), ROW(2, NULL)]::py_apg_pair[]")
    assert [tuple(p) for p in pairs] == [(1, "a"), (2, None)], pairs
    try:
        await conn.fetchval("SELECT $1::py_apg_mood", "angry")
    except asyncpg.InvalidTextRepresentationError as e:
        assert e.sqlstate == "22P02"
    else:
        raise AssertionError("an enum took a value it does not have")
    # builtin types both ways, NULLs among them
    values = [
        ("numeric", decimal.Decimal("-12345678901234567890.000000001")),
        ("timestamptz", datetime.datetime(2025, 3, 30, 1, 30, 15, 5, tzinfo=datetime.timezone.utc)),
        ("bytea", bytes(range(256))),
        ("int4[]", [1, None, i]),
        ("text[]", ["a b", None, '"q"']),
        ("uuid", uuid.UUID(int=i + 1)),
        ("interval", datetime.timedelta(days=1, microseconds=1)),
        ("text", None),
    ]
    row = await conn.fetchrow("SELECT " + ", ".join(f"${p + 1}::{t}" for p, (t, _) in enumerate(values)), *[v for _, v in values])
    assert list(row.values()) == [v for _, v in values], row


async def check_errors(conn, i):
    await expect_error(conn, asyncpg.PostgresSyntaxError, "42601", "SELEC 1")
    await expect_error(conn, asyncpg.DivisionByZeroError, "22012", "SELECT $1::int / 0", i)
    await conn.execute("INSERT INTO py_apg_uniq VALUES ($1)", i * 1000 + 900)
    await expect_error(conn, asyncpg.UniqueViolationError, "23505", "INSERT INTO py_apg_uniq VALUES ($1)", i * 1000 + 900)
    await expect_error(conn, asyncpg.UndefinedTableError, "42P01", "SELECT * FROM py_apg_no_such_table")
    # a prepared statement failing at execution, then running fine
    stmt = await conn.prepare("SELECT 10 / $1::int")
    for d in (5, 0, 2):
        try:
            assert await stmt.fetchval(d) == 10 // d
        except asyncpg.DivisionByZeroError:
            assert d == 0


async def check_timeout(conn, i):
    try:
        await conn.fetchval("SELECT pg_sleep(60)", timeout=0.5)
    except asyncio.TimeoutError:
        pass
    else:
        raise AssertionError("pg_sleep(60) returned")
    assert await conn.fetchval("SELECT $1::int * 5", i) == i * 5
    async with conn.transaction():
        assert await conn.fetchval("SELECT $1::text", "in a transaction") == "in a transaction"


async def check_error_paths(conn, i):
    k0 = 8000
    rows = [(i, k0 + k, "many") for k in range(50)]
    rows[25] = (i, k0 + 3, "dup")
    try:
        await conn.executemany("INSERT INTO py_apg_items (c, k, v) VALUES ($1, $2, $3)", rows)
    except asyncpg.UniqueViolationError:
        pass
    else:
        raise AssertionError("executemany took a duplicate")
    assert await conn.fetchval("SELECT count(*) FROM py_apg_items WHERE c = $1 AND k >= $2", i, k0) == 0
    await conn.executemany(
        "INSERT INTO py_apg_items (c, k, v) VALUES ($1, $2, $3)", [(i, k0 + k, "many") for k in range(5)]
    )
    assert await conn.fetchval("SELECT count(*) FROM py_apg_items WHERE c = $1 AND k >= $2", i, k0) == 5
    await conn.execute("DELETE FROM py_apg_items WHERE c = $1 AND k >= $2", i, k0)

    # a duplicate early in a large COPY: refused while asyncpg is still sending
    base = -(i * 100000 + 1)
    records = [(base - k,) for k in range(20000)]
    records[5] = (base - 3,)
    try:
        await conn.copy_records_to_table("py_apg_uniq", records=records)
    except asyncpg.UniqueViolationError:
        pass
    else:
        raise AssertionError("the duplicate key went in")

    # the source fails half way: asyncpg sends CopyFail
    async def source():
        for k in range(2000):
            yield f"{base - k}\n".encode()
        raise KeyError("client gives up")

    try:
        await conn.copy_to_table("py_apg_uniq", source=source())
    except (KeyError, asyncpg.QueryCanceledError):
        pass
    else:
        raise AssertionError("a COPY whose source failed went through")
    assert await conn.fetchval("SELECT count(*) FROM py_apg_uniq WHERE id <= $1 AND id > $2", base, base - 100000) == 0

    # timeout= and statement_timeout end a COPY TO and a read (a replica's when split)
    slow_copy = "SELECT g, pg_sleep(0.001) FROM generate_series(1, 100000) g"
    try:
        await conn.copy_from_query(slow_copy, output=io.BytesIO(), timeout=0.3)
    except asyncio.TimeoutError:
        pass
    else:
        raise AssertionError("a slow COPY TO outlived its timeout")
    assert await conn.fetchval("SELECT $1::int * 7", i) == i * 7
    await conn.execute("SET statement_timeout = '150ms'")
    for run in (lambda: conn.fetchval("SELECT pg_sleep(60)"), lambda: conn.copy_from_query(slow_copy, output=io.BytesIO())):
        try:
            await run()
        except asyncpg.QueryCanceledError:
            pass
        else:
            raise AssertionError("a statement outlived statement_timeout")
    await conn.execute("RESET statement_timeout")
    assert await conn.fetchval("SHOW statement_timeout") == "0"

    # a connection closed under a running statement: pgmux must cancel it and free the server
    for sql in ("SELECT pg_sleep(15) /* apg_abandoned */", "SELECT pg_sleep(15) /* pgmux:primary */ /* apg_abandoned */"):
        other = await connect()
        # without arguments, a simple Query: written as soon as the task first runs
        task = asyncio.ensure_future(other.execute(sql))
        await asyncio.sleep(0)
        other.terminate()
        try:
            await task
        except Exception:
            pass


async def check_read_only(i):
    """A read-only transaction on a connection that has not written: a replica when split."""
    conn = await connect()
    try:
        async with conn.transaction(readonly=True):
            assert await conn.fetchval("SELECT pg_is_in_recovery()") == SPLIT
            assert await conn.fetchval("SELECT count(*) >= 0 FROM py_apg_items")
    finally:
        await conn.close()


async def worker(i):
    cache = CACHE_SIZES[i % len(CACHE_SIZES)]
    conn = await connect(statement_cache_size=cache)
    try:
        checks = [check_cache, check_prepare, check_executemany, check_cursors, check_copy]
        checks += [check_transactions, check_codecs, check_errors, check_error_paths]
        # a quarter of the clients: each timeout holds one of the pool's few servers meanwhile
        if i % 4 == 0:
            checks.append(check_timeout)
        for check in checks:
            STEP[i] = check.__name__
            try:
                await check(conn, i)
            except Exception as e:
                raise AssertionError(f"{check.__name__} (statement_cache_size={cache}): {e!r}") from e
    finally:
        await conn.close()
    await check_read_only(i)


async def pool_task(pool, i):
    for j in range(5):
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT $1::int + $2::int", i, j) == i + j
            async with conn.transaction():
                await conn.execute("INSERT INTO py_apg_items VALUES ($1, $2, 'pooled')", i, 3000 + j)
        async with pool.acquire() as conn:
            # a setting left behind is undone by the pool's reset on release
            assert await conn.fetchval("SHOW statement_timeout") == "0"
            await conn.execute("SET statement_timeout = '1234s'")
            assert await conn.fetchval("SHOW statement_timeout") == "1234s"
    async with pool.acquire() as conn:
        n = await conn.fetchval("SELECT count(*) FROM py_apg_items WHERE c = $1 AND v = 'pooled' /* pgmux:primary */", i)
        assert n == 5, n


async def main():
    async def watchdog():
        await asyncio.sleep(140)
        print(f"still running after 140 s: {STEP}", flush=True)

    watch = asyncio.ensure_future(watchdog())
    results = await asyncio.gather(*(worker(i) for i in range(CLIENTS)), return_exceptions=True)
    watch.cancel()
    errors = [f"client {i}: {r!r}" for i, r in enumerate(results) if isinstance(r, BaseException)]
    if not errors:
        pool = await asyncpg.create_pool(
            host=HOST, port=int(PORT), user=USER, password=PASSWORD, database=DB, min_size=2, max_size=4
        )
        try:
            results = await asyncio.gather(*(pool_task(pool, i) for i in range(CLIENTS)), return_exceptions=True)
            errors = [f"pool task {i}: {r!r}" for i, r in enumerate(results) if isinstance(r, BaseException)]
        finally:
            await pool.close()
    if errors:
        print("\n".join(errors[:10]))
        sys.exit(1)
    print(f"asyncpg {asyncpg.__version__}: {CLIENTS} clients ok")


asyncio.run(main())
