//! auth_query end to end: users who are not in pgmux's config, looked up on the server as
//! auth_user. The server's pg_hba demands SCRAM (or md5) from these roles, and pgmux is never
//! given their passwords: it verifies each client against the stored secret, and logs in to
//! the server with the ClientKey the client proved (SCRAM) or the stored md5 hash.

mod common;

use common::{PgCluster, Pgmux};
use tokio_postgres::NoTls;

fn start(extra_general: &str, auth_user: &str, auth_pw: &str) -> Pgmux {
    let pg = PgCluster::shared();
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
default_pool_size = 2
auth_type = "md5"
auth_user = "{auth_user}"
{extra_general}
[[users]]
name = "{auth_user}"
password = "{auth_pw}"
[[databases]]
name = "pg"
dbname = "postgres"
host = "127.0.0.1"
port = {port}
"#,
        port = pg.primary().port
    ))
}

fn roles() -> &'static PgCluster {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let pg = PgCluster::shared();
    ONCE.call_once(|| {
        // TLS on the server: pgmux's default server_tls_sslmode (prefer) then uses it, and
        // binds its SCRAM logins to the server's certificate (SCRAM-SHA-256-PLUS)
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        pg.primary()
            .enable_ssl(&cert.cert.pem(), &cert.key_pair.serialize_pem());
        pg.create_role("aq_auth", "auth-pw", "scram-sha-256");
        pg.create_role("aq_scram", "scram-pw", "scram-sha-256");
        pg.create_role("aq_md5", "md5-pw", "md5");
        pg.create_role("aq_expired", "expired-pw", "scram-sha-256");
        pg.create_role("aq_lookup", "lookup-pw", "scram-sha-256");
        pg.primary().psql(
            "postgres",
            "ALTER ROLE aq_auth SUPERUSER; \
             ALTER ROLE aq_expired VALID UNTIL '2001-01-01'; \
             CREATE OR REPLACE FUNCTION public.pgmux_lookup(u text, OUT usename name, OUT passwd text) \
               RETURNS record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS \
               $$ SELECT usename, passwd FROM pg_shadow \
                  WHERE usename = u AND (valuntil IS NULL OR valuntil > now()) $$; \
             REVOKE ALL ON FUNCTION public.pgmux_lookup(text) FROM public; \
             GRANT EXECUTE ON FUNCTION public.pgmux_lookup(text) TO aq_lookup;",
        );
    });
    pg
}

