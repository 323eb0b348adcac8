"""psycopg 3's pipeline mode through pgmux in front of a primary with replicas: a read whose
result is fetched inside the pipeline, then a write in the same pipeline. The table
psycopg_rw (c int, n int) exists, empty, on every server.
Usage: psycopg_pipeline_rw.py CONNINFO CLIENTS"""
import sys
from concurrent.futures import ThreadPoolExecutor

import psycopg

CONNINFO, CLIENTS = sys.argv[1], int(sys.argv[2])


def worker(i):
    with psycopg.connect(CONNINFO, autocommit=True) as conn:
        for j in range(10):
            with conn.pipeline():
                cur = conn.execute("SELECT %s::int + 1", (j,))
                # fetched before the write is even sent
                assert cur.fetchone()[0] == j + 1
                cur = conn.execute(
                    "INSERT INTO psycopg_rw VALUES (%s, %s) RETURNING pg_is_in_recovery()", (i, j)
                )
                assert cur.fetchone()[0] is False, "the INSERT ran on a replica"
        n = conn.execute("SELECT count(*) FROM psycopg_rw WHERE c = %s /* pgmux:primary */", (i,)).fetchone()[0]
        assert n == 10, n


def main():
    with ThreadPoolExecutor(CLIENTS) as ex:
        futures = [ex.submit(worker, i) for i in range(CLIENTS)]
    errors = [f"client {i}: {f.exception()!r}" for i, f in enumerate(futures) if f.exception()]
    if errors:
        print("\n".join(errors[:10]))
        sys.exit(1)
    print(f"psycopg {psycopg.__version__} pipeline writes: {CLIENTS} clients ok")


main()
