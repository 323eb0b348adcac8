//! Observability and operations against real PostgreSQL: /metrics scraped over HTTP around a
//! pgbench run, the admin console (psql and tokio-postgres), PAUSE/RESUME, KILL, RECONNECT,
//! SET, and live reload (RELOAD and SIGHUP, valid and invalid).

mod common;

use common::probe::{http_get, metric, scrape};
use common::{free_port, raw, wait_until, wait_until_async, PgCluster, Pgmux};
use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    px: Pgmux,
    metrics_port: u16,
}

fn config(db: &str, metrics_port: u16, general: &str, extra: &str) -> String {
    let pg = PgCluster::shared();
    format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
metrics_listen_port = {metrics_port}
admin_users = ["admin"]
stats_users = ["watcher"]
{general}
[[users]]
name = "app"
password = "secret"
[[users]]
name = "postgres"
[[users]]
name = "admin"
[[users]]
name = "watcher"
[[databases]]
name = "{db}"
host = "127.0.0.1"
port = {}
{extra}
"#,
        pg.primary().port
    )
}

/// A pgmux with database `db` (created on the shared cluster) and its metrics endpoint.
fn start(db: &str, general: &str, extra: &str) -> Setup {
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    let metrics_port = free_port();
    let px = Pgmux::start(&config(db, metrics_port, general, extra));
    Setup { px, metrics_port }
}

