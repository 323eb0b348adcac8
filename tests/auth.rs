//! Authentication both ways through pgmux: clients to pgmux with trust, md5 and SCRAM
//! (plain, md5-hashed and SCRAM-verifier secrets), pgmux to servers with trust, cleartext,
//! md5 and SCRAM; wrong passwords, unknown users and databases get PostgreSQL's errors.

mod common;

use common::{PgCluster, Pgmux};
use tokio_postgres::NoTls;

const PW: &str = "Sup3r-s3cret";

fn start(auth_type: &str, users: &str) -> Pgmux {
    let pg = PgCluster::shared();
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
default_pool_size = 2
auth_type = "{auth_type}"
{users}
[[databases]]
name = "app"
host = "127.0.0.1"
port = {port}
[[databases]]
name = "app_as_app"
dbname = "app"
host = "127.0.0.1"
port = {port}
server_user = "app"
server_password = "secret"
"#,
        port = pg.primary().port
    ))
}

async fn try_connect(px: &Pgmux, user: &str, db: &str, pw: Option<&str>) -> Result<String, String> {
    match tokio_postgres::connect(&px.conn_str(user, db, pw), NoTls).await {
        Ok((c, conn)) => {
            tokio::spawn(conn);
            let rows = c
                .simple_query("SELECT current_user")
                .await
                .map_err(|e| e.to_string())?;
            rows.iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some(r.get(0).unwrap().to_string())
                    }
                    _ => None,
                })
                .ok_or_else(|| "no row".into())
        }
        Err(e) => Err(e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| e.to_string())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_to_clients_with_each_kind_of_stored_secret() {
    let pg = PgCluster::shared();
    let md5 = pgmux::auth::password::md5_secret(PW, "hashed");
    let md5_hex: String = md5.iter().map(|b| format!("{b:02x}")).collect();
    let verifier = pg.psql(
        pg.primary(),
        "postgres",
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'scram_user'",
    );
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let px = start(
        "scram-sha-256",
        &format!(
            "[[users]]\nname = \"plain\"\npassword = \"{PW}\"\n[[users]]\nname = \"verifier\"\npassword = \"{verifier}\"\n[[users]]\nname = \"hashed\"\npassword = \"md5{md5_hex}\"\n"
        ),
    );
    assert_eq!(
        try_connect(&px, "plain", "app_as_app", Some(PW)).await,
        Ok("app".into())
    );
    // the verifier PostgreSQL stored for scram_user's password 'secret'
    assert_eq!(
        try_connect(&px, "verifier", "app_as_app", Some("secret")).await,
        Ok("app".into())
    );
    assert_eq!(
        try_connect(&px, "plain", "app_as_app", Some("wrong")).await,
        Err("28P01".into())
    );
    assert_eq!(
        try_connect(&px, "verifier", "app_as_app", Some("wrong")).await,
        Err("28P01".into())
    );
    // an md5 secret cannot serve SCRAM; unknown users look the same as wrong passwords
    assert_eq!(
        try_connect(&px, "hashed", "app_as_app", Some(PW)).await,
        Err("28P01".into())
    );
    assert_eq!(
        try_connect(&px, "nobody", "app_as_app", Some(PW)).await,
        Err("28P01".into())
    );
    assert_eq!(
        try_connect(&px, "plain", "no_such_db", Some(PW)).await,
        Err("3D000".into())
    );
    assert!(!px.log().contains(PW), "a password appeared in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_to_clients() {
    let md5 = pgmux::auth::password::md5_secret(PW, "hashed");
    let md5_hex: String = md5.iter().map(|b| format!("{b:02x}")).collect();
    let px = start(
        "md5",
        &format!("[[users]]\nname = \"plain\"\npassword = \"{PW}\"\n[[users]]\nname = \"hashed\"\npassword = \"md5{md5_hex}\"\n"),
    );
    assert_eq!(
        try_connect(&px, "plain", "app_as_app", Some(PW)).await,
        Ok("app".into())
    );
    assert_eq!(
        try_connect(&px, "hashed", "app_as_app", Some(PW)).await,
        Ok("app".into())
    );
    assert_eq!(
        try_connect(&px, "hashed", "app_as_app", Some("nope")).await,
        Err("28P01".into())
    );
    assert_eq!(
        try_connect(&px, "ghost", "app_as_app", Some(PW)).await,
        Err("28P01".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_to_clients_still_refuses_unknown_users() {
    let px = start(
        "trust",
        "[[users]]\nname = \"app\"\npassword = \"secret\"\n",
    );
    assert_eq!(try_connect(&px, "app", "app", None).await, Ok("app".into()));
    assert_eq!(
        try_connect(&px, "stranger", "app", None).await,
        Err("28P01".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgmux_logs_in_to_servers_with_each_method() {
    // pg_hba: scram_user scram-sha-256, md5_user md5, pw_user password, app scram, others trust
    let users: String = ["scram_user", "md5_user", "pw_user", "app"]
        .iter()
        .map(|u| format!("[[users]]\nname = \"{u}\"\npassword = \"secret\"\n"))
        .collect::<String>()
        + "[[users]]\nname = \"postgres\"\n";
    let px = start("trust", &users);
    for u in ["scram_user", "md5_user", "pw_user", "app", "postgres"] {
        assert_eq!(
            try_connect(&px, u, "app", None).await,
            Ok(u.to_string()),
            "server login as {u}"
        );
    }
    // a wrong server password: the server's own refusal reaches the client
    let px = start("trust", "[[users]]\nname = \"scram_user\"\npassword = \"not-it\"\n[[users]]\nname = \"md5_user\"\npassword = \"not-it\"\n");
    assert_eq!(
        try_connect(&px, "scram_user", "app", None).await,
        Err("28P01".into())
    );
    assert_eq!(
        try_connect(&px, "md5_user", "app", None).await,
        Err("28P01".into())
    );
}

#[test]
fn psql_with_scram_and_wrong_password() {
    let px = start(
        "scram-sha-256",
        &format!("[[users]]\nname = \"app\"\npassword = \"{PW}\"\n"),
    );
    let run = |pw: &str| {
        std::process::Command::new("psql")
            .arg(px.conn_str("app", "app_as_app", Some(pw)))
            .args(["-X", "-A", "-t", "-c", "SELECT 'in'"])
            .output()
            .unwrap()
    };
    let ok = run(PW);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "in");
    let bad = run("wrong");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("password authentication failed for user \"app\""),
        "{err}"
    );
}
