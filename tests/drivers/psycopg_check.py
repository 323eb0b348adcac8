"""psycopg 3 through pgmux in transaction mode, many connections at once so statements move
between servers. Each client, on a connection of its own, runs every check below, with
prepare_threshold 0 (every statement prepared), 5 (the default: prepared from the sixth run)
or None (never prepared), by client number; half the clients in autocommit:
  - statements repeated past the threshold, and more distinct texts than a small prepared_max,
    so psycopg deallocates (a protocol-level Close, or DEALLOCATE ALL after a ROLLBACK);
  - executemany (pipelined), with and without returning;
  - pipeline mode: a failing statement in the middle aborts the rest up to the next sync
    point, the statements after that point and the connection still work;
  - a server-side (named) cursor with itersize inside a transaction, half read then closed;
  - client-side binary cursors; many types both ways (numeric, timestamptz, bytea, arrays,
    json/jsonb, uuid, NULLs ...), text and binary;
  - COPY in (write_row, text and binary) and out (rows), a COPY that fails on a duplicate key,
    one the client aborts; the connection usable after each;
  - nested transactions (savepoints) with an inner rollback, an outer one, commit/rollback
    outside autocommit, autocommit switched on and off;
  - cancel() / cancel_safe() of a pg_sleep (57014), the connection usable after;
  - notices from RAISE NOTICE in a DO block;
  - errors with their sqlstate (42601, 23505, 22012), the connection usable after;
  - a read-only transaction (on a replica when reads are split);
  - error paths: a large COPY refused early (psycopg still sending), a COPY TO the client
    abandons half way (psycopg cancels it), statement_timeout ending a read and a COPY TO,
    a pipeline failing in the middle with writes in it (none of them kept), then a pipeline
    whose write must reach the primary, a failed transaction and a write after it.
Then AsyncConnections, all at once under asyncio.gather, and a psycopg_pool ConnectionPool
shared by many threads. Every result is checked; exits non-zero on any wrong result or error.
The tables py_psy_items (c int, k int, v text, PRIMARY KEY (c, k)), py_psy_copy (c int, k int,
t text, b bytea) and py_psy_uniq (id int PRIMARY KEY) exist, empty, on every server.
Usage: psycopg_check.py CONNINFO CLIENTS alone|split"""
import asyncio
import datetime
import decimal
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
import psycopg_pool
from psycopg import errors, sql
from psycopg.types.json import Json, Jsonb

DSN, CLIENTS, TOPOLOGY = sys.argv[1], int(sys.argv[2]), sys.argv[3]
SPLIT = TOPOLOGY == "split"
THRESHOLDS = [0, 5, None]
# a deadline for waits on a condition (a cancel taking effect); never reached when all is well
DEADLINE = 60


def expect_error(conn, sqlstate, stmt, params=None):
    """Runs stmt, which must fail with sqlstate; leaves conn ready for the next statement."""
    try:
        conn.execute(stmt, params)
    except psycopg.Error as e:
        assert e.sqlstate == sqlstate, f"{stmt}: {e.sqlstate} {e}"
        if not conn.autocommit:
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
            conn.rollback()
    else:
        raise AssertionError(f"{stmt} did not fail")
    assert conn.execute("SELECT 'after error'").fetchone() == ("after error",)


def end(conn):
    """Commits what a non-autocommit connection has open, so its server goes back."""
    if not conn.autocommit:
        conn.commit()


def check_prepared(conn, i):
    # ten texts, each run eight times: past the default threshold, and more than prepared_max
    conn.prepared_max = 4
    for j in range(8):
        for q in range(10):
            row = conn.execute(f"SELECT %s::int * {q + 1}, %s::text || '{q}'", (i * 1000 + j, f"c{i}")).fetchone()
            assert row == ((i * 1000 + j) * (q + 1), f"c{i}{q}"), row
        end(conn)
    # the same texts with other parameter types are other statements
    for j in range(6):
        assert conn.execute("SELECT %s + 1", (j,)).fetchone()[0] == j + 1
        assert conn.execute("SELECT %s + 1", (decimal.Decimal(j) / 2,)).fetchone()[0] == decimal.Decimal(j) / 2 + 1
        assert conn.execute("SELECT %s || 'x'", (str(j),)).fetchone()[0] == f"{j}x"
    end(conn)
    # a ROLLBACK executed as a statement makes psycopg drop every statement it prepared
    # (DEALLOCATE ALL); they are prepared again after it
    conn.execute("BEGIN" if conn.autocommit else "SELECT 1")
    conn.execute("ROLLBACK")
    for j in range(7):
        assert conn.execute("SELECT %s::int * 1, %s::text || '0'", (j, "r")).fetchone() == (j, "r0")
    end(conn)
    # an error in a prepared statement's execution, the statement still usable after
    for d in (2, 0, 4):
        if d == 0:
            expect_error(conn, "22012", "SELECT 100 / %s::int", (d,))
        else:
            assert conn.execute("SELECT 100 / %s::int", (d,)).fetchone()[0] == 100 // d
    end(conn)