async fn connect(px: &Pgmux, user: &str, db: &str) -> Result<Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(&px.conn_str(user, db, Some("secret")), NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

async fn console(px: &Pgmux) -> Client {
    connect(px, "admin", "pgmux").await.expect("console login")
}

/// Rows of a console command as column -> value maps.
async fn rows(c: &Client, sql: &str) -> Vec<HashMap<String, Option<String>>> {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| (col.name().to_string(), r.get(i).map(str::to_string)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// One pool's row of SHOW POOLS, as numbers where they are numbers.
async fn pool_row(c: &Client, db: &str, user: &str) -> HashMap<String, String> {
    rows(c, "SHOW POOLS")
        .await
        .into_iter()
        .find(|r| r["database"].as_deref() == Some(db) && r["user"].as_deref() == Some(user))
        .map(|r| {
            r.into_iter()
                .map(|(k, v)| (k, v.unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

fn num(row: &HashMap<String, String>, col: &str) -> i64 {
    row.get(col)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {col} in {row:?}"))
}

fn server_conns(db: &str) -> i64 {
    let pg = PgCluster::shared();
    pg.psql(
        pg.primary(),
        "postgres",
        &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend'"),
    )
    .parse()
    .unwrap()
}

fn first(msgs: &[SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_moves_counters_and_gauges_agree_with_postgres_and_show_pools() {
    let db = "obsbench";
    let s = start(db, "pool_mode = \"transaction\"\ndefault_pool_size = 5", "");
    let l = [("database", db), ("user", "postgres")];
    let before = scrape(s.metrics_port);

    // exactly known work: 4 requests per transaction, 2 of them inside BEGIN..END
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("obs.sql");
    std::fs::write(&script, "BEGIN;\nSELECT 1;\nSELECT 2;\nEND;\n").unwrap();
    let (clients, per_client) = (8u32, 25u32);
    let out = std::process::Command::new("pgbench")
        .args(["-n", "-c", &clients.to_string(), "-j", "2", "-t"])
        .arg(per_client.to_string())
        .arg("-f")
        .arg(&script)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &s.px.port.to_string(),
            "-U",
            "postgres",
            db,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let xacts = f64::from(clients * per_client);
    // pgbench's Terminate messages may still be in flight when it exits: wait until pgmux
    // has seen every client leave, so the byte counters are final when compared below
    wait_until("pgbench's clients gone from pgmux", WAIT, || {
        let m = scrape(s.metrics_port);
        ["active", "idle", "waiting"].iter().all(|st| {
            metric(
                &m,
                "pgmux_clients",
                &[("database", db), ("user", "postgres"), ("state", st)],
            ) == 0.0
        })
    });
    let after = scrape(s.metrics_port);
    let delta = |name: &str| metric(&after, name, &l) - metric(&before, name, &l);
    assert_eq!(delta("pgmux_transactions_total"), xacts, "{after}");
    assert_eq!(delta("pgmux_queries_total"), 4.0 * xacts);
    assert_eq!(delta("pgmux_transaction_duration_seconds_count"), xacts);
    assert_eq!(delta("pgmux_query_duration_seconds_count"), 4.0 * xacts);
    // transaction mode: one server assignment per transaction
    assert_eq!(delta("pgmux_server_assignments_total"), xacts);
    assert_eq!(delta("pgmux_client_wait_seconds_count"), xacts);
    assert!(delta("pgmux_received_bytes_total") > 0.0);
    assert!(delta("pgmux_sent_bytes_total") > delta("pgmux_received_bytes_total"));
    assert!(metric(&after, "pgmux_server_connects_total", &l) <= 5.0);
    assert!(metric(&after, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(metric(&after, "process_open_fds", &[]) > 0.0);
    // the Grafana dashboard only charts metrics that exist
    let dashboard = include_str!("../deploy/grafana/pgmux.json");
    for (i, _) in dashboard
        .match_indices("pgmux_")
        .chain(dashboard.match_indices("process_"))
    {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let family = name.strip_suffix("_bucket").unwrap_or(&name);
        assert!(
            after.contains(&format!("# TYPE {family} ")),
            "dashboard uses {name}, not exported"
        );
    }

    // the console shows what /metrics exports
    let admin = console(&s.px).await;
    let stats = rows(&admin, &format!("SHOW STATS_TOTALS {db}")).await;
    assert_eq!(stats.len(), 1, "{stats:?}");
    let col = |c: &str| stats[0][c].as_deref().unwrap().parse::<f64>().unwrap();
    assert_eq!(
        col("xact_count"),
        metric(&after, "pgmux_transactions_total", &[("database", db)])
    );
    assert_eq!(
        col("query_count"),
        metric(&after, "pgmux_queries_total", &[("database", db)])
    );
    assert_eq!(
        col("bytes_received"),
        metric(&after, "pgmux_received_bytes_total", &[("database", db)])
    );

    // gauges: three clients, two of them inside a transaction (holding a server)
    let mut held = Vec::new();
    for _ in 0..2 {
        let c = connect(&s.px, "postgres", db).await.unwrap();
        c.simple_query("BEGIN; SELECT 1").await.unwrap();
        held.push(c);
    }
    let idle = connect(&s.px, "postgres", db).await.unwrap();
    idle.simple_query("SELECT 1").await.unwrap();
    let m = scrape(s.metrics_port);
    let state = |name: &str, st: &str| {
        metric(
            &m,
            name,
            &[("database", db), ("user", "postgres"), ("state", st)],
        )
    };
    assert_eq!(state("pgmux_clients", "active"), 2.0);
    assert_eq!(state("pgmux_clients", "idle"), 1.0);
    assert_eq!(state("pgmux_clients", "waiting"), 0.0);
    assert_eq!(state("pgmux_servers", "active"), 2.0);
    let pool = pool_row(&admin, db, "postgres").await;
    assert_eq!(num(&pool, "cl_active"), 3);
    assert_eq!(num(&pool, "cl_waiting"), 0);
    assert_eq!(num(&pool, "sv_active"), 2);
    assert_eq!(num(&pool, "sv_idle") as f64, state("pgmux_servers", "idle"));
    assert_eq!(num(&pool, "sv_login"), 0);
    // PostgreSQL sees exactly the connections pgmux counts (closed ones may take a moment
    // to leave pg_stat_activity)
    let open = num(&pool, "sv_active") + num(&pool, "sv_idle");
    wait_until("pg_stat_activity matches SHOW POOLS", WAIT, || {
        server_conns(db) == open
    });
    // SHOW CLIENTS lists the same three, two linked to the servers SHOW SERVERS lists
    let clients = rows(&admin, "SHOW CLIENTS").await;
    let mine: Vec<_> = clients
        .iter()
        .filter(|r| r["database"].as_deref() == Some(db))
        .collect();
    assert_eq!(mine.len(), 3, "{clients:?}");
    let linked: Vec<String> = mine
        .iter()
        .filter(|r| r["state"].as_deref() == Some("active"))
        .map(|r| r["link"].clone().unwrap())
        .collect();
    assert_eq!(linked.len(), 2);
    let servers = rows(&admin, "SHOW SERVERS").await;
    for link in &linked {
        let s = servers
            .iter()
            .find(|r| r["ptr"].as_ref() == Some(link))
            .unwrap_or_else(|| panic!("server {link} in {servers:?}"));
        assert_eq!(s["state"].as_deref(), Some("active"));
        let pid = s["remote_pid"].as_deref().unwrap();
        let pg = PgCluster::shared();
        assert_eq!(
            pg.psql(
                pg.primary(),
                "postgres",
                &format!("SELECT state FROM pg_stat_activity WHERE pid = {pid}")
            ),
            "idle in transaction"
        );
    }
    // server errors are counted by SQLSTATE class
    let err = idle
        .simple_query("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42P01");
    let m = scrape(s.metrics_port);
    assert_eq!(
        metric(
            &m,
            "pgmux_server_errors_total",
            &[("database", db), ("class", "42")]
        ),
        1.0
    );
    for c in &held {
        c.simple_query("COMMIT").await.unwrap();
    }
    wait_until("no server active after the commits", WAIT, || {
        let m = scrape(s.metrics_port);
        metric(
            &m,
            "pgmux_servers",
            &[("database", db), ("state", "active")],
        ) == 0.0
    });
}

#[test]
fn health_and_ready_follow_the_servers() {
    let db = "obsready";
    let ghost_port = free_port();
    let s = start(
        db,
        "",
        &format!("[[databases]]\nname = \"ghost\"\nhost = \"127.0.0.1\"\nport = {ghost_port}\n"),
    );
    assert_eq!(http_get(s.metrics_port, "/health"), (200, "ok\n".into()));
    let (status, body) = http_get(s.metrics_port, "/ready");
    assert_eq!(status, 503);
    assert!(body.contains(&ghost_port.to_string()), "{body}");
    assert_eq!(http_get(s.metrics_port, "/nope").0, 404);
    // without the unreachable database, pgmux is ready
    std::fs::write(
        &s.px.config_path,
        config(db, s.metrics_port, "", "").replace("{port}", &s.px.port.to_string()),
    )
    .unwrap();
    s.px.signal(libc::SIGHUP);
    wait_until("ready after reload", WAIT, || {
        http_get(s.metrics_port, "/ready").0 == 200
    });
}

fn psql(px: &Pgmux, user: &str, sql: &str) -> std::process::Output {
    std::process::Command::new("psql")
        .args(["-X", "-A", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args([
            "-p",
            &px.port.to_string(),
            "-U",
            user,
            "-d",
            "pgmux",
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql")
}

/// The type OID of `column` in a RowDescription body.
fn column_oid(desc: &[u8], column: &str) -> Option<i32> {
    let n = i16::from_be_bytes([desc[0], desc[1]]);
    let mut at = 2;
    for _ in 0..n {
        let end = at + desc[at..].iter().position(|&b| b == 0)?;
        let name = std::str::from_utf8(&desc[at..end]).ok()?;
        let oid = i32::from_be_bytes(desc[end + 7..end + 11].try_into().ok()?);
        if name == column {
            return Some(oid);
        }
        at = end + 19;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_every_console_command() {
    let db = "obspsql";
    let s = start(db, "", "");
    let c = connect(&s.px, "app", db).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    for (cmd, header) in [
        ("SHOW POOLS", "database|user|cl_active|cl_waiting|cl_active_cancel_req|cl_waiting_cancel_req|sv_active|sv_active_cancel|sv_being_canceled|sv_idle|sv_used|sv_tested|sv_login|maxwait|maxwait_us|pool_mode|load_balance_hosts"),
        ("SHOW STATS", "database|total_server_assignment_count|total_xact_count|total_query_count|total_received|total_sent|total_xact_time|total_query_time|total_wait_time"),
        ("SHOW STATS_TOTALS", "database|server_assignment_count|xact_count|query_count|bytes_received|bytes_sent|xact_time|query_time|wait_time"),
        ("SHOW STATS_AVERAGES", "database|server_assignment_count|xact_count|query_count|bytes_received|bytes_sent|xact_time|query_time|wait_time"),
        ("SHOW CLIENTS", "type|user|database|replication|state|addr|port|local_addr|local_port|connect_time|request_time|wait|wait_us|close_needed|ptr|link|remote_pid|tls|application_name|prepared_statements|id"),
        ("SHOW SERVERS", "type|user|database|replication|state|addr|port|local_addr|local_port|connect_time|request_time|wait|wait_us|close_needed|ptr|link|remote_pid|tls|application_name|prepared_statements|id"),
        ("SHOW DATABASES", "name|host|port|database|force_user|pool_size|min_pool_size|reserve_pool_size|server_lifetime|pool_mode|load_balance_hosts|max_connections|current_connections|max_client_connections|current_client_connections|paused|disabled"),
        ("SHOW USERS", "name|pool_size|reserve_pool_size|pool_mode|max_user_connections|current_connections|max_user_client_connections|current_client_connections"),
        ("SHOW CONFIG", "key|value|default|changeable"),
        ("SHOW LISTS", "list|items"),
        ("SHOW VERSION", "version"),
        ("SHOW HOSTS", "host|port|role|health|lag_bytes|lag_seconds|banned"),
        ("SHOW STATE", "key|value"),
    ] {
        let out = psql(&s.px, "admin", cmd);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{cmd}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.starts_with(header),
            "{cmd} header:\n{stdout}\nexpected to start with {header}"
        );
    }
    // types as PgBouncer sends them: counters numeric, times text such as
    // `2026-11-26 18:19:17 UTC` (tools that read them typed depend on it)
    let (mut raw, _) = common::raw::login(s.px.port, "admin", "pgmux");
    for (cmd, column, oid) in [
        ("SHOW STATS", "total_xact_count", 1700),
        ("SHOW STATS_TOTALS", "xact_count", 1700),
        ("SHOW STATS_AVERAGES", "query_time", 1700),
        ("SHOW TOTALS", "value", 1700),
        ("SHOW CLIENTS", "connect_time", 25),
        ("SHOW SERVERS", "request_time", 25),
        ("SHOW POOLS", "cl_active", 23),
    ] {
        use std::io::Write;
        raw.write_all(&common::raw::query(cmd)).unwrap();
        let msgs = common::raw::until_ready(&mut raw);
        let desc = &msgs.iter().find(|(t, _)| *t == b'T').expect(cmd).1;
        assert_eq!(column_oid(desc, column), Some(oid), "{cmd} {column}");
    }
    let clients =
        String::from_utf8_lossy(&psql(&s.px, "admin", "SHOW CLIENTS").stdout).into_owned();
    assert!(clients.contains(" UTC|"), "{clients}");
    let pools = String::from_utf8_lossy(&psql(&s.px, "watcher", "SHOW POOLS").stdout).into_owned();
    assert!(pools.contains(&format!("{db}|app|1|0|")), "{pools}");
    let hosts = String::from_utf8_lossy(&psql(&s.px, "admin", "SHOW HOSTS").stdout).into_owned();
    assert!(hosts.contains("|primary|up|0|0|0|"), "{hosts}");
    let version =
        String::from_utf8_lossy(&psql(&s.px, "admin", "SHOW VERSION").stdout).into_owned();
    assert!(version.contains("pgmux"), "{version}");

    // control commands answer with their tag
    for cmd in [
        "RECONNECT",
        "RELOAD",
        "SET default_pool_size = 7",
        "PAUSE",
        "RESUME",
    ] {
        let out = psql(&s.px, "admin", cmd);
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // RELOAD re-read the file, then SET changed the running value
    let cfg = String::from_utf8_lossy(&psql(&s.px, "admin", "SHOW CONFIG").stdout).into_owned();
    assert!(cfg.contains("default_pool_size|7|20|yes"), "{cfg}");
    assert!(cfg.contains("listen_port|"), "{cfg}");

    // errors: unknown command, stats user's control command, non-console user
    for (cmd, error) in [
        ("FROB", "invalid command 'FROB'"),
        ("SHOW MEM", "invalid command 'SHOW MEM'"),
        ("SHOW POOLS extra", "invalid command 'SHOW POOLS extra'"),
        // a RESUME that resumes nothing, as PgBouncer refuses it
        ("RESUME", "pooler is not paused"),
        (&format!("RESUME {db}"), "is not paused"),
    ] {
        let out = psql(&s.px, "admin", cmd);
        assert!(!out.status.success(), "{cmd}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(error), "{cmd}: {stderr}");
    }
    let out = psql(&s.px, "watcher", "PAUSE");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin access needed"));
    let out = psql(&s.px, "app", "SHOW POOLS");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not allowed to use the admin console"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the `pgbouncer` alias
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            &s.px.port.to_string(),
        ])
        .args(["-U", "watcher", "-d", "pgbouncer", "-c", "SHOW LISTS"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("pools|1"));

    // the extended protocol is refused with an error, the session survives
    let admin = console(&s.px).await;
    let err = admin.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "0A000");
    assert_eq!(rows(&admin, "SHOW VERSION").await.len(), 1);
    // the application's client was never disturbed
    assert_eq!(
        first(&c.simple_query("SELECT 'still'").await.unwrap()),
        "still"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_and_resume_releases_them() {
    let db = "obspause";
    let s = start(db, "pool_mode = \"transaction\"\ndefault_pool_size = 2", "");
    let admin = console(&s.px).await;
    let busy = connect(&s.px, "app", db).await.unwrap();
    busy.simple_query("BEGIN; SELECT 1").await.unwrap();
    let later = connect(&s.px, "app", db).await.unwrap();
    later.simple_query("SELECT 1").await.unwrap();

    let pausing = {
        let px_admin = console(&s.px).await;
        tokio::spawn(async move { px_admin.simple_query("PAUSE").await.map(|_| ()) })
    };
    wait_until_async("database paused", WAIT, || async {
        rows(&admin, "SHOW DATABASES")
            .await
            .iter()
            .any(|r| r["name"].as_deref() == Some(db) && r["paused"].as_deref() == Some("1"))
    })
    .await;
    // the open transaction holds its server, so PAUSE cannot have finished
    assert!(!pausing.is_finished());
    assert_eq!(num(&pool_row(&admin, db, "app").await, "sv_active"), 1);

    // a new transaction waits
    let held = tokio::spawn(async move { later.simple_query("SELECT 'after resume'").await });
    wait_until_async("new transaction waiting", WAIT, || async {
        num(&pool_row(&admin, db, "app").await, "cl_waiting") == 1
    })
    .await;

    // the running transaction finishes normally; then PAUSE completes
    busy.simple_query("SELECT 2; COMMIT").await.unwrap();
    pausing.await.unwrap().expect("PAUSE completes");
    let pool = pool_row(&admin, db, "app").await;
    assert_eq!(num(&pool, "sv_active"), 0);
    assert_eq!(num(&pool, "sv_idle"), 0, "PAUSE closes idle servers");
    assert_eq!(num(&pool, "cl_waiting"), 1, "still held while paused");
    assert!(!held.is_finished());
    wait_until("servers closed", WAIT, || server_conns(db) == 0);
    // as PgBouncer: pausing again pauses nothing and says so
    for again in ["PAUSE".to_string(), format!("PAUSE {db}")] {
        let e = admin.simple_query(&again).await.unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("55000"), "{again}: {e}");
    }

    admin.simple_query("RESUME").await.unwrap();
    let msgs = held.await.unwrap().expect("no client error after RESUME");
    assert_eq!(first(&msgs), "after resume");
    assert_eq!(first(&busy.simple_query("SELECT 3").await.unwrap()), "3");
}

/// KILL closes at once a transaction-mode client that idles without a server: its session
/// waits on its socket alone and is woken through the client registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_closes_an_idle_client_that_holds_no_server() {
    let db = "obskillidle";
    let s = start(db, "pool_mode = \"transaction\"", "");
    let admin = console(&s.px).await;
    let victim = connect(&s.px, "app", db).await.unwrap();
    victim.simple_query("SELECT 1").await.unwrap();
    admin.simple_query(&format!("KILL {db}")).await.unwrap();
    wait_until_async("killed idle client closed", WAIT, || async {
        victim.is_closed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_disconnects_a_databases_clients_and_reconnect_replaces_servers() {
    let db = "obskill";
    let s = start(db, "pool_mode = \"session\"", "");
    let admin = console(&s.px).await;
    let c = connect(&s.px, "app", db).await.unwrap();
    let pid_before = first(&c.simple_query("SELECT pg_backend_pid()").await.unwrap());
    // RECONNECT: a lent server is closed once it comes back, not under its client
    admin
        .simple_query(&format!("RECONNECT {db}"))
        .await
        .unwrap();
    let servers = rows(&admin, "SHOW SERVERS").await;
    let mine: Vec<_> = servers
        .iter()
        .filter(|r| r["database"].as_deref() == Some(db))
        .collect();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["close_needed"].as_deref(), Some("1"));
    assert_eq!(
        first(&c.simple_query("SELECT pg_backend_pid()").await.unwrap()),
        pid_before
    );
    drop(c);
    wait_until("old server closed after its client left", WAIT, || {
        server_conns(db) == 0
    });

    let victim = connect(&s.px, "app", db).await.unwrap();
    victim.simple_query("SELECT 1").await.unwrap();
    admin.simple_query(&format!("KILL {db}")).await.unwrap();
    let err = victim.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.as_db_error().map(|e| e.code().code()) == Some("57P01") || victim.is_closed(),
        "{err}"
    );
    wait_until("killed client's server closed", WAIT, || {
        server_conns(db) == 0
    });
    // KILL leaves the database paused until RESUME, like PgBouncer
    let waiting = connect(&s.px, "app", db).await.unwrap();
    let q = tokio::spawn(async move { waiting.simple_query("SELECT 'back'").await });
    wait_until_async("client held after KILL", WAIT, || async {
        num(&pool_row(&admin, db, "app").await, "cl_waiting") == 1
    })
    .await;
    admin.simple_query(&format!("RESUME {db}")).await.unwrap();
    assert_eq!(first(&q.await.unwrap().unwrap()), "back");
    // unknown database
    let err = admin.simple_query("KILL nosuchdb").await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "3D000");

    // DISABLE: new clients are refused, connected ones go on; ENABLE lets them in again
    let stays = connect(&s.px, "app", db).await.unwrap();
    admin.simple_query(&format!("DISABLE {db}")).await.unwrap();
    let disabled = |rows: Vec<HashMap<String, Option<String>>>| {
        rows.into_iter()
            .find(|r| r["name"].as_deref() == Some(db))
            .and_then(|r| r["disabled"].clone())
    };
    assert_eq!(
        disabled(rows(&admin, "SHOW DATABASES").await).as_deref(),
        Some("1")
    );
    let err = connect(&s.px, "app", db).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "55000", "{err}");
    assert_eq!(
        first(&stays.simple_query("SELECT 'on'").await.unwrap()),
        "on"
    );
    admin.simple_query(&format!("ENABLE {db}")).await.unwrap();
    assert_eq!(
        disabled(rows(&admin, "SHOW DATABASES").await).as_deref(),
        Some("0")
    );
    let back = connect(&s.px, "app", db).await.unwrap();
    assert_eq!(
        first(&back.simple_query("SELECT 'back'").await.unwrap()),
        "back"
    );
    for bad in ["DISABLE", "DISABLE nosuchdb", "ENABLE a b"] {
        assert!(admin.simple_query(bad).await.is_err(), "{bad}");
    }
}

/// SHOW STATS counts named statements as PgBouncer does: a client's Parse, a Parse pgmux
/// sends a server that lacks the statement, and each Bind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_stats_counts_named_parses_and_binds() {
    let db = "obsparses";
    let s = start(db, "pool_mode = \"transaction\"", "pool_size = 1");
    let admin = console(&s.px).await;
    let a = connect(&s.px, "app", db).await.unwrap();
    let st = a.prepare("SELECT $1::int + 1").await.unwrap();
    for i in 0..3 {
        let r = a.query_one(&st, &[&i]).await.unwrap();
        assert_eq!(r.get::<_, i32>(0), i + 1);
    }
    // the same text from another client: its Parse is answered, the server has it
    let b = connect(&s.px, "app", db).await.unwrap();
    b.prepare("SELECT $1::int + 1").await.unwrap();
    let stats = rows(&admin, &format!("SHOW STATS_TOTALS {db}")).await;
    let col = |c: &str| stats[0][c].clone().unwrap_or_default();
    assert_eq!(
        (
            col("client_parse_count"),
            col("server_parse_count"),
            col("bind_count")
        ),
        ("2".into(), "1".into(), "3".into()),
        "{stats:?}"
    );
}

/// Ids of the database's clients in SHOW CLIENTS.
async fn client_ids(admin: &Client, db: &str) -> Vec<String> {
    rows(admin, "SHOW CLIENTS")
        .await
        .into_iter()
        .filter(|r| r["database"].as_deref() == Some(db))
        .filter_map(|r| r["id"].clone())
        .collect()
}

/// KILL_CLIENT ends one client (its transaction's server closed) and leaves the database
/// running; WAIT_CLOSE returns only once the servers RECONNECT marked are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_ends_one_client_and_wait_close_waits_for_marked_servers() {
    let db = "obskillclient";
    let s = start(db, "pool_mode = \"transaction\"", "");
    let admin = console(&s.px).await;
    let keeper = connect(&s.px, "app", db).await.unwrap();
    keeper.simple_query("SELECT 1").await.unwrap();
    let before = client_ids(&admin, db).await;
    let victim = connect(&s.px, "app", db).await.unwrap();
    victim.simple_query("BEGIN; SELECT 1").await.unwrap();
    let id = client_ids(&admin, db)
        .await
        .into_iter()
        .find(|i| !before.contains(i))
        .expect("the victim's id");
    assert_eq!(num(&pool_row(&admin, db, "app").await, "sv_active"), 1);
    admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    wait_until_async("killed client closed", WAIT, || async {
        victim.is_closed()
    })
    .await;
    // its server, left in a transaction, is closed, not lent again
    wait_until_async("killed client's server gone", WAIT, || async {
        num(&pool_row(&admin, db, "app").await, "sv_active") == 0
    })
    .await;
    assert_eq!(first(&keeper.simple_query("SELECT 2").await.unwrap()), "2");
    for (bad, code) in [
        (format!("KILL_CLIENT {id}"), "42704"),
        ("KILL_CLIENT x".to_string(), "42601"),
        ("KILL_CLIENT".to_string(), "42601"),
    ] {
        let e = admin.simple_query(&bad).await.unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some(code), "{bad}: {e}");
    }

    // WAIT_CLOSE: a server in a transaction, marked by RECONNECT, holds it until released
    keeper.simple_query("BEGIN; SELECT 3").await.unwrap();
    admin
        .simple_query(&format!("RECONNECT {db}"))
        .await
        .unwrap();
    let said = |line: &str| s.px.log().matches(line).count();
    // a console that leaves while its WAIT_CLOSE waits ends its session there
    let mut quitter = raw::connect(s.px.port);
    quitter
        .write_all(&raw::startup(&[("user", "admin"), ("database", "pgmux")]))
        .unwrap();
    raw::until_ready(&mut quitter);
    let gone_before = said("admin console disconnected");
    quitter
        .write_all(&raw::query(&format!("WAIT_CLOSE {db}")))
        .unwrap();
    wait_until("the quitter's WAIT_CLOSE waiting", WAIT, || {
        said("WAIT_CLOSE: waiting") == 1
    });
    drop(quitter);
    wait_until("the quitter's session ended", WAIT, || {
        said("admin console disconnected") == gone_before + 1
    });
    // the SHOW SERVERS behind it in the same Query runs once WAIT_CLOSE has returned
    let waiter = console(&s.px).await;
    let wait = tokio::spawn(async move {
        waiter
            .simple_query(&format!("WAIT_CLOSE {db}; SHOW SERVERS"))
            .await
    });
    // the marked server is still there while its transaction runs
    let marked = rows(&admin, "SHOW SERVERS").await;
    assert!(
        marked
            .iter()
            .any(|r| r["database"].as_deref() == Some(db)
                && r["close_needed"].as_deref() == Some("1")),
        "{marked:?}"
    );
    wait_until("WAIT_CLOSE waiting", WAIT, || {
        said("WAIT_CLOSE: waiting") == 2
    });
    assert_eq!(first(&keeper.simple_query("SELECT 4").await.unwrap()), "4");
    keeper.simple_query("COMMIT").await.unwrap();
    let after = wait.await.unwrap().expect("WAIT_CLOSE completes");
    let still_marked = after.iter().any(|m| match m {
        SimpleQueryMessage::Row(r) => r.get("close_needed") == Some("1"),
        _ => false,
    });
    assert!(
        !still_marked,
        "WAIT_CLOSE returned while a marked server was lent"
    );
    // nothing to wait for: at once; an unknown database is refused
    admin.simple_query("WAIT_CLOSE").await.unwrap();
    let e = admin.simple_query("WAIT_CLOSE nosuchdb").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("3D000"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_pool_size_live_and_refuses_an_invalid_config() {
    let db = "obsreload";
    let s = start(db, "pool_mode = \"transaction\"", "pool_size = 2");
    let admin = console(&s.px).await;
    let mut holders = Vec::new();
    for _ in 0..2 {
        let c = connect(&s.px, "app", db).await.unwrap();
        c.simple_query("BEGIN; SELECT 1").await.unwrap();
        holders.push(c);
    }
    let third = connect(&s.px, "app", db).await.unwrap();
    let q = tokio::spawn(async move {
        let r = third.simple_query("SELECT 'third'").await;
        (third, r)
    });
    wait_until_async("third client waiting", WAIT, || async {
        num(&pool_row(&admin, db, "app").await, "cl_waiting") == 1
    })
    .await;
    assert_eq!(server_conns(db), 2);

    // an invalid file is refused; the old configuration keeps running
    let good = config(
        db,
        s.metrics_port,
        "pool_mode = \"transaction\"",
        "pool_size = 3",
    )
    .replace("{port}", &s.px.port.to_string());
    std::fs::write(&s.px.config_path, "[pgmux]\ndefault_pool_size = 0\n").unwrap();
    let err = admin.simple_query("RELOAD").await.unwrap_err();
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("default_pool_size"), "{msg}");
    // an empty (truncated) file too: it would remove every database and user
    std::fs::write(&s.px.config_path, "").unwrap();
    let err = admin.simple_query("RELOAD").await.unwrap_err();
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("[pgmux]"), "{msg}");
    std::fs::write(&s.px.config_path, "[pgmux\n").unwrap();
    s.px.signal(libc::SIGHUP);
    wait_until("SIGHUP refusal logged", WAIT, || {
        s.px.log().contains("reload refused")
    });
    let dbs = rows(&admin, "SHOW DATABASES").await;
    let row = dbs
        .iter()
        .find(|r| r["name"].as_deref() == Some(db))
        .unwrap();
    assert_eq!(row["pool_size"].as_deref(), Some("2"));
    assert_eq!(num(&pool_row(&admin, db, "app").await, "cl_waiting"), 1);

    // a valid one takes effect at once: the waiting client gets a third server
    std::fs::write(&s.px.config_path, good).unwrap();
    admin.simple_query("RELOAD").await.unwrap();
    let (third, r) = q.await.unwrap();
    assert_eq!(first(&r.unwrap()), "third");
    let dbs = rows(&admin, "SHOW DATABASES").await;
    let row = dbs
        .iter()
        .find(|r| r["name"].as_deref() == Some(db))
        .unwrap();
    assert_eq!(row["pool_size"].as_deref(), Some("3"));
    let pool = pool_row(&admin, db, "app").await;
    assert_eq!(num(&pool, "sv_active"), 2);
    assert_eq!(num(&pool, "sv_active") + num(&pool, "sv_idle"), 3);
    assert_eq!(server_conns(db), 3);
    let m = scrape(s.metrics_port);
    assert_eq!(
        metric(&m, "pgmux_pool_size", &[("database", db), ("user", "app")]),
        3.0
    );
    // nobody was dropped
    for c in &holders {
        assert_eq!(
            first(&c.simple_query("SELECT 5; COMMIT").await.unwrap()),
            "5"
        );
    }
    assert_eq!(first(&third.simple_query("SELECT 6").await.unwrap()), "6");
}

/// A negative duration would silently mean "off": SET and RELOAD refuse it, naming the key,
/// and the running value stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_durations_are_refused_by_set_and_reload() {
    let db = "obsnegative";
    let s = start(db, "query_wait_timeout = 30", "");
    let admin = console(&s.px).await;
    let setting = |rows: Vec<HashMap<String, Option<String>>>, key: &str| {
        rows.into_iter()
            .find(|r| r["key"].as_deref() == Some(key))
            .and_then(|r| r["value"].clone())
    };
    for (key, value) in [
        ("query_wait_timeout", "-1"),
        ("server_idle_timeout", "-0.5"),
        ("query_timeout", "'-1'"),
        ("server_lifetime", "nan"),
    ] {
        let before = setting(rows(&admin, "SHOW CONFIG").await, key);
        let err = admin
            .simple_query(&format!("SET {key} = {value}"))
            .await
            .unwrap_err();
        let db_err = err.as_db_error().unwrap();
        assert_eq!(db_err.code().code(), "22023", "{key}: {db_err:?}");
        assert!(db_err.message().contains(key), "{key}: {db_err:?}");
        assert_eq!(setting(rows(&admin, "SHOW CONFIG").await, key), before);
    }
    assert_eq!(
        setting(rows(&admin, "SHOW CONFIG").await, "query_wait_timeout").as_deref(),
        Some("30.0")
    );
    let file = config(db, s.metrics_port, "auth_timeout = -1.0", "")
        .replace("{port}", &s.px.port.to_string());
    std::fs::write(&s.px.config_path, file).unwrap();
    let err = admin.simple_query("RELOAD").await.unwrap_err();
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("auth_timeout"), "{msg}");
    assert_eq!(
        setting(rows(&admin, "SHOW CONFIG").await, "auth_timeout").as_deref(),
        Some("60.0")
    );
    // the parameters drivers set are acknowledged and ignored, as PgBouncer ignores them;
    // anything else that is not a setting is still refused
    for set in [
        "SET client_encoding = 'UTF8'",
        "set DateStyle to 'ISO, MDY'",
        "SET TimeZone = 'UTC'",
        "SET standard_conforming_strings = on",
    ] {
        admin
            .simple_query(set)
            .await
            .unwrap_or_else(|e| panic!("{set}: {e}"));
    }
    let err = admin
        .simple_query("SET application_name = 'x'")
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22023");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_removed_by_reload_drains() {
    let db = "obsdrain";
    let s = start(db, "pool_mode = \"session\"", "");
    let admin = console(&s.px).await;
    let c = connect(&s.px, "app", db).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    // the database leaves the configuration
    let without = config(db, s.metrics_port, "pool_mode = \"session\"", "")
        .replace("{port}", &s.px.port.to_string());
    let cut = without.find("[[databases]]").unwrap();
    std::fs::write(&s.px.config_path, &without[..cut]).unwrap();
    admin.simple_query("RELOAD").await.unwrap();
    // its client goes on; new ones are refused
    assert_eq!(first(&c.simple_query("SELECT 'on'").await.unwrap()), "on");
    let err = connect(&s.px, "app", db).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "3D000");
    assert!(!pool_row(&admin, db, "app").await.is_empty());
    drop(c);
    wait_until_async("drained pool gone", WAIT, || async {
        pool_row(&admin, db, "app").await.is_empty()
    })
    .await;
    wait_until("its servers closed", WAIT, || server_conns(db) == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_from_the_console_stops_pgmux() {
    let db = "obsshutdown";
    let mut s = start(db, "shutdown_timeout = 10", "");
    let app = connect(&s.px, "app", db).await.unwrap();
    app.simple_query("SELECT 1").await.unwrap();
    let admin = console(&s.px).await;
    admin.simple_query("SHUTDOWN").await.unwrap();
    let status = tokio::task::block_in_place(|| s.px.wait_exit(WAIT)).expect("pgmux exited");
    assert!(status.success(), "{status}");
    assert!(app.simple_query("SELECT 1").await.is_err());
}

/// The console's SHUTDOWN during a SIGTERM drain escalates it, as SIGINT does: clients
/// between transactions are closed instead of waited for, and pgmux exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_from_the_console_escalates_a_sigterm_drain() {
    let db = "obsshutdown_drain";
    let mut s = start(db, "shutdown_timeout = 600", "");
    let app = connect(&s.px, "app", db).await.unwrap();
    app.simple_query("SELECT 1").await.unwrap();
    let admin = console(&s.px).await;
    s.px.signal(libc::SIGTERM);
    wait_until_async("the drain began", WAIT, || async {
        s.px.log().contains("shutting down (Drain)")
    })
    .await;
    app.simple_query("SELECT 2")
        .await
        .expect("served while draining");
    admin.simple_query("SHUTDOWN").await.unwrap();
    wait_until_async("the idle client closed", WAIT, || async {
        app.simple_query("SELECT 3").await.is_err()
    })
    .await;
    drop(admin);
    let status = tokio::task::block_in_place(|| s.px.wait_exit(WAIT)).expect("pgmux exited");
    assert!(status.success(), "{status}");
}

/// log_connections and log_disconnections (PgBouncer's names, on by default) silence the
/// session start and end lines, and SET changes them live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_connections_and_disconnections_can_be_turned_off_live() {
    let s = start("obs_logconn", "", "");
    let admin = console(&s.px).await;
    for set in ["SET log_connections = 0", "SET log_disconnections = 0"] {
        admin.simple_query(set).await.unwrap();
    }
    let quiet = connect(&s.px, "postgres", "obs_logconn").await.unwrap();
    quiet.simple_query("SELECT 1").await.unwrap();
    drop(quiet);
    let gone = || async {
        let clients = rows(&admin, "SHOW CLIENTS").await;
        !clients
            .iter()
            .any(|c| c["user"].as_deref() == Some("postgres"))
    };
    wait_until_async("the quiet client gone", WAIT, gone).await;
    for set in ["SET log_connections = 1", "SET log_disconnections = 1"] {
        admin.simple_query(set).await.unwrap();
    }
    let loud = connect(&s.px, "app", "obs_logconn").await.unwrap();
    loud.simple_query("SELECT 1").await.unwrap();
    drop(loud);
    let ended = |log: &str| {
        log.lines()
            .any(|l| l.contains("db=obs_logconn user=app}") && l.contains("client disconnected"))
    };
    wait_until("the loud client's last line", WAIT, || ended(&s.px.log()));
    let log = s.px.log();
    let lines = |user: &str, what: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("db=obs_logconn user={user}}}")) && l.contains(what))
            .count()
    };
    assert_eq!(lines("app", "client connected"), 1, "{log}");
    assert_eq!(lines("postgres", "client connected"), 0, "{log}");
    assert_eq!(lines("postgres", "client disconnected"), 0, "{log}");
}

/// A pool whose server logins fail waits server_login_retry before min_pool_size tries
/// again, rather than once per upkeep (twice a second), and says so once at warn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_server_logins_are_not_retried_at_every_upkeep() {
    let db = "obsretry";
    let pg = PgCluster::shared();
    let bad = format!(
        "[[databases]]\nname = \"obsretry_bad\"\ndbname = \"no_such_database\"\n\
         host = \"127.0.0.1\"\nport = {}\n",
        pg.primary().port
    );
    let s = start(db, "min_pool_size = 1\nserver_login_retry = 3600", &bad);
    let admin = console(&s.px).await;
    let good = connect(&s.px, "app", db).await.unwrap();
    good.simple_query("SELECT 1").await.unwrap();
    let failures = || {
        metric(
            &scrape(s.metrics_port),
            "pgmux_server_connect_failures_total",
            &[("database", "obsretry_bad")],
        )
    };
    assert!(connect(&s.px, "app", "obsretry_bad").await.is_err());
    let before = failures();
    assert!(before >= 1.0);
    // two upkeeps seen to run: the good pool grows to each new min_pool_size
    for n in [2, 3] {
        admin
            .simple_query(&format!("SET min_pool_size = {n}"))
            .await
            .unwrap();
        wait_until_async("the good pool to grow", WAIT, || async {
            let row = pool_row(&admin, db, "app").await;
            num(&row, "sv_idle") + num(&row, "sv_active") >= n
        })
        .await;
    }
    assert_eq!(failures(), before, "the failing login was retried");
    let log = s.px.log();
    assert_eq!(log.matches("server login failed").count(), 1, "{log}");
}

/// A client whose login needs the first server of a paused pool (the pool has none yet)
/// waits in line like any other: counted in cl_waiting, shown waiting in SHOW CLIENTS, ended
/// by KILL, and closed at once by SIGINT instead of holding the shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_waiting_for_the_first_server_of_a_paused_pool_is_a_waiting_client() {
    let db = "obsloginwait";
    let mut s = start(db, "shutdown_timeout = 600", "");
    let admin = console(&s.px).await;
    admin.simple_query(&format!("PAUSE {db}")).await.unwrap();
    let url = s.px.conn_str("app", db, Some("secret"));
    let login = || {
        let url = url.clone();
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&url, NoTls).await?;
            tokio::spawn(conn);
            Ok::<_, tokio_postgres::Error>(c)
        })
    };
    let waiting_in_line = || async {
        let pool = pool_row(&admin, db, "app").await;
        !pool.is_empty() && num(&pool, "cl_waiting") == 1
    };

    let first = login();
    wait_until_async(
        "the login waiting for the paused pool",
        WAIT,
        waiting_in_line,
    )
    .await;
    let clients = rows(&admin, "SHOW CLIENTS").await;
    let mine: Vec<_> = clients
        .iter()
        .filter(|r| r["database"].as_deref() == Some(db))
        .collect();
    assert_eq!(mine.len(), 1, "{clients:?}");
    assert_eq!(mine[0]["state"].as_deref(), Some("waiting"), "{clients:?}");

    admin.simple_query(&format!("KILL {db}")).await.unwrap();
    let e = first.await.unwrap().expect_err("killed, not logged in");
    assert_eq!(e.code().map(|c| c.code()), Some("57P01"), "{e}");
    wait_until_async("the killed login gone", WAIT, || async {
        num(&pool_row(&admin, db, "app").await, "cl_waiting") == 0
    })
    .await;

    // still paused after KILL: the next login waits, and SIGINT closes it at once
    let second = login();
    wait_until_async("the second login waiting", WAIT, waiting_in_line).await;
    s.px.signal(libc::SIGINT);
    let e = second.await.unwrap().expect_err("closed by SIGINT");
    assert_eq!(e.code().map(|c| c.code()), Some("57P01"), "{e}");
    let status = tokio::task::block_in_place(|| s.px.wait_exit(WAIT))
        .expect("pgmux exited without waiting for shutdown_timeout");
    assert!(status.success(), "{status}");
}

/// A database paused (or killed) and then removed by RELOAD can still be named by RESUME and
/// KILL while its pool serves its last clients, so those clients are never stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_and_kill_reach_a_paused_database_removed_by_reload() {
    let db = "obsremovedpause";
    let s = start(db, "pool_mode = \"transaction\"", "");
    let admin = console(&s.px).await;
    let c = connect(&s.px, "app", db).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    admin.simple_query(&format!("PAUSE {db}")).await.unwrap();
    let held = tokio::spawn(async move {
        let r = c.simple_query("SELECT 'resumed'").await;
        (c, r)
    });
    wait_until_async("the query waiting", WAIT, || async {
        num(&pool_row(&admin, db, "app").await, "cl_waiting") == 1
    })
    .await;

    // the database leaves the configuration while paused
    let without = config(db, s.metrics_port, "pool_mode = \"transaction\"", "")
        .replace("{port}", &s.px.port.to_string());
    let cut = without.find("[[databases]]").unwrap();
    std::fs::write(&s.px.config_path, &without[..cut]).unwrap();
    admin.simple_query("RELOAD").await.unwrap();
    let err = connect(&s.px, "app", db).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "3D000");

    admin
        .simple_query(&format!("RESUME {db}"))
        .await
        .expect("RESUME of the removed database");
    let (c, r) = held.await.unwrap();
    assert_eq!(first(&r.expect("served after RESUME")), "resumed");

    admin
        .simple_query(&format!("KILL {db}"))
        .await
        .expect("KILL of the removed database");
    wait_until_async("the killed client closed", WAIT, || async { c.is_closed() }).await;
    admin
        .simple_query(&format!("RESUME {db}"))
        .await
        .expect("RESUME after KILL");
    wait_until_async("drained pool gone", WAIT, || async {
        pool_row(&admin, db, "app").await.is_empty()
    })
    .await;
    // once nothing is left of it, the name is unknown again
    let err = admin
        .simple_query(&format!("RESUME {db}"))
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "3D000");
}

