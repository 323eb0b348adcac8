//! The statement classifier runs on every statement a client sends: its cost on the statements
//! applications send most (short reads and writes, transaction control, an ORM-sized SELECT).
//! In transaction mode every simple Query also goes through one lexer pass for SHOW QUERIES'
//! fingerprint and the session-state scan: its cost on pgbench's TPC-B-like transaction.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgmux::router::classify;
use pgmux::router::normalize::fingerprint_and_effects;

/// pgbench's TPC-B-like transaction as its simple protocol sends it.
const TPCB: &[&str] = &[
    "BEGIN;",
    "UPDATE pgbench_accounts SET abalance = abalance + -2311 WHERE aid = 463221;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 463221;",
    "UPDATE pgbench_tellers SET tbalance = tbalance + -2311 WHERE tid = 37;",
    "UPDATE pgbench_branches SET bbalance = bbalance + -2311 WHERE bid = 4;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
     VALUES (37, 4, 463221, -2311, CURRENT_TIMESTAMP);",
    "END;",
];

const STATEMENTS: &[(&str, &str)] = &[
    ("select_pk", "SELECT * FROM users WHERE id = $1"),
    (
        "insert",
        "INSERT INTO events (user_id, kind, payload) VALUES ($1, $2, $3)",
    ),
    (
        "update",
        "UPDATE accounts SET balance = balance - $1 WHERE id = $2",
    ),
    ("begin", "BEGIN"),
    ("commit", "COMMIT"),
    ("begin_read_only", "BEGIN READ ONLY"),
    ("set", "SET statement_timeout = '5s'"),
    (
        "pgbench_select",
        "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;",
    ),
    (
        "orm_select",
        "SELECT \"users\".\"id\", \"users\".\"email\", \"users\".\"created_at\" FROM \"users\" \
         INNER JOIN \"memberships\" ON \"memberships\".\"user_id\" = \"users\".\"id\" \
         WHERE \"memberships\".\"org_id\" = $1 AND \"users\".\"deleted_at\" IS NULL \
         ORDER BY \"users\".\"created_at\" DESC LIMIT $2 OFFSET $3",
    ),
    (
        "cte_with_comment",
        "/* app:web controller:reports */ WITH recent AS (SELECT id, total FROM orders \
         WHERE created_at > now() - interval '1 day') SELECT count(*), sum(total) FROM recent",
    ),
    (
        "select_for_update",
        "SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
    ),
];

fn bench(c: &mut Criterion) {
    let write_functions = vec!["audit_log_insert".to_string()];
    let mut g = c.benchmark_group("classify");
    for (name, sql) in STATEMENTS {
        g.throughput(Throughput::Bytes(sql.len() as u64));
        g.bench_function(*name, |b| {
            b.iter(|| classify(black_box(sql), black_box(&write_functions)))
        });
    }
    g.finish();
    let bytes: usize = TPCB.iter().map(|s| s.len()).sum();
    let mut g = c.benchmark_group("lexer_pass");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("tpcb_transaction", |b| {
        b.iter(|| {
            for sql in TPCB {
                black_box(fingerprint_and_effects(black_box(sql)));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
