//! Hostile clients, each refused without harm to anyone else: bytes pipelined behind an
//! SSLRequest, a startup packet claiming a huge length, a password sent before any challenge
//! (md5; SCRAM is in tests/bad_input.rs, as are oversized and malformed startup packets),
//! many failed logins in a row, a non-admin user asking for the admin console, and cancel keys
//! guessed at random.

mod common;

use common::probe::{fd_count, wait_fds, Console};
use common::raw;
use common::{free_port, wait_until, PgCluster, Pgmux};
use std::io::{Read, Write};
use std::time::Duration;
use tokio_postgres::NoTls;

fn start(db: &str, auth: &str, extra: &str) -> Pgmux {
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "{auth}"
admin_users = ["admin"]
stats_users = ["watcher"]
{extra}
[[users]]
name = "app"
password = "secret"
[[users]]
name = "admin"
password = "secret"
[[users]]
name = "watcher"
password = "secret"
[[databases]]
name = "{db}"
host = "127.0.0.1"
port = {}
server_user = "postgres"
"#,
        pg.primary().port
    ))
}

/// Bytes sent behind an SSLRequest before its answer is read: pgmux answers `N` (no TLS yet)
/// and reads what follows as the plaintext startup, exactly as PostgreSQL does after `N`.
/// (Once TLS lands, bytes pipelined behind an SSLRequest answered `S` must be refused, or they
/// would be taken as sent under encryption; that test belongs with the TLS work.)
#[test]
fn bytes_pipelined_after_ssl_request_are_a_new_startup() {
    let db = "sec_ssl";
    let px = start(db, "trust", "");
    let mut s = raw::connect(px.port);
    let mut all = vec![0, 0, 0, 8, 4, 210, 22, 47];
    all.extend(raw::startup(&[("user", "app"), ("database", db)]));
    all.extend(raw::query("SELECT 7"));
    all.extend(raw::msg(b'X', b""));
    s.write_all(&all).unwrap();
    let mut n = [0u8; 1];
    s.read_exact(&mut n).unwrap();
    assert_eq!(&n, b"N");
    let msgs = raw::until_eof(&mut s);
    assert_eq!(raw::error_code(&msgs), None, "{msgs:?}");
    assert!(
        msgs.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"7")),
        "the pipelined startup and query were served: {msgs:?}"
    );
}

/// A length word far past the 10,000-byte limit is refused at once: pgmux neither waits for
/// nor allocates the body it announces.
#[test]
fn huge_startup_length_is_refused_without_waiting() {
    let db = "sec_len";
    let px = start(db, "trust", "auth_timeout = 120");
    for len in [10_001u32, 0x7fff_ffff, 0xffff_ffff] {
        let mut s = raw::connect(px.port);
        s.write_all(&len.to_be_bytes()).unwrap();
        let msgs = raw::until_eof(&mut s);
        assert_eq!(raw::error_code(&msgs).as_deref(), Some("08P01"), "{len}");
    }
}

/// md5: a PasswordMessage sent before pgmux asked for one cannot be told apart from a quick
/// answer (it is read after the challenge is written, as PostgreSQL reads it), but it cannot
/// know the random salt: it is a failed login, never a session.
#[test]
fn md5_password_before_the_challenge_is_refused() {
    let db = "sec_md5";
    let px = start(db, "md5", "");
    let mut s = raw::connect(px.port);
    let mut early = raw::startup(&[("user", "app"), ("database", db)]);
    early.extend(raw::msg(b'p', b"md5deadbeefdeadbeefdeadbeefdeadbeef\0"));
    s.write_all(&early).unwrap();
    let msgs = raw::until_eof(&mut s);
    assert!(
        !msgs
            .iter()
            .any(|(t, b)| *t == b'R' && b[..4] == [0, 0, 0, 0]),
        "never AuthenticationOk: {msgs:?}"
    );
    assert_eq!(raw::error_code(&msgs).as_deref(), Some("28P01"), "{msgs:?}");
}