def check_executemany(conn, i):
    base = 0
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO py_psy_items (c, k, v) VALUES (%s, %s, %s)",
            [(i, base + k, f"v{k}") for k in range(40)],
        )
        assert cur.rowcount == 40, cur.rowcount
        cur.executemany(
            "INSERT INTO py_psy_items (c, k, v) VALUES (%s, %s, %s) RETURNING k * 2, v",
            [(i, base + k, f"r{k}") for k in range(100, 120)],
            returning=True,
        )
        got = []
        while True:
            got.append(cur.fetchone())
            if not cur.nextset():
                break
        assert got == [(k * 2, f"r{k}") for k in range(100, 120)], got
        cur.executemany("UPDATE py_psy_items SET v = v || %s WHERE c = %s AND k = %s", [("!", i, k) for k in range(10)])
    end(conn)
    row = conn.execute(
        "SELECT count(*), sum(k), count(*) FILTER (WHERE v LIKE '%%!') FROM py_psy_items WHERE c = %s", (i,)
    ).fetchone()
    assert row == (60, sum(range(40)) + sum(range(100, 120)), 10), row
    end(conn)


def check_pipeline(conn, i):
    with conn.pipeline():
        curs = [conn.execute("SELECT %s::int + 1000, %s::text", (k, f"p{i}")) for k in range(20)]
    assert [c.fetchone() for c in curs] == [(k + 1000, f"p{i}") for k in range(20)]
    end(conn)

    # an error in the middle: the statements behind it, up to the sync point, are skipped;
    # those after the sync point run. psycopg raises the error at whichever call fetches it
    # (an execute or the sync), and PipelineAborted for the skipped statements after that.
    raised = []
    skipped = []
    with conn.pipeline() as p:
        before = conn.execute("SELECT %s::int", (i,))
        try:
            conn.execute("SELECT 1 / %s::int", (0,))
        except errors.DivisionByZero as e:
            raised.append(e)
        for k in range(3):
            try:
                skipped.append(conn.execute("SELECT %s::int + 1", (k,)))
            except errors.DivisionByZero as e:
                raised.append(e)
            except errors.PipelineAborted:
                pass
        try:
            p.sync()
        except errors.DivisionByZero as e:
            raised.append(e)
        except errors.PipelineAborted:
            # the error came earlier; the sync fetched the skipped statements' results
            pass
        assert len(raised) == 1, raised
        if not conn.autocommit:
            conn.rollback()
        after = conn.execute("SELECT %s::text", (f"after{i}",))
    assert before.fetchone() == (i,)
    for c in skipped:
        try:
            c.fetchone()
        except psycopg.ProgrammingError:
            pass
        else:
            raise AssertionError("a statement behind the failed one ran")
    assert after.fetchone() == (f"after{i}",)
    end(conn)

    # the error raised when the pipeline ends, the connection usable after
    try:
        with conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("SELEC 2")
            conn.execute("SELECT 3")
    except errors.SyntaxError:
        pass
    else:
        raise AssertionError("no syntax error from the pipeline")
    if not conn.autocommit:
        conn.rollback()
    assert conn.execute("SELECT %s::int * 2", (i,)).fetchone() == (i * 2,)
    end(conn)

    # writes and reads in one pipeline inside a transaction; a read fetched before the write
    # behind it is sent
    with conn.transaction():
        with conn.pipeline():
            cur = conn.execute("SELECT count(*) FROM py_psy_items WHERE c = %s", (i,))
            assert cur.fetchone() == (60,)
            conn.execute("DELETE FROM py_psy_items WHERE c = %s AND k >= 100", (i,))
            cur = conn.execute("SELECT count(*) FROM py_psy_items WHERE c = %s", (i,))
    assert cur.fetchone() == (40,)
    end(conn)


