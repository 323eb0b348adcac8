//! Real drivers in other languages through pgmux in transaction mode with a small pool, many
//! clients each, so statements really move between servers: psycopg 3 (every statement
//! prepared, pipeline mode), asyncpg (statement cache on), node-postgres (named queries),
//! pgjdbc (prepareThreshold=1), PHP's PDO (server-side prepares, deallocated with SQL). Each
//! script checks results, not only the absence of errors.
//! `.ci/run` installs the drivers; tests/drivers/ holds the scripts.

mod common;

use common::{PgCluster, Pgmux};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CLIENTS: &str = "20";

fn start() -> Pgmux {
    let pg = PgCluster::shared();
    Pgmux::start(&format!(
        "[pgmux]\nlisten_port = {{port}}\npool_mode = \"transaction\"\ndefault_pool_size = 3\nauth_type = \"scram-sha-256\"\n\
         [[users]]\nname = \"app\"\npassword = \"secret\"\n\
         [[databases]]\nname = \"app\"\nhost = \"127.0.0.1\"\nport = {}\n",
        pg.primary().port
    ))
}

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Runs a driver script to its end (bounded), asserting success and its closing line.
fn run(mut cmd: Command, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = cmd
        .current_dir(drivers_dir())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e} (run .ci/run's install step)"));
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{cmd:?} did not finish: {}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(status.success(), "{cmd:?} failed:\n{text}");
    assert!(text.contains(expect), "{text}");
}

#[test]
fn psycopg3_prepares_everything_and_pipelines() {
    let px = start();
    let mut cmd = Command::new("python3");
    cmd.arg("psycopg_check.py")
        .arg(px.conn_str("app", "app", Some("secret")))
        .arg(CLIENTS);
    run(cmd, "clients ok");
}

#[test]
fn asyncpg_with_its_statement_cache() {
    let px = start();
    let mut cmd = Command::new("python3");
    cmd.arg("asyncpg_check.py").args([
        "127.0.0.1",
        &px.port.to_string(),
        "app",
        "secret",
        "app",
        CLIENTS,
    ]);
    run(cmd, "clients ok");
}

#[test]
fn node_postgres_named_queries() {
    let px = start();
    let mut cmd = Command::new("node");
    cmd.arg("node_pg_check.js")
        .arg(format!("postgresql://app:secret@127.0.0.1:{}/app", px.port))
        .arg(CLIENTS);
    run(cmd, "clients ok");
}

#[test]
fn pgjdbc_with_prepare_threshold_one() {
    let px = start();
    let mut cmd = Command::new("java");
    cmd.args(["-cp", "/usr/share/java/postgresql.jar", "JdbcCheck.java"])
        .arg(format!(
            "jdbc:postgresql://127.0.0.1:{}/app?user=app&password=secret&prepareThreshold=1",
            px.port
        ))
        .arg(CLIENTS);
    run(cmd, "clients ok");
}

#[test]
fn php_pdo_deallocates_with_sql() {
    let px = start();
    let mut cmd = Command::new("php");
    cmd.arg("pdo_check.php")
        .arg(format!("pgsql:host=127.0.0.1;port={};dbname=app", px.port))
        .args(["app", "secret", CLIENTS]);
    run(cmd, "clients ok");
}