/// `current_user` as the server saw it, or the SQLSTATE of the refusal.
async fn whoami(px: &Pgmux, user: &str, pw: &str) -> Result<String, String> {
    let (c, conn) = tokio_postgres::connect(&px.conn_str(user, "pg", Some(pw)), NoTls)
        .await
        .map_err(|e| sqlstate(&e))?;
    tokio::spawn(conn);
    let row = c
        .query_one("SELECT current_user::text", &[])
        .await
        .map_err(|e| sqlstate(&e))?;
    Ok(row.get(0))
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_user_logs_in_end_to_end_without_pgmux_knowing_the_password() {
    let pg = roles();
    let px = start("", "aq_auth", "auth-pw");
    assert_eq!(
        whoami(&px, "aq_scram", "scram-pw").await,
        Ok("aq_scram".into())
    );
    assert_eq!(whoami(&px, "aq_scram", "wrong").await, Err("28P01".into()));

    // several clients at once in transactions: the pool opens more server connections, each
    // a SCRAM login (the server's pg_hba demands it) with the key the first client proved.
    // aq_pool is this test's own role, so no other test's connections are counted.
    pg.create_role("aq_pool", "pool-pw", "scram-sha-256");
    let mut held = Vec::new();
    for _ in 0..2 {
        let (c, conn) =
            tokio_postgres::connect(&px.conn_str("aq_pool", "pg", Some("pool-pw")), NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        held.push(c);
    }
    let backends = pg.primary().psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'aq_pool'",
    );
    assert_eq!(backends, "2", "two server connections logged in as aq_pool");
    let over_tls = pg.primary().psql(
        "postgres",
        "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.usename = 'aq_pool'",
    );
    assert_eq!(over_tls, "t", "SCRAM-SHA-256-PLUS logins over TLS");
    for c in &held {
        c.batch_execute("COMMIT").await.unwrap();
    }

    // psql (libpq) too
    let out = std::process::Command::new("psql")
        .arg(px.conn_str("aq_scram", "pg", Some("scram-pw")))
        .args(["-X", "-A", "-t", "-c", "SELECT session_user"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "aq_scram");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_user_expired_role_and_unknown_user() {
    roles();
    let px = start("", "aq_auth", "auth-pw");
    assert_eq!(whoami(&px, "aq_md5", "md5-pw").await, Ok("aq_md5".into()));
    assert_eq!(whoami(&px, "aq_md5", "wrong").await, Err("28P01".into()));
    // VALID UNTIL in the past: no row from the lookup, refused like a wrong password
    assert_eq!(
        whoami(&px, "aq_expired", "expired-pw").await,
        Err("28P01".into())
    );
    assert_eq!(whoami(&px, "aq_nobody", "x").await, Err("28P01".into()));
    // an unknown database is not looked up in: it is named as the reason, as PgBouncer
    // does, not taken for a wrong password
    let e = tokio_postgres::connect(&px.conn_str("aq_md5", "nodb", Some("md5-pw")), NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("3D000"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprivileged_auth_user_through_a_security_definer_function() {
    roles();
    let px = start(
        r#"auth_query = "SELECT usename, passwd FROM public.pgmux_lookup($1)""#,
        "aq_lookup",
        "lookup-pw",
    );
    assert_eq!(
        whoami(&px, "aq_scram", "scram-pw").await,
        Ok("aq_scram".into())
    );
    assert_eq!(whoami(&px, "aq_md5", "md5-pw").await, Ok("aq_md5".into()));
    // the function gives a row of NULLs for an expired role: refused
    assert_eq!(
        whoami(&px, "aq_expired", "expired-pw").await,
        Err("28P01".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_lookup_is_a_clear_error_not_a_password_failure() {
    roles();
    // auth_user's own login fails (wrong password in the config)
    let px = start("", "aq_auth", "not-the-password");
    assert_eq!(
        whoami(&px, "aq_scram", "scram-pw").await,
        Err("08006".into())
    );
    // a query the server rejects
    let px = start(
        r#"auth_query = "SELECT usename, passwd FROM no_such_table WHERE usename = $1""#,
        "aq_auth",
        "auth-pw",
    );
    assert_eq!(
        whoami(&px, "aq_scram", "scram-pw").await,
        Err("08006".into())
    );
    assert!(px.log().contains("auth_query failed"), "{}", px.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_password_is_picked_up() {
    let pg = roles();
    pg.create_role("aq_rotating", "first-pw", "scram-sha-256");
    let px = start("auth_cache_ttl = 3600", "aq_auth", "auth-pw");
    assert_eq!(
        whoami(&px, "aq_rotating", "first-pw").await,
        Ok("aq_rotating".into())
    );
    pg.create_role("aq_rotating", "second-pw", "scram-sha-256");
    // the cached verifier refuses the new password once, which drops the cache entry; the
    // next login looks the role up again, and servers are logged in to with the new key
    assert_eq!(
        whoami(&px, "aq_rotating", "second-pw").await,
        Err("28P01".into())
    );
    assert_eq!(
        whoami(&px, "aq_rotating", "second-pw").await,
        Ok("aq_rotating".into())
    );
    assert_eq!(
        whoami(&px, "aq_rotating", "first-pw").await,
        Err("28P01".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_scram_verifier_logs_in_to_a_scram_server() {
    // no auth_query here: the [[users]] entry holds the verifier copied from pg_authid, as
    // PgBouncer's auth_file may; the first client's proof gives pgmux the key for servers
    let pg = roles();
    let verifier = pg.primary().psql(
        "postgres",
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'aq_scram'",
    );
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let px = Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "scram-sha-256"
[[users]]
name = "aq_scram"
password = "{verifier}"
[[databases]]
name = "pg"
dbname = "postgres"
host = "127.0.0.1"
port = {port}
"#,
        port = pg.primary().port
    ));
    assert_eq!(whoami(&px, "aq_scram", "wrong").await, Err("28P01".into()));
    assert_eq!(
        whoami(&px, "aq_scram", "scram-pw").await,
        Ok("aq_scram".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_role_on_two_clusters_keeps_each_clusters_key() {
    // two [[databases]] on two clusters where the same role has different passwords: what a
    // client of one teaches pgmux must not become the other's server login
    let pg = roles();
    let other = PgCluster::start(0);
    pg.create_role("aq_twin", "twin-one", "scram-sha-256");
    other.create_role("aq_twin", "twin-two", "scram-sha-256");
    other.create_role("aq_auth", "auth-pw", "scram-sha-256");
    other
        .primary()
        .psql("postgres", "ALTER ROLE aq_auth SUPERUSER");
    let px = Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
default_pool_size = 2
auth_type = "scram-sha-256"
auth_user = "aq_auth"
[[users]]
name = "aq_auth"
password = "auth-pw"
[[databases]]
name = "one"
dbname = "postgres"
host = "127.0.0.1"
port = {}
[[databases]]
name = "two"
dbname = "postgres"
host = "127.0.0.1"
port = {}
"#,
        pg.primary().port,
        other.primary().port
    ));
    let connect = |db: &'static str, pw: &'static str| {
        let s = px.conn_str("aq_twin", db, Some(pw));
        async move {
            let (c, conn) = tokio_postgres::connect(&s, NoTls).await.unwrap();
            tokio::spawn(conn);
            c
        }
    };
    let one = connect("one", "twin-one").await;
    one.simple_query("SELECT 1").await.unwrap();
    let two = connect("two", "twin-two").await;
    two.simple_query("SELECT 1").await.unwrap();
    // `one` now needs two server connections at once: the second is a new SCRAM login to the
    // first cluster, which only the first cluster's key passes
    one.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let one_more = connect("one", "twin-one").await;
    let row = one_more
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "aq_twin");
    one.batch_execute("COMMIT").await.unwrap();
}