def check_named_cursor(conn, i):
    with conn.transaction():
        with conn.cursor(f"big_{i}") as cur:
            cur.itersize = 7
            cur.execute("SELECT g, %s::text FROM generate_series(1, 1000) g", (f"n{i}",))
            got = []
            for row in cur:
                got.append(row[0])
                if len(got) == 30:
                    break
            assert got == list(range(1, 31)), got
            # iterating fetched whole itersize chunks: 35 rows so far
            got = cur.fetchmany(5)
            assert got == [(g, f"n{i}") for g in range(36, 41)], got
            cur.scroll(100)
            got = cur.fetchone()
            assert got == (141, f"n{i}"), got
        # the cursor closed half read; the transaction goes on
        assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        # a second one of the same name, now the first is gone
        with conn.cursor(f"big_{i}", binary=True) as cur:
            cur.execute("SELECT k, v FROM py_psy_items WHERE c = %s ORDER BY k", (i,))
            assert [r[0] for r in cur.fetchall()] == list(range(40))
    end(conn)


def check_types(conn, i):
    values = [
        ("numeric", decimal.Decimal("12345678901234567890.123456789")),
        ("numeric", decimal.Decimal("-0.000001")),
        ("int8", -(2**62) + i),
        ("float8", 1.5e300),
        ("bool", True),
        ("text", f"héllo 'quoted' \\ {i}"),
        ("bytea", bytes(range(256)) * 3),
        ("date", datetime.date(2024, 2, 29)),
        ("timestamptz", datetime.datetime(2025, 3, 30, 1, 30, 15, 123456, tzinfo=datetime.timezone.utc)),
        ("timestamp", datetime.datetime(1999, 12, 31, 23, 59, 59)),
        ("interval", datetime.timedelta(days=3, seconds=7, microseconds=5)),
        ("uuid", uuid.UUID(int=i * 7919 + 1)),
        ("int4[]", [1, None, 3, i]),
        ("text[]", ["a", None, "c d", '"q"']),
        ("jsonb", Jsonb({"a": [1, 2, {"b": None}], "i": i})),
        ("json", Json(["x", 1.5, True])),
    ]
    for binary in (False, True):
        with conn.cursor(binary=binary) as cur:
            for typ, v in values:
                cur.execute(f"SELECT %s::{typ}, NULL::{typ}", (v,))
                got, null = cur.fetchone()
                want = v.obj if isinstance(v, (Json, Jsonb)) else v
                assert got == want, (binary, typ, got, want)
                assert null is None
            # all at once, and a row of NULLs
            cur.execute(
                "SELECT " + ", ".join(f"%s::{typ}" for typ, _ in values),
                [v for _, v in values],
            )
            row = cur.fetchone()
            assert list(row) == [v.obj if isinstance(v, (Json, Jsonb)) else v for _, v in values], row
            cur.execute("SELECT " + ", ".join(f"%s::{typ}" for typ, _ in values), [None] * len(values))
            assert cur.fetchone() == (None,) * len(values)
            # a timestamptz comes back in the session's time zone
            cur.execute("SELECT '2025-01-01 12:00:00+00'::timestamptz")
            ts = cur.fetchone()[0]
            assert ts == datetime.datetime(2025, 1, 1, 12, tzinfo=datetime.timezone.utc), ts
    end(conn)


