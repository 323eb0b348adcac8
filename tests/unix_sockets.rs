//! Unix-domain sockets on both sides: clients through pgmux's socket in `unix_socket_dir`
//! (psql, and tokio-postgres's three query paths), servers through PostgreSQL's socket when a
//! database's host is a directory; how the admin console shows both, `local` lines of the hba
//! file, cancels, and the socket file's life (a stale one replaced, a live one kept, removed
//! at exit).

mod common;

use common::probe::Console;
use common::{wait_until, PgCluster, Pgmux};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tokio_postgres::NoTls;

/// pgmux with a Unix socket in `dir`, reaching the shared primary through its socket.
fn start(dir: &Path, extra: &str) -> Pgmux {
    let pg = PgCluster::shared();
    Pgmux::start(&format!(
        "[pgmux]\nlisten_port = {{port}}\nauth_type = \"trust\"\nunix_socket_dir = \"{}\"\n\
         admin_users = [\"postgres\"]\n{extra}\n[[users]]\nname = \"postgres\"\n\
         [[databases]]\nname = \"app\"\ndbname = \"postgres\"\nhost = \"{}\"\nport = {}\n",
        dir.display(),
        pg.primary().socket_dir.display(),
        pg.primary().port
    ))
}

fn socket_url(dir: &Path, px: &Pgmux) -> String {
    format!(
        "host={} port={} user=postgres dbname=app",
        dir.display(),
        px.port
    )
}

fn psql(dir: &Path, port: u16, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(dir)
        .args([
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "app",
            "-c",
            sql,
        ])
        .env_remove("PGHOST")
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_servers_meet_over_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let px = start(dir.path(), "");
    let socket = dir.path().join(format!(".s.PGSQL.{}", px.port));
    assert!(socket.exists(), "{}", px.log());

    // psql through the socket; the server side is PostgreSQL's socket too (no client_addr)
    let out = psql(
        dir.path(),
        px.port,
        "SELECT client_addr IS NULL FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    );
    assert!(out.status.success(), "{out:?}\n{}", px.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");

    // tokio-postgres through the socket: simple, extended, and typed
    let (c, conn) = tokio_postgres::connect(&socket_url(dir.path(), &px), NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = c.simple_query("SELECT 'simple'").await.unwrap();
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("simple"))
    );
    let row = c.query_one("SELECT $1::int + 1", &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let rows = c
        .query_typed(
            "SELECT $1::text",
            &[(&"typed", tokio_postgres::types::Type::TEXT)],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, &str>(0), "typed");

    // the console shows the socket client and the socket server as addr unix
    let console = Console::connect(&px, "postgres", None).await;
    let clients = console.show("SHOW CLIENTS").await;
    assert!(
        clients.iter().any(|c| c["database"] == "app"
            && c["addr"] == "unix"
            && c["port"] == px.port.to_string()),
        "{clients:?}"
    );
    let servers = console.show("SHOW SERVERS").await;
    assert!(
        !servers.is_empty()
            && servers.iter().all(|s| s["addr"] == "unix"
                && s["port"] == PgCluster::shared().primary().port.to_string()),
        "{servers:?}"
    );

    // a cancel from the socket client reaches the backend through the server's socket
    let token = c.cancel_token();
    let sleeping = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(60)").await });
    let pg = PgCluster::shared();
    wait_until("the sleep runs", Duration::from_secs(20), || {
        pg.primary()
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
            )
            == "1"
    });
    token.cancel_query(NoTls).await.unwrap();
    let err = sleeping.await.unwrap().unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err:?}"
    );

    // the file goes with the process
    drop(console);
    px.signal(libc::SIGTERM);
    wait_until(
        "the socket file is removed",
        Duration::from_secs(20),
        || !socket.exists(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_hba_lines_decide_for_socket_clients_only() {
    let dir = tempfile::tempdir().unwrap();
    let hba = dir.path().join("hba.conf");
    std::fs::write(
        &hba,
        "local all all reject\nhost all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    let px = start(
        dir.path(),
        &format!("auth_hba_file = \"{}\"", hba.display()),
    );

    let out = psql(dir.path(), px.port, "SELECT 1");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pg_hba.conf rejects connection for host \"[local]\""),
        "{err}"
    );
    let e = tokio_postgres::connect(&socket_url(dir.path(), &px), NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{e:?}"
    );

    // over TCP the host line lets the same user in
    let (c, conn) = tokio_postgres::connect(&px.conn_str("postgres", "app", None), NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.simple_query("SELECT 1").await.unwrap();
}

/// A pgmux started by hand (the test chooses its port), killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stale_socket_file_is_replaced_and_a_live_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    // a listener that is gone leaves its file behind, as a crashed process would
    let path = dir.path().join(format!(".s.PGSQL.{port}"));
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let config = dir.path().join("pgmux.toml");
    std::fs::write(
        &config,
        format!(
            "[pgmux]\nlisten_port = {port}\nso_reuseport = true\nauth_type = \"trust\"\n\
             unix_socket_dir = \"{}\"\nmetrics_listen_port = 0\n[[users]]\nname = \"postgres\"\n\
             [[databases]]\nname = \"app\"\ndbname = \"postgres\"\nhost = \"127.0.0.1\"\nport = {}\n",
            dir.path().display(),
            PgCluster::shared().primary().port
        ),
    )
    .unwrap();
    let pgmux = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pgmux"));
        c.arg("--config")
            .arg(&config)
            .stdin(std::process::Stdio::null());
        c
    };
    let _first = Child(
        pgmux()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // it serves on the file that was stale
    wait_until(
        "pgmux serves on the socket",
        Duration::from_secs(20),
        || psql(dir.path(), port, "SELECT 1").status.success(),
    );

    // a second process on the same port (so_reuseport) must not take the live socket over:
    // it exits with the reason (a deadline, so that a second process that serves fails this)
    let mut second = Child(
        pgmux()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut status = None;
    wait_until("the second pgmux exits", Duration::from_secs(20), || {
        status = second.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(!status.unwrap().success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("in use by another process"), "{err}");
    assert!(psql(dir.path(), port, "SELECT 1").status.success());
}