/// Fifty wrong passwords in a row (as a brute force would) are each refused with 28P01, are
/// counted in /metrics, leave no socket behind, and do not lock out the right password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_logins_are_refused_and_counted() {
    let db = "sec_brute";
    let metrics = free_port();
    let px = start(
        db,
        "scram-sha-256",
        &format!("metrics_listen_port = {metrics}"),
    );
    let good = px.conn_str("app", db, Some("secret"));
    let (c, conn) = tokio_postgres::connect(&good, NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    conn.await.unwrap().unwrap();
    let fds = fd_count(px.pid());
    for i in 0..50 {
        let user = if i % 5 == 0 { "nobody" } else { "app" };
        let url = px.conn_str(user, db, Some(&format!("guess{i}")));
        let e = tokio_postgres::connect(&url, NoTls)
            .await
            .err()
            .expect("a wrong password is refused");
        assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");
    }
    let body = http_get(metrics, "/metrics");
    assert!(
        body.lines()
            .any(|l| l == "pgmux_client_auth_failures_total 50"),
        "{}",
        body.lines()
            .filter(|l| l.contains("auth_failures"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    wait_fds(px.pid(), fds).await;
    let (c, conn) = tokio_postgres::connect(&good, NoTls).await.unwrap();
    tokio::spawn(conn);
    c.simple_query("SELECT 1").await.unwrap();
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The admin console is for admin_users (and stats_users for SHOW): anyone else, even with
/// the right password, is refused with 42501; a stats user cannot run control commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_admin_users_cannot_use_the_console() {
    let db = "sec_console";
    let px = start(db, "scram-sha-256", "");
    let e = tokio_postgres::connect(&px.conn_str("app", "pgmux", Some("secret")), NoTls)
        .await
        .err()
        .expect("app is no console user");
    assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}");
    let e = tokio_postgres::connect(&px.conn_str("admin", "pgmux", Some("wrong")), NoTls)
        .await
        .err()
        .expect("an admin with the wrong password");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");
    let watcher = Console::connect(&px, "watcher", Some("secret")).await;
    // SHOW is what a stats user may do
    watcher.show("SHOW POOLS").await;
    for cmd in [
        "PAUSE",
        "KILL sec_console",
        "KILL_CLIENT 1",
        "WAIT_CLOSE",
        "SHUTDOWN",
        "SET default_pool_size = 1",
    ] {
        let e = watcher
            .client
            .simple_query(cmd)
            .await
            .expect_err("a stats user cannot control pgmux");
        assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{cmd}: {e}");
    }
    let admin = Console::connect(&px, "admin", Some("secret")).await;
    let dbs = admin.show("SHOW DATABASES").await;
    let row = dbs
        .iter()
        .find(|r| r.get("name").map(String::as_str) == Some(db))
        .expect("the database's row");
    assert_eq!(
        row["paused"], "0",
        "the refused PAUSE/KILL did nothing: {row:?}"
    );
}

/// A thousand random cancel keys, and two hundred with the right pid and a wrong secret, cancel
/// nothing; the right key cancels the query.
#[test]
fn guessed_cancel_keys_cancel_nothing() {
    let db = "sec_cancel";
    let px = start(db, "trust", "");
    let pg = PgCluster::shared();
    let (mut victim, (pid, secret)) = raw::login(px.port, "app", db);
    victim
        .write_all(&raw::query("SELECT pg_sleep(600)"))
        .unwrap();
    let running = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND query = 'SELECT pg_sleep(600)' AND state = 'active'"
    );
    wait_until("the victim's query runs", Duration::from_secs(20), || {
        pg.primary().psql(db, &running) == "1"
    });
    let guesses = (0..1000)
        .map(|_| (rand::random::<i32>(), rand::random::<i32>()))
        .chain((0..200).map(|_| (pid, rand::random::<i32>())))
        .filter(|&k| k != (pid, secret));
    for (p, s) in guesses {
        let mut c = raw::connect(px.port);
        c.write_all(&raw::cancel_request(p, s)).unwrap();
        // pgmux closes a cancel connection once it has dealt with it
        let msgs = raw::until_eof(&mut c);
        assert!(msgs.is_empty(), "a cancel request gets no answer: {msgs:?}");
    }
    assert_eq!(
        pg.primary().psql(db, &running),
        "1",
        "a guessed key cancelled the query"
    );
    let mut c = raw::connect(px.port);
    c.write_all(&raw::cancel_request(pid, secret)).unwrap();
    raw::until_eof(&mut c);
    let msgs = raw::until_ready(&mut victim);
    assert_eq!(raw::error_code(&msgs).as_deref(), Some("57014"), "{msgs:?}");
}