def check_copy(conn, i):
    with conn.cursor() as cur:
        with cur.copy("COPY py_psy_copy (c, k, t, b) FROM STDIN") as copy:
            for k in range(200):
                copy.write_row((i, k, f"t\t{k}\n" if k % 7 else None, bytes([k % 256, 0, 92])))
        assert cur.rowcount == 200, cur.rowcount
        with cur.copy("COPY py_psy_copy (c, k, t, b) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "int4", "text", "bytea"])
            for k in range(200, 300):
                copy.write_row((i, k, f"bin{k}", b"\x00\xff"))
        end(conn)
        with cur.copy(
            sql.SQL("COPY (SELECT k, t, b FROM py_psy_copy WHERE c = {} ORDER BY k) TO STDOUT").format(i)
        ) as copy:
            copy.set_types(["int4", "text", "bytea"])
            rows = list(copy.rows())
        assert len(rows) == 300, len(rows)
        for k, t, b in rows[:200]:
            assert t == (f"t\t{k}\n" if k % 7 else None), (k, t)
            assert b == bytes([k % 256, 0, 92]), (k, b)
        assert rows[250] == (250, "bin250", b"\x00\xff"), rows[250]
        with cur.copy(
            sql.SQL("COPY (SELECT k FROM py_psy_copy WHERE c = {} AND k < 5 ORDER BY k) TO STDOUT (FORMAT BINARY)").format(i)
        ) as copy:
            copy.set_types(["int4"])
            assert list(copy.rows()) == [(k,) for k in range(5)]
        end(conn)

        # a COPY the server refuses part way: a duplicate key
        cur.execute("INSERT INTO py_psy_uniq VALUES (%s)", (i * 1000 + 500,))
        end(conn)
        try:
            with cur.copy("COPY py_psy_uniq (id) FROM STDIN") as copy:
                for k in range(1000):
                    copy.write_row((i * 1000 + k,))
        except errors.UniqueViolation:
            pass
        else:
            raise AssertionError("the duplicate key went in")
        if not conn.autocommit:
            conn.rollback()
        # a COPY the client abandons (CopyFail)
        try:
            with cur.copy("COPY py_psy_uniq (id) FROM STDIN") as copy:
                copy.write_row((i * 1000 + 1,))
                raise KeyError("client gives up")
        except KeyError:
            pass
        if not conn.autocommit:
            conn.rollback()
        assert conn.execute("SELECT count(*) FROM py_psy_uniq WHERE id / 1000 = %s", (i,)).fetchone() == (1,)
    end(conn)


def check_transactions(conn, i):
    k0 = 1000
    with conn.transaction():
        conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'outer')", (i, k0))
        with conn.transaction():
            conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'kept')", (i, k0 + 1))
        try:
            with conn.transaction():
                conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'undone')", (i, k0 + 2))
                conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'dup')", (i, k0))
        except errors.UniqueViolation:
            pass
        with conn.transaction() as tx:
            conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'rolled back')", (i, k0 + 3))
            raise psycopg.Rollback(tx)
    with conn.transaction() as outer:
        conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'outer rolled back')", (i, k0 + 4))
        with conn.transaction():
            conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'inner of it')", (i, k0 + 5))
        raise psycopg.Rollback(outer)
    got = conn.execute("SELECT k, v FROM py_psy_items WHERE c = %s AND k >= %s ORDER BY k", (i, k0)).fetchall()
    assert got == [(k0, "outer"), (k0 + 1, "kept")], got
    end(conn)

    # commit and rollback outside autocommit; then autocommit switched on and off again
    was = conn.autocommit
    conn.autocommit = False
    conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'never')", (i, k0 + 10))
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    conn.rollback()
    conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'committed')", (i, k0 + 11))
    conn.commit()
    conn.autocommit = True
    conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'autocommitted')", (i, k0 + 12))
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    conn.autocommit = False
    got = conn.execute("SELECT k FROM py_psy_items WHERE c = %s AND k >= %s ORDER BY k", (i, k0 + 10)).fetchall()
    assert got == [(k0 + 11,), (k0 + 12,)], got
    conn.rollback()
    conn.autocommit = was


def check_cancel(conn, i):
    done = threading.Event()
    outcome = []

    def sleeper():
        try:
            conn.execute("SELECT pg_sleep(60)")
            outcome.append("finished")
        except psycopg.Error as e:
            outcome.append(e)
        finally:
            done.set()

    t = threading.Thread(target=sleeper)
    t.start()
    deadline = DEADLINE
    # the sleep may not have been sent yet: cancel again until it has ended
    while not done.wait(0.2):
        if i % 2:
            conn.cancel_safe()
        else:
            conn.cancel()
        deadline -= 0.2
        assert deadline > 0, "the cancel did not end the pg_sleep"
    t.join()
    assert isinstance(outcome[0], errors.QueryCanceled), outcome
    assert outcome[0].sqlstate == "57014"
    if not conn.autocommit:
        conn.rollback()
    assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
    end(conn)


def check_notices(conn, i):
    got = []
    conn.add_notice_handler(lambda d: got.append((d.severity, d.message_primary)))
    conn.execute(f"DO $$BEGIN RAISE NOTICE 'hello %', {i}; RAISE WARNING 'careful'; END$$")
    assert got == [("NOTICE", f"hello {i}"), ("WARNING", "careful")], got
    end(conn)