/// A database name with a space (or a `;`, or a double quote) is named in console commands
/// as a quoted identifier, as in PgBouncer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_commands_take_quoted_database_names() {
    let db = "obsquoted";
    let pg = PgCluster::shared();
    let extra = format!(
        "[[databases]]\nname = \"my db\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{db}\"\n\
         [[databases]]\nname = 'a;\"b\"'\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{db}\"\n",
        pg.primary().port,
        pg.primary().port
    );
    let s = start(db, "pool_mode = \"transaction\"", &extra);
    let admin = console(&s.px).await;
    let paused = |name: &'static str| {
        let admin = &admin;
        async move {
            rows(admin, "SHOW DATABASES")
                .await
                .into_iter()
                .find(|r| r["name"].as_deref() == Some(name))
                .and_then(|r| r["paused"].clone())
                .unwrap_or_else(|| panic!("no database {name:?} in SHOW DATABASES"))
        }
    };
    for (name, quoted) in [("my db", "\"my db\""), ("a;\"b\"", "\"a;\"\"b\"\"\"")] {
        let c = connect(&s.px, "app", name).await.unwrap();
        assert_eq!(first(&c.simple_query("SELECT 'in'").await.unwrap()), "in");
        admin
            .simple_query(&format!("PAUSE {quoted}"))
            .await
            .unwrap_or_else(|e| panic!("PAUSE {quoted}: {e}"));
        assert_eq!(paused(name).await, "1");
        admin
            .simple_query(&format!("RESUME {quoted}; RECONNECT {quoted}"))
            .await
            .unwrap_or_else(|e| panic!("RESUME {quoted}: {e}"));
        assert_eq!(paused(name).await, "0");
        let stats = rows(&admin, &format!("SHOW STATS {quoted}")).await;
        assert_eq!(stats.len(), 1, "{stats:?}");
        assert_eq!(stats[0]["database"].as_deref(), Some(name));
        admin
            .simple_query(&format!("KILL {quoted}"))
            .await
            .unwrap_or_else(|e| panic!("KILL {quoted}: {e}"));
        wait_until_async("the killed client closed", WAIT, || async { c.is_closed() }).await;
        admin
            .simple_query(&format!("RESUME {quoted}"))
            .await
            .unwrap();
    }
    // an unquoted name with a space is two words; an unterminated quote is no command
    for bad in ["PAUSE my db", "PAUSE \"my db", "PAUSE \"my\"db"] {
        let e = admin.simple_query(bad).await.unwrap_err();
        assert_eq!(e.code().unwrap().code(), "42601", "{bad}: {e}");
    }
}

