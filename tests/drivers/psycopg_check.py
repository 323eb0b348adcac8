"""psycopg 3 through pgmux: every statement prepared (prepare_threshold=0), in autocommit and
in transactions, and pipeline mode; many connections at once. Exits non-zero on any wrong
result or error. Usage: psycopg_check.py CONNINFO CLIENTS"""
import sys
import threading

import psycopg

DSN, CLIENTS = sys.argv[1], int(sys.argv[2])


def worker(i, errors):
    try:
        with psycopg.connect(DSN, prepare_threshold=0, autocommit=(i % 2 == 0)) as conn:
            for j in range(30):
                row = conn.execute("SELECT %s::int * 2, %s::text", (i * 100 + j, f"w{i}")).fetchone()
                assert row == ((i * 100 + j) * 2, f"w{i}"), row
                total = conn.execute("SELECT %s::int + %s::int", (j, i)).fetchone()[0]
                assert total == i + j, total
                if i % 2:
                    conn.commit()
            with conn.transaction():
                conn.execute("SELECT 1")
            with conn.pipeline():
                curs = [conn.execute("SELECT %s::int + 1000", (k,)) for k in range(20)]
            got = [c.fetchone()[0] for c in curs]
            assert got == [k + 1000 for k in range(20)], got
            if i % 2:
                conn.commit()
    except Exception as e:  # noqa: BLE001 - report every failure
        errors.append(f"client {i}: {e!r}")


errors = []
threads = [threading.Thread(target=worker, args=(i, errors)) for i in range(CLIENTS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    print("\n".join(errors[:10]))
    sys.exit(1)
print(f"psycopg {psycopg.__version__}: {CLIENTS} clients ok")