def check_errors(conn, i):
    expect_error(conn, "42601", "SELEC 1")
    expect_error(conn, "22012", "SELECT %s::int / 0", (i,))
    conn.execute("INSERT INTO py_psy_uniq VALUES (%s)", (i * 1000 + 900,))
    end(conn)
    expect_error(conn, "23505", "INSERT INTO py_psy_uniq VALUES (%s)", (i * 1000 + 900,))
    expect_error(conn, "42P01", "SELECT * FROM py_psy_no_such_table")
    # inside a transaction: the transaction fails, the connection does not
    try:
        with conn.transaction():
            conn.execute("SELECT 1")
            conn.execute("SELECT 1 / 0")
    except errors.DivisionByZero:
        pass
    assert conn.execute("SELECT %s::text", ("still fine",)).fetchone() == ("still fine",)
    end(conn)


def check_error_paths(conn, i):
    # a duplicate early in a large COPY: the server refuses it while psycopg still sends
    base = -(i * 100000 + 1)
    try:
        with conn.cursor() as cur:
            with cur.copy("COPY py_psy_uniq (id) FROM STDIN") as copy:
                for k in range(20000):
                    copy.write_row((base - (3 if k == 5 else k),))
    except errors.UniqueViolation:
        pass
    else:
        raise AssertionError("the duplicate key went in")
    if not conn.autocommit:
        conn.rollback()
    assert conn.execute("SELECT count(*) FROM py_psy_uniq WHERE id <= %s AND id > %s", (base, base - 100000)).fetchone() == (0,)
    end(conn)

    # COPY TO abandoned half way: psycopg sends a cancel and reads what is left
    got = 0
    try:
        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT g FROM generate_series(1, 3000000) g) TO STDOUT") as copy:
                for _ in copy:
                    got += 1
                    if got == 50:
                        raise KeyError("client gives up")
    except KeyError:
        pass
    if not conn.autocommit:
        conn.rollback()
    assert conn.execute("SELECT %s::int + 3", (i,)).fetchone() == (i + 3,)
    end(conn)

    # statement_timeout ends a read (a replica's when reads are split) and a COPY TO
    conn.execute("SET statement_timeout = '150ms'")
    end(conn)
    for stmt in ("SELECT pg_sleep(60)", "COPY (SELECT g, pg_sleep(0.001) FROM generate_series(1, 100000) g) TO STDOUT"):
        try:
            with conn.cursor() as cur:
                if stmt.startswith("COPY"):
                    with cur.copy(stmt) as copy:
                        for _ in copy:
                            pass
                else:
                    cur.execute(stmt)
        except errors.QueryCanceled:
            pass
        else:
            raise AssertionError(f"{stmt} outlived statement_timeout")
        if not conn.autocommit:
            conn.rollback()
    conn.execute("RESET statement_timeout")
    end(conn)
    assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
    end(conn)

    # a pipeline failing in the middle, with writes before and after the failure: none kept
    k0 = 7000
    try:
        with conn.pipeline():
            conn.execute("SELECT count(*) FROM py_psy_items WHERE c = %s", (i,))
            conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'pipelined')", (i, k0))
            conn.execute("SELECT 1 / %s::int", (0,))
            conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'pipelined')", (i, k0 + 1))
    except (errors.DivisionByZero, errors.PipelineAborted):
        pass
    else:
        raise AssertionError("no error from the failing pipeline")
    if not conn.autocommit:
        conn.rollback()
    # a read first, fetched before the write behind it is sent: the write reaches the primary
    with conn.pipeline():
        cur = conn.execute("SELECT count(*) FROM py_psy_items WHERE c = %s AND k >= %s", (i, k0))
        assert cur.fetchone() == (0,), "a write of the failed pipeline was kept"
        cur = conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'pipelined') RETURNING pg_is_in_recovery()", (i, k0 + 2))
    assert cur.fetchone() == (False,), "the write ran on a replica"
    end(conn)

    # a failed transaction rolled back; a write after it goes to the primary, a read sees it
    try:
        with conn.transaction():
            conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'lost')", (i, k0 + 3))
            conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'dup')", (i, k0 + 2))
    except errors.UniqueViolation:
        pass
    assert conn.execute(
        "INSERT INTO py_psy_items VALUES (%s, %s, 'after') RETURNING pg_is_in_recovery()", (i, k0 + 4)
    ).fetchone() == (False,)
    end(conn)
    got = conn.execute("SELECT k FROM py_psy_items WHERE c = %s AND k >= %s ORDER BY k", (i, k0)).fetchall()
    assert got == [(k0 + 2,), (k0 + 4,)], got
    conn.execute("DELETE FROM py_psy_items WHERE c = %s AND k >= %s", (i, k0))
    end(conn)


