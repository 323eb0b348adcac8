//! The pgmux-load binary against a real pgmux in front of the shared test PostgreSQL: a select
//! workload bounded by transactions, idle connections spread over two processes and two source
//! addresses, and errors reported by SQLSTATE when pgmux turns clients away.

mod common;

use common::{PgCluster, Pgmux};
use serde_json::Value;
use std::process::Command;
use std::sync::Mutex;

fn start(db: &str, general: &str) -> Pgmux {
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    Pgmux::start(&format!(
        "[pgmux]\nlisten_port = {{port}}\nauth_type = \"trust\"\npool_mode = \"transaction\"\n\
         {general}\n[[users]]\nname = \"postgres\"\n\
         [[databases]]\nname = \"{db}\"\nhost = \"127.0.0.1\"\nport = {}\n",
        pg.primary().port
    ))
}

/// pgmux-load against `px` with `args`, printing its summary as JSON.
fn load_command(px: &Pgmux, db: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgmux-load"));
    cmd.args(["--host", "127.0.0.1", "--port", &px.port.to_string()])
        .args(["-U", "postgres", "-d", db, "--json", "--quiet"])
        .args(if args.contains(&"-T") {
            &[][..]
        } else {
            &["--duration", "120"][..]
        })
        .args(args)
        .env_remove("PGPASSWORD");
    cmd
}

/// Runs pgmux-load against `px` with `args`; returns the JSON summary (its last stdout line)
/// after checking it exited successfully.
fn load(px: &Pgmux, db: &str, args: &[&str]) -> Value {
    load_exiting(px, db, args, 0)
}

/// As `load`, for a run whose exit status must be `status` (2: errors were counted).
fn load_exiting(px: &Pgmux, db: &str, args: &[&str], status: i32) -> Value {
    let out = load_command(px, db, args).output().expect("run pgmux-load");
    summary_of(args, &out, status)
}

fn summary_of(args: &[&str], out: &std::process::Output, status: i32) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(status),
        "pgmux-load exit status\n{stdout}\n{stderr}"
    );
    // the human summary, shown with --nocapture or when the test fails
    eprintln!("pgmux-load {}\n{stderr}", args.join(" "));
    let last = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no output\n{stderr}"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}\n{stderr}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count in {v}"))
}

/// pgbench's tables (scale 1) in `db`, created once per test binary. Tests that count server
/// connections or rows each have their own database, so concurrent tests do not add to them.
fn pgbench_tables(db: &str) {
    static DONE: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.iter().any(|d| d == db) {
        return;
    }
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    pg.pgbench_init(db);
    done.push(db.to_string());
}