/// SHUTDOWN WAIT_FOR_CLIENTS is SIGTERM's drain and SHUTDOWN WAIT_FOR_SERVERS SIGINT's safe
/// shutdown, as in PgBouncer 1.23.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_wait_for_clients_drains_and_wait_for_servers_shuts_down_safely() {
    let db = "obsshutdown_wait";
    let general = "pool_mode = \"transaction\"\nshutdown_timeout = 600";
    let mut s = start(db, general, "");
    let admin = console(&s.px).await;
    let e = admin.simple_query("SHUTDOWN NOW").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42601", "{e}");
    let app = connect(&s.px, "app", db).await.unwrap();
    app.simple_query("SELECT 1").await.unwrap();
    admin
        .simple_query("shutdown wait_for_clients")
        .await
        .expect("SHUTDOWN WAIT_FOR_CLIENTS");
    wait_until_async("the drain began", WAIT, || async {
        s.px.log().contains("shutting down (Drain)")
    })
    .await;
    wait_until_async("no new clients", WAIT, || async {
        connect(&s.px, "app", db).await.is_err()
    })
    .await;
    // connected clients are served, between transactions too
    for sql in ["SELECT 2", "BEGIN", "SELECT 3", "COMMIT"] {
        app.simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql} while draining: {e}"));
    }
    drop(admin);
    drop(app);
    let status = tokio::task::block_in_place(|| s.px.wait_exit(WAIT))
        .expect("pgmux exits once its clients left");
    assert!(status.success(), "{status}");

    let db = "obsshutdown_wait2";
    let mut s = start(db, general, "");
    let admin = console(&s.px).await;
    let holder = connect(&s.px, "app", db).await.unwrap();
    holder.simple_query("BEGIN; SELECT 1").await.unwrap();
    let idle = connect(&s.px, "app", db).await.unwrap();
    idle.simple_query("SELECT 1").await.unwrap();
    admin
        .simple_query("SHUTDOWN WAIT_FOR_SERVERS")
        .await
        .expect("SHUTDOWN WAIT_FOR_SERVERS");
    // a client between transactions is closed, the open transaction finishes
    wait_until_async("the idle client closed", WAIT, || async {
        idle.is_closed()
    })
    .await;
    holder
        .simple_query("SELECT 2; COMMIT")
        .await
        .expect("the open transaction finishes");
    let status = tokio::task::block_in_place(|| s.px.wait_exit(WAIT)).expect("pgmux exited");
    assert!(status.success(), "{status}");
}