def check_read_only(i):
    """A read-only transaction on a connection that has not written: a replica when split."""
    with psycopg.connect(DSN) as conn:
        conn.read_only = True
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (SPLIT,)
        assert conn.execute("SELECT count(*) >= 0 FROM py_psy_items").fetchone() == (True,)
        conn.commit()


def worker(i):
    threshold = THRESHOLDS[i % len(THRESHOLDS)]
    autocommit = i % 2 == 0
    with psycopg.connect(DSN, prepare_threshold=threshold, autocommit=autocommit) as conn:
        assert conn.prepare_threshold == threshold
        for check in (
            check_prepared,
            check_executemany,
            check_pipeline,
            check_named_cursor,
            check_types,
            check_copy,
            check_transactions,
            check_notices,
            check_errors,
            check_error_paths,
        ):
            try:
                check(conn, i)
            except Exception as e:
                raise AssertionError(f"{check.__name__} (prepare_threshold={threshold}, autocommit={autocommit}): {e!r}") from e
        # a quarter of the clients: each cancel holds one of the pool's few servers meanwhile
        if i % 4 == 0:
            check_cancel(conn, i)
    check_read_only(i)


async def async_worker(i):
    async with await psycopg.AsyncConnection.connect(DSN, prepare_threshold=i % 2, autocommit=True) as conn:
        for j in range(10):
            cur = await conn.execute("SELECT %s::int * 3, %s::text", (i * 100 + j, f"a{i}"))
            assert await cur.fetchone() == ((i * 100 + j) * 3, f"a{i}")
        async with conn.pipeline():
            curs = [await conn.execute("SELECT %s::int - 1", (k,)) for k in range(10)]
        assert [await c.fetchone() for c in curs] == [(k - 1,) for k in range(10)]
        async with conn.transaction():
            await conn.execute("INSERT INTO py_psy_items VALUES (%s, 5000, 'async')", (i,))
            async with conn.cursor(f"acur{i}") as cur:
                await cur.execute("SELECT g FROM generate_series(1, 100) g")
                assert await cur.fetchmany(10) == [(g,) for g in range(1, 11)]
        try:
            await conn.execute("SELECT 1 / 0")
        except errors.DivisionByZero:
            pass
        cur = await conn.execute("SELECT v FROM py_psy_items WHERE c = %s AND k = 5000", (i,))
        assert await cur.fetchone() == ("async",)


def pool_worker(pool, i):
    for j in range(10):
        with pool.connection() as conn:
            assert conn.execute("SELECT %s::int + %s::int", (i, j)).fetchone() == (i + j,)
            with conn.transaction():
                conn.execute("INSERT INTO py_psy_items VALUES (%s, %s, 'pooled')", (i, 6000 + j))
        with pool.connection() as conn:
            # a connection handed back inside a failed transaction is rolled back by the pool
            try:
                conn.execute("SELECT 1 / 0")
            except errors.DivisionByZero:
                pass
    with pool.connection() as conn:
        # written through other connections of the pool: read where they wrote
        n = conn.execute("SELECT count(*) FROM py_psy_items WHERE c = %s AND v = 'pooled' /* pgmux:primary */", (i,)).fetchone()[0]
        assert n == 10, n


def run_all(fn, args):
    with ThreadPoolExecutor(len(args)) as ex:
        futures = [ex.submit(fn, *a) for a in args]
    errs = [f"client {i}: {f.exception()!r}" for i, f in enumerate(futures) if f.exception()]
    return errs


def main():
    errs = run_all(worker, [(i,) for i in range(CLIENTS)])
    if not errs:

        async def gather():
            results = await asyncio.gather(*(async_worker(i) for i in range(CLIENTS)), return_exceptions=True)
            return [f"async client {i}: {r!r}" for i, r in enumerate(results) if isinstance(r, BaseException)]

        errs = asyncio.run(gather())
    if not errs:
        with psycopg_pool.ConnectionPool(DSN, min_size=2, max_size=5, open=True, kwargs={"prepare_threshold": 1}) as pool:
            pool.wait(timeout=DEADLINE)
            errs = run_all(pool_worker, [(pool, i) for i in range(CLIENTS)])
            pool.check()
    if errs:
        print("\n".join(errs[:10]))
        sys.exit(1)
    print(f"psycopg {psycopg.__version__} (libpq {psycopg.pq.version()}), psycopg_pool {psycopg_pool.__version__}: {CLIENTS} clients ok")


if __name__ == "__main__":
    main()