fn history_rows(db: &str) -> u64 {
    let pg = PgCluster::shared();
    pg.psql(pg.primary(), db, "SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap()
}

#[test]
fn select_workload_through_pgmux_reports_every_transaction_and_the_server_peak() {
    let db = "loadselect";
    pgbench_tables(db);
    let px = start(db, "default_pool_size = 5");
    let pg = PgCluster::shared();
    let direct = pg.primary().conn_str("postgres", "postgres", None);

    for mode in ["extended", "simple"] {
        let s = load(
            &px,
            db,
            &[
                "-c",
                "50",
                "-w",
                "select",
                "--query-mode",
                mode,
                "-t",
                "40",
                "--direct",
                &direct,
                "--server-dbname",
                db,
            ],
        );
        assert_eq!(n(&s, "requested"), 50, "{s}");
        assert_eq!(n(&s, "attempted"), 50, "{s}");
        assert_eq!(n(&s, "made"), 50, "{s}");
        assert_eq!(n(&s, "failed"), 0, "{s}");
        assert_eq!(n(&s, "transactions"), 50 * 40, "{s}");
        assert_eq!(n(&s["latency_us"], "count"), 50 * 40, "{s}");
        assert_eq!(n(&s, "errors"), 0, "{s}");
        assert_eq!(s["errors_by_kind"], serde_json::json!({}), "{s}");
        let lat = &s["latency_us"];
        assert!(
            n(lat, "p50") <= n(lat, "p99") && n(lat, "p99") <= n(lat, "max"),
            "{s}"
        );
        // 50 clients shared at most the pool's 5 server connections, and the pool holds at
        // least one when the run ends.
        let peak = n(&s, "server_connections_peak");
        assert!((1..=5).contains(&peak), "{s}");
    }
}

#[test]
fn idle_connections_from_two_processes_and_two_source_addresses() {
    let db = "loadidle";
    let px = start(db, "");
    let admin = px.conn_str("postgres", "pgbouncer", None);
    let s = load(
        &px,
        db,
        &[
            "-c",
            "60",
            "--processes",
            "2",
            "--source-addrs",
            "127.0.0.2,127.0.0.3",
            "--hold",
            "0",
            // pgmux has no admin console yet: the tool must skip the count, not fail
            "--admin",
            &admin,
        ],
    );
    assert_eq!(n(&s, "processes"), 2, "{s}");
    assert_eq!(n(&s, "made"), 60, "{s}");
    assert_eq!(n(&s, "failed"), 0, "{s}");
    assert_eq!(n(&s, "errors"), 0, "{s}");
    // each process holds all of its share until every one of them is open
    assert_eq!(n(&s, "peak_open"), 60, "{s}");
    assert_eq!(n(&s, "transactions"), 0, "{s}");
    assert!(s["server_connections_peak"].is_null(), "{s}");
    let log = px.log();
    for source in ["127.0.0.2:", "127.0.0.3:"] {
        assert!(
            log.contains(source),
            "no client from {source} in the pgmux log"
        );
    }
}

#[test]
fn clients_turned_away_are_counted_by_sqlstate() {
    let db = "loadfull";
    let px = start(db, "max_client_conn = 10");
    let s = load_exiting(&px, db, &["-c", "20", "--hold", "0"], 2);
    assert_eq!(n(&s, "made"), 10, "{s}");
    assert_eq!(n(&s, "failed"), 10, "{s}");
    assert_eq!(n(&s, "errors"), 10, "{s}");
    assert_eq!(n(&s["errors_by_kind"]["53300"], "count"), 10, "{s}");
}

#[test]
fn tpcb_and_sql_file_workloads_commit_what_they_report() {
    let db = "loadtpcb";
    pgbench_tables(db);
    let px = start(db, "default_pool_size = 5");
    // Only this test uses the database, so the growth of pgbench_history is what the tool
    // committed.
    let mut rows = history_rows(db);
    for mode in ["extended", "simple"] {
        let s = load(
            &px,
            db,
            &["-c", "10", "-w", "tpcb", "--query-mode", mode, "-t", "10"],
        );
        assert_eq!(n(&s, "transactions"), 100, "{s}");
        assert_eq!(n(&s, "errors"), 0, "{s}");
        let now = history_rows(db);
        assert_eq!(
            now - rows,
            100,
            "{mode}: one history row per TPC-B transaction"
        );
        rows = now;
    }

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tx.sql");
    std::fs::write(
        &script,
        "BEGIN;\nINSERT INTO pgbench_history (tid, bid, aid, delta, mtime)\n  \
         VALUES (:tid, :bid, :aid, :delta, now());\nSELECT :aid::int + 0;\nCOMMIT;\n",
    )
    .unwrap();
    let s = load(
        &px,
        db,
        &["-c", "5", "--sql", script.to_str().unwrap(), "-t", "4"],
    );
    assert_eq!(n(&s, "transactions"), 20, "{s}");
    assert_eq!(n(&s, "errors"), 0, "{s}");
    assert_eq!(history_rows(db) - rows, 20);

    // a failing statement is counted under its SQLSTATE, and the connections go on: the
    // transaction it broke is rolled back, so the next one does not meet 25P02
    let bad = dir.path().join("bad.sql");
    std::fs::write(&bad, "BEGIN;\nSELECT 1 / (:aid - :aid);\nCOMMIT;\n").unwrap();
    let s = load_exiting(
        &px,
        db,
        &["-c", "2", "--sql", bad.to_str().unwrap(), "-t", "3"],
        2,
    );
    assert_eq!(n(&s, "transactions"), 0, "{s}");
    assert_eq!(n(&s, "errors"), 6, "{s}");
    assert_eq!(n(&s["errors_by_kind"]["22012"], "count"), 6, "{s}");
}

#[test]
fn statements_still_running_at_the_end_of_a_run_are_cancelled() {
    // straight to PostgreSQL, which (unlike pgmux) does not notice a client gone during
    // pg_sleep: only a cancel stops it
    let db = "loadcancel";
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("sleep.sql");
    std::fs::write(&script, "SELECT pg_sleep(300) AS pgmux_load_cancel_me;\n").unwrap();
    let args = ["-c", "2", "--sql", script.to_str().unwrap(), "-T", "1"];
    let out = Command::new(env!("CARGO_BIN_EXE_pgmux-load"))
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &pg.primary().port.to_string(),
        ])
        .args(["-U", "postgres", "-d", db, "--json", "--quiet"])
        .args(args)
        .env_remove("PGPASSWORD")
        .output()
        .expect("run pgmux-load");
    let s = summary_of(&args, &out, 0);
    // the cancelled statements are not errors of the run
    assert_eq!(n(&s, "errors"), 0, "{s}");
    let running = || -> u64 {
        pg.psql(
            pg.primary(),
            "postgres",
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query LIKE '%pgmux_load_cancel_me%' AND state = 'active' \
             AND pid <> pg_backend_pid()",
        )
        .parse()
        .unwrap()
    };
    common::wait_until(
        "the sleeps cancelled on the server",
        std::time::Duration::from_secs(30),
        || running() == 0,
    );
}

#[test]
fn ctrl_c_with_several_processes_still_prints_the_merged_summary() {
    let db = "loadctrlc";
    let px = start(db, "");
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let child = load_command(
        &px,
        db,
        &[
            "-c",
            "4",
            "--processes",
            "2",
            "--ready-file",
            ready.to_str().unwrap(),
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("run pgmux-load");
    common::wait_until(
        "every connection open",
        std::time::Duration::from_secs(60),
        || ready.exists(),
    );
    // SAFETY: kill(2) on the child this test started and has not reaped
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().expect("pgmux-load ends");
    let s = summary_of(&["--processes 2, interrupted"], &out, 0);
    assert_eq!(n(&s, "made"), 4, "{s}");
    assert_eq!(n(&s, "processes"), 2, "{s}");
}
