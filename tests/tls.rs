//! TLS and hba through pgmux (issue 7), against certificates each run generates (rcgen):
//! psql with sslmode=require and verify-full, client certificates for the hba method `cert`,
//! PostgreSQL 17-style direct TLS (ALPN "postgresql"), bytes pipelined after SSLRequest,
//! client_tls_sslmode = require, every hba rule type, and pgmux to a PostgreSQL with ssl=on
//! under each server_tls_sslmode.

mod common;

use common::{PgCluster, Pgmux};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::SslMode;
use tokio_postgres::{NoTls, SimpleQueryMessage};
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
};

const PW: &str = "secret";
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A CA and what it signed, as PEM files in one temp dir.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "pgmux test CA");
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = p.self_signed(&ca_key).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
            ca_key,
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A leaf certificate with this CN and these names; returns (cert PEM, key PEM) and
    /// writes `<file>.crt` and `<file>.key`.
    fn issue(&self, file: &str, cn: &str, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (cert.pem(), key.serialize_pem());
        std::fs::write(self.path(&format!("{file}.crt")), &c).unwrap();
        std::fs::write(self.path(&format!("{file}.key")), &k).unwrap();
        (c, k)
    }

    fn file(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// The CA of pgmux's listener and of client certificates, shared by this binary's tests.
fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let pki = Pki::new();
        pki.issue("pgmux", "pgmux", &["localhost", "127.0.0.1"]);
        pki.issue("client_cert_user", "cert_user", &[]);
        pki.issue("client_other", "someone_else", &[]);
        pki
    })
}

const HBA: &str = "\
# pgmux test rules: first match wins
hostssl all cert_user 127.0.0.1/32 cert
hostnossl all nossl_user 127.0.0.1/32 trust
hostssl all ssl_user 127.0.0.1/32 trust
host all rejected 127.0.0.0/8 reject
host all md5_user 127.0.0.1 255.255.255.255 md5
host all scram_user 127.0.0.1/32 scram-sha-256
host all app ::1/128 trust
host all app 0.0.0.0/0 scram-sha-256
";

/// pgmux with client TLS in `mode`, the test CA for client certificates, and (when `hba`)
/// the rules above.
fn start(mode: &str, hba: bool) -> Pgmux {
    start_with(mode, hba, "")
}

/// [`start`] with more settings for the `[pgmux]` section.
fn start_with(mode: &str, hba: bool, general: &str) -> Pgmux {
    let pg = PgCluster::shared();
    let pki = pki();
    let hba_line = if hba {
        let path = pki.path(&format!("hba-{mode}.conf"));
        std::fs::write(&path, HBA).unwrap();
        format!("auth_hba_file = \"{}\"", path.display())
    } else {
        String::new()
    };
    let mut users = String::new();
    for (name, pw) in [
        ("app", Some(PW)),
        ("md5_user", Some(PW)),
        ("scram_user", Some(PW)),
        ("nossl_user", None),
        ("ssl_user", None),
        ("cert_user", None),
        ("rejected", Some(PW)),
    ] {
        users.push_str(&format!("[[users]]\nname = \"{name}\"\n"));
        if let Some(pw) = pw {
            users.push_str(&format!("password = \"{pw}\"\n"));
        }
    }
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
default_pool_size = 2
auth_type = "scram-sha-256"
client_tls_sslmode = "{mode}"
client_tls_cert_file = "{cert}"
client_tls_key_file = "{key}"
client_tls_ca_file = "{ca}"
{hba_line}
{general}
{users}
[[databases]]
name = "app"
host = "127.0.0.1"
port = {port}
server_user = "app"
server_password = "{PW}"
"#,
        cert = pki.file("pgmux.crt"),
        key = pki.file("pgmux.key"),
        ca = pki.file("ca.pem"),
        port = pg.primary().port
    ))
}

fn psql(conninfo: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-c", sql, conninfo])
        .env_remove("PGSSLMODE")
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn first_value(rows: &[SimpleQueryMessage]) -> String {
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .expect("a row")
}

fn client_config(client_cert: Option<&str>, alpn: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki().path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client_cert {
        Some(name) => {
            let certs = CertificateDer::pem_file_iter(pki().path(&format!("{name}.crt")))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(pki().path(&format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    Arc::new(config)
}

/// Logs in over TLS negotiated by SSLRequest (or directly, `direct`), optionally with a
/// client certificate, and runs `SELECT current_user`. Errors are SQLSTATE: message.
async fn tls_login(
    px: &Pgmux,
    user: &str,
    password: Option<&str>,
    client_cert: Option<&str>,
    direct: bool,
) -> Result<String, String> {
    let mut tcp = TcpStream::connect(("127.0.0.1", px.port)).await.unwrap();
    if !direct {
        tcp.write_all(&SSL_REQUEST).await.unwrap();
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], b'S', "pgmux declined SSLRequest");
    }
    let connector = tokio_rustls::TlsConnector::from(client_config(client_cert, direct));
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut config = tokio_postgres::Config::new();
    config.user(user).dbname("app").ssl_mode(SslMode::Disable);
    if let Some(pw) = password {
        config.password(pw);
    }
    let (client, conn) = config.connect_raw(tls, NoTls).await.map_err(pg_err)?;
    tokio::spawn(conn);
    let rows = client
        .simple_query("SELECT current_user")
        .await
        .map_err(pg_err)?;
    Ok(first_value(&rows))
}

async fn plain_login(px: &Pgmux, user: &str, password: Option<&str>) -> Result<String, String> {
    let (client, conn) = tokio_postgres::connect(&px.conn_str(user, "app", password), NoTls)
        .await
        .map_err(pg_err)?;
    tokio::spawn(conn);
    let rows = client
        .simple_query("SELECT current_user")
        .await
        .map_err(pg_err)?;
    Ok(first_value(&rows))
}

fn pg_err(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

fn conninfo(px: &Pgmux, user: &str, extra: &str) -> String {
    format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={user} dbname=app password={PW} {extra}",
        px.port
    )
}

#[test]
fn psql_with_sslmode_require_and_verify_full() {
    let px = start("require", false);
    let ca = pki().file("ca.pem");
    let info = psql(&conninfo(&px, "app", "sslmode=require"), "\\conninfo").unwrap();
    assert!(info.contains("SSL connection"), "{info}");
    let info = psql(
        &conninfo(&px, "app", &format!("sslmode=verify-full sslrootcert={ca}")),
        "SELECT current_user",
    );
    assert_eq!(info, Ok("app".to_string()));
    // verify-full checks the name: the certificate has none for this one
    let e = psql(
        &format!(
            "host=127.0.0.2 hostaddr=127.0.0.1 port={} user=app dbname=app password={PW} sslmode=verify-full sslrootcert={ca}",
            px.port
        ),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(e.contains("does not match host name"), "{e}");
    // require: a client that does not ask for TLS is refused as PgBouncer refuses it
    let e = psql(&conninfo(&px, "app", "sslmode=disable"), "SELECT 1").unwrap_err();
    assert!(e.contains("SSL required"), "{e}");
}

#[test]
fn scram_with_channel_binding_over_tls() {
    // libpq with channel_binding=require picks SCRAM-SHA-256-PLUS and checks that pgmux bound
    // the exchange to the certificate it presented: a wrong hash on pgmux's side fails it
    let px = start("prefer", false);
    let ca = pki().file("ca.pem");
    let bound = format!("sslmode=verify-full sslrootcert={ca} channel_binding=require");
    assert_eq!(
        psql(&conninfo(&px, "app", &bound), "SELECT current_user"),
        Ok("app".to_string())
    );
    // a wrong password still fails under binding
    let e = psql(
        &format!(
            "host=localhost hostaddr=127.0.0.1 port={} user=app dbname=app password=wrong {bound}",
            px.port
        ),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(e.contains("password authentication failed"), "{e}");
    // without TLS there is nothing to bind to: libpq refuses to go on
    let e = psql(
        &conninfo(&px, "app", "sslmode=disable channel_binding=require"),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(e.contains("channel binding"), "{e}");
    // and clients that do not ask for binding are served as before
    assert_eq!(
        psql(
            &conninfo(&px, "app", "sslmode=require channel_binding=disable"),
            "SELECT current_user"
        ),
        Ok("app".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_is_served() {
    let px = start("prefer", false);
    assert_eq!(
        tls_login(&px, "app", Some(PW), None, true).await,
        Ok("app".to_string())
    );
    // the same client negotiating with SSLRequest, and a plain one, are served too
    assert_eq!(
        tls_login(&px, "app", Some(PW), None, false).await,
        Ok("app".to_string())
    );
    assert_eq!(plain_login(&px, "app", Some(PW)).await, Ok("app".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_without_alpn_is_refused() {
    let px = start("prefer", false);
    let tcp = TcpStream::connect(("127.0.0.1", px.port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(None, false));
    // the handshake itself completes; pgmux then closes without reading a startup packet
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{rest:?}");
    // the log line may be written just after the socket closes
    common::wait_until(
        "the refusal is logged",
        std::time::Duration::from_secs(20),
        || px.log().contains("ALPN"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pipelined_after_ssl_request_are_refused() {
    let px = start("prefer", false);
    let mut tcp = TcpStream::connect(("127.0.0.1", px.port)).await.unwrap();
    // SSLRequest and a StartupMessage in one write: the startup must not be taken as if it
    // had come through TLS
    let mut startup = vec![0, 0, 0, 0, 0, 3, 0, 0];
    startup.extend_from_slice(b"user\0app\0database\0app\0\0");
    let len = startup.len() as u32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    let mut out = SSL_REQUEST.to_vec();
    out.extend_from_slice(&startup);
    tcp.write_all(&out).await.unwrap();
    let mut reply = Vec::new();
    tcp.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.contains("received unencrypted data after SSL request"),
        "{text}"
    );
    assert!(text.contains("08P01"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_for_method_cert() {
    let px = start("prefer", true);
    assert_eq!(
        tls_login(&px, "cert_user", None, Some("client_cert_user"), false).await,
        Ok("app".to_string())
    );
    // direct TLS with the certificate works the same
    assert_eq!(
        tls_login(&px, "cert_user", None, Some("client_cert_user"), true).await,
        Ok("app".to_string())
    );
    let e = tls_login(&px, "cert_user", None, Some("client_other"), false)
        .await
        .unwrap_err();
    assert_eq!(
        e,
        "28000: certificate authentication failed for user \"cert_user\""
    );
    let e = tls_login(&px, "cert_user", None, None, false)
        .await
        .unwrap_err();
    assert!(
        e.starts_with("28000: certificate authentication failed"),
        "{e}"
    );
    // hostssl only: without TLS no line matches
    let e = plain_login(&px, "cert_user", None).await.unwrap_err();
    assert_eq!(
        e,
        "28000: no pg_hba.conf entry for host \"127.0.0.1\", user \"cert_user\", database \"app\", no encryption"
    );
}

/// Runs openssl with `args` in the test's PKI directory.
fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(pki().dir.path())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An X.509 v1 certificate `STEM.crt` (and `STEM.key`) for `cn`, signed by the test CA the
/// way `openssl x509 -req` signs by default (PostgreSQL's manual recipe): no extensions.
/// Tests run in parallel in one PKI directory: each call has its own copy of the CA's key
/// and its own serial file (a shared `ca.srl` was read by one openssl while another wrote it).
fn v1_cert(stem: &str, cn: &str) {
    let pki = pki();
    let ca_key = format!("{stem}-ca.key");
    std::fs::write(pki.path(&ca_key), pki.ca_key.serialize_pem()).unwrap();
    let (key, csr, crt, serial) = (
        format!("{stem}.key"),
        format!("{stem}.csr"),
        format!("{stem}.crt"),
        format!("{stem}.srl"),
    );
    let subject = format!("/CN={cn}");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &key,
        "-subj",
        &subject,
        "-out",
        &csr,
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.pem",
        "-CAkey",
        &ca_key,
        "-CAserial",
        &serial,
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        &crt,
    ]);
}

/// libpq sends ~/.postgresql/postgresql.crt whatever the hba method, and such files are often
/// X.509 v1 (`openssl x509 -req` without extensions) or from another CA. A user who needs no
/// certificate gets in with one (rustls' webpki cannot read v1: the handshake used to fail);
/// none of them names anyone for the method `cert`; and the reasons reach the log.
#[test]
fn a_certificate_that_does_not_verify_is_ignored_and_logged() {
    let pki = pki();
    v1_cert("v1", "cert_user");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "foreign.key",
        "-subj",
        "/CN=cert_user",
        "-days",
        "2",
        "-out",
        "foreign.crt",
    ]);
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in", &pki.file("v1.crt")])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("Version: 1 "),
        "openssl did not make a v1 certificate"
    );
    let px = start("prefer", true);
    for name in ["v1", "foreign"] {
        {
            // libpq refuses a client key that others may read
            use std::os::unix::fs::PermissionsExt;
            let perms = std::fs::Permissions::from_mode(0o600);
            std::fs::set_permissions(pki.path(&format!("{name}.key")), perms).unwrap();
        }
        let with_cert = |user: &str| {
            conninfo(
                &px,
                user,
                &format!(
                    "sslmode=require sslcert={} sslkey={}",
                    pki.file(&format!("{name}.crt")),
                    pki.file(&format!("{name}.key"))
                ),
            )
        };
        assert_eq!(
            psql(&with_cert("md5_user"), "SELECT 1"),
            Ok("1".into()),
            "{name}"
        );
        let e = psql(&with_cert("cert_user"), "SELECT 1").unwrap_err();
        assert!(
            e.contains("certificate authentication failed for user \"cert_user\""),
            "{name}: {e}"
        );
    }
    let log = px.log();
    assert!(log.contains("client certificate not accepted"), "{log}");
    // a handshake the client gives up (it does not trust pgmux's certificate) is logged too
    let e = psql(
        &conninfo(
            &px,
            "md5_user",
            &format!("sslmode=verify-ca sslrootcert={}", pki.file("foreign.crt")),
        ),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(e.contains("certificate verify failed"), "{e}");
    common::wait_until(
        "the failed handshake logged",
        Duration::from_secs(10),
        || px.log().contains("TLS handshake failed"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hba_rule_type() {
    let px = start("prefer", true);
    // hostnossl
    assert_eq!(plain_login(&px, "nossl_user", None).await, Ok("app".into()));
    let e = tls_login(&px, "nossl_user", None, None, false)
        .await
        .unwrap_err();
    assert_eq!(
        e,
        "28000: no pg_hba.conf entry for host \"127.0.0.1\", user \"nossl_user\", database \"app\", SSL encryption"
    );
    // hostssl
    assert_eq!(
        tls_login(&px, "ssl_user", None, None, false).await,
        Ok("app".into())
    );
    assert!(plain_login(&px, "ssl_user", None)
        .await
        .unwrap_err()
        .starts_with("28000: no pg_hba.conf entry"));
    // reject
    let e = plain_login(&px, "rejected", Some(PW)).await.unwrap_err();
    assert_eq!(
        e,
        "28000: pg_hba.conf rejects connection for host \"127.0.0.1\", user \"rejected\", database \"app\", no encryption"
    );
    // md5 (address with a mask) and scram-sha-256, each with right and wrong passwords
    for user in ["md5_user", "scram_user"] {
        assert_eq!(plain_login(&px, user, Some(PW)).await, Ok("app".into()));
        let e = plain_login(&px, user, Some("wrong")).await.unwrap_err();
        assert!(e.starts_with("28P01"), "{user}: {e}");
    }
    // host: the ::1 trust line does not match an IPv4 client; the catch-all asks for SCRAM
    assert!(plain_login(&px, "app", None).await.is_err());
    assert_eq!(plain_login(&px, "app", Some(PW)).await, Ok("app".into()));
    // no line at all
    let e = plain_login(&px, "nobody", Some(PW)).await.unwrap_err();
    assert!(e.starts_with("28000: no pg_hba.conf entry"), "{e}");
}

/// The server side: a PostgreSQL with ssl=on and a certificate for "localhost" only, from a CA
/// of its own. Runs on this binary's shared cluster, so the other tests reach it with TLS
/// too (server_tls_sslmode defaults to prefer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_modes() {
    let pg = PgCluster::shared();
    let server_pki = Pki::new();
    let (cert, key) = server_pki.issue("server", "localhost", &["localhost"]);
    pg.primary().enable_ssl(&cert, &key);
    let other_ca = Pki::new();
    let port = pg.primary().port;
    let db = |name: &str, host: &str| {
        format!(
            "[[databases]]\nname = \"{name}\"\ndbname = \"app\"\nhost = \"{host}\"\nport = {port}\nserver_user = \"app\"\nserver_password = \"{PW}\"\n"
        )
    };
    let config = |mode: &str, ca: &Path, dbs: &[(&str, &str)]| {
        let mut c = format!(
            "[pgmux]\nlisten_port = {{port}}\nauth_type = \"trust\"\nserver_tls_sslmode = \"{mode}\"\nserver_tls_ca_file = \"{}\"\n[[users]]\nname = \"app\"\n",
            ca.display()
        );
        for (name, host) in dbs {
            c.push_str(&db(name, host));
        }
        c
    };
    let ssl_query = "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let run = |px: &Pgmux, db: &str| {
        let info = format!(
            "host=127.0.0.1 port={} user=app dbname={db} sslmode=disable",
            px.port
        );
        psql(&info, ssl_query)
    };

    let full = Pgmux::start(&config(
        "verify-full",
        &server_pki.path("ca.pem"),
        &[("by_name", "localhost"), ("by_address", "127.0.0.1")],
    ));
    assert_eq!(run(&full, "by_name"), Ok("true".into()));
    // an idle TLS server connection the server ends is noticed (is_broken) and replaced
    let pid = psql(
        &format!(
            "host=127.0.0.1 port={} user=app dbname=by_name sslmode=disable",
            full.port
        ),
        "SELECT pg_backend_pid()",
    )
    .unwrap();
    pg.primary().psql(
        "postgres",
        &format!("SELECT pg_terminate_backend({pid}, 30000)"),
    );
    assert_eq!(run(&full, "by_name"), Ok("true".into()));
    let pid_after = psql(
        &format!(
            "host=127.0.0.1 port={} user=app dbname=by_name sslmode=disable",
            full.port
        ),
        "SELECT pg_backend_pid()",
    )
    .unwrap();
    assert_ne!(pid, pid_after);
    // verify-full: the certificate does not name 127.0.0.1
    let e = run(&full, "by_address").unwrap_err();
    assert!(
        e.contains("certificate not valid for name \"127.0.0.1\""),
        "{e}"
    );

    // prefer, and the server's pg_hba.conf takes this user in plain text only: the login
    // over TLS is refused, and pgmux tries again in plain text, as libpq does
    let hba = pg.primary().data_dir.join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    let nossl = "hostnossl all nossl_srv 127.0.0.1/32 trust\n\
        hostssl all nossl_srv 127.0.0.1/32 reject\n\
        hostssl all tls_pw_srv 127.0.0.1/32 scram-sha-256\n\
        hostnossl all tls_pw_srv 127.0.0.1/32 reject\n";
    std::fs::write(&hba, format!("{nossl}{rules}")).unwrap();
    pg.primary().psql("postgres", "CREATE ROLE nossl_srv LOGIN");
    pg.primary()
        .psql("postgres", "CREATE ROLE tls_pw_srv LOGIN PASSWORD 'right'");
    pg.primary().psql("postgres", "SELECT pg_reload_conf()");
    let nossl_db = |mode: &str| {
        config(
            mode,
            &server_pki.path("ca.pem"),
            &[("plain_only", "127.0.0.1")],
        )
        .replace("server_user = \"app\"", "server_user = \"nossl_srv\"")
    };
    let preferred = Pgmux::start(&nossl_db("prefer"));
    common::wait_until("pg_hba.conf reloaded", Duration::from_secs(30), || {
        run(&preferred, "plain_only") == Ok("false".into())
    });
    let required = Pgmux::start(&nossl_db("require"));
    let e = run(&required, "plain_only").unwrap_err();
    assert!(e.contains("pg_hba.conf rejects connection"), "{e}");
    // a wrong password over TLS, and plain text refused: both reasons reach the client
    let wrong_pw = Pgmux::start(
        &nossl_db("prefer")
            .replace(
                "server_user = \"nossl_srv\"",
                "server_user = \"tls_pw_srv\"",
            )
            .replace(
                &format!("server_password = \"{PW}\""),
                "server_password = \"wrong\"",
            ),
    );
    let e = run(&wrong_pw, "plain_only").unwrap_err();
    assert!(e.contains("password authentication failed"), "{e}");

    let ca_only = Pgmux::start(&config(
        "verify-ca",
        &server_pki.path("ca.pem"),
        &[("by_address", "127.0.0.1")],
    ));
    assert_eq!(run(&ca_only, "by_address"), Ok("true".into()));

    // a CA that did not sign the server's certificate fails verify-ca, not require
    let wrong = Pgmux::start(&config(
        "verify-ca",
        &other_ca.path("ca.pem"),
        &[("by_name", "localhost")],
    ));
    let e = run(&wrong, "by_name").unwrap_err();
    assert!(e.contains("invalid peer certificate"), "{e}");
    let require = Pgmux::start(&config(
        "require",
        &other_ca.path("ca.pem"),
        &[("by_name", "localhost")],
    ));
    assert_eq!(run(&require, "by_name"), Ok("true".into()));
    let disable = Pgmux::start(&config(
        "disable",
        &other_ca.path("ca.pem"),
        &[("by_name", "localhost")],
    ));
    assert_eq!(run(&disable, "by_name"), Ok("false".into()));
    // TLS made stricter by a reload: the plaintext server in the pool is not used again
    let stricter = config(
        "verify-full",
        &server_pki.path("ca.pem"),
        &[("by_name", "localhost")],
    )
    .replace("{port}", &disable.port.to_string());
    std::fs::write(&disable.config_path, stricter).unwrap();
    disable.signal(libc::SIGHUP);
    common::wait_until("the reload", std::time::Duration::from_secs(30), || {
        disable.log().contains("configuration reloaded")
    });
    assert_eq!(run(&disable, "by_name"), Ok("true".into()));

    // cancels follow the server connection's encryption: a relay in front of PostgreSQL
    // records how every connection pgmux opens begins (the login and the cancel)
    let (relay_port, firsts) = recording_relay(port, false).await;
    let via = Pgmux::start(&format!(
        "[pgmux]\nlisten_port = {{port}}\nauth_type = \"trust\"\nserver_tls_sslmode = \"require\"\n[[users]]\nname = \"app\"\n{}",
        db("relayed", "127.0.0.1").replace(&format!("port = {port}"), &format!("port = {relay_port}"))
    ));
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user=app dbname=relayed", via.port),
        NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    common::wait_until("the sleep to run", Duration::from_secs(30), || {
        pg.primary().psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
        ) == "1"
    });
    token.cancel_query(NoTls).await.unwrap();
    let e = sleeper.await.unwrap().unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    let firsts = firsts.lock().unwrap().clone();
    assert!(firsts.len() >= 2, "login and cancel: {firsts:?}");
    assert!(
        firsts.iter().all(|f| *f == SSL_REQUEST),
        "every connection to the server starts with SSLRequest: {firsts:?}"
    );

    // prefer, and a TLS handshake that fails: the connection is made again in plain text
    let (broken_port, firsts) = recording_relay(port, true).await;
    let broken = |mode: &str| {
        format!(
            "[pgmux]\nlisten_port = {{port}}\nauth_type = \"trust\"\nserver_tls_sslmode = \"{mode}\"\n[[users]]\nname = \"app\"\n{}",
            db("broken", "127.0.0.1").replace(&format!("port = {port}"), &format!("port = {broken_port}"))
        )
    };
    let preferred = Pgmux::start(&broken("prefer"));
    assert_eq!(run(&preferred, "broken"), Ok("false".into()));
    let firsts = firsts.lock().unwrap().clone();
    assert_eq!(firsts.first(), Some(&SSL_REQUEST), "{firsts:?}");
    assert!(
        firsts.len() >= 2 && firsts[1] != SSL_REQUEST,
        "then plain text: {firsts:?}"
    );
    let required = Pgmux::start(&broken("require"));
    assert!(run(&required, "broken").is_err());
}

/// A TCP relay to `port` that records the first 8 bytes of each connection it accepts.
/// With `break_tls`, an SSLRequest is answered `S` and then with bytes that are not TLS, as
/// a server whose TLS is broken would.
async fn recording_relay(port: u16, break_tls: bool) -> (u16, Arc<std::sync::Mutex<Vec<[u8; 8]>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    let firsts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = firsts.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 8];
                if inbound.read_exact(&mut first).await.is_err() {
                    return;
                }
                seen.lock().unwrap().push(first);
                if break_tls && first == SSL_REQUEST {
                    let _ = inbound.write_all(b"Snot a TLS handshake\n").await;
                    return;
                }
                let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", port)).await else {
                    return;
                };
                if outbound.write_all(&first).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (relay_port, firsts)
}

/// A server whose certificate is X.509 v1, made by PostgreSQL's manual recipe (`openssl x509
/// -req`), which webpki cannot read: under prefer and require (nothing is verified) pgmux
/// connects over TLS, as libpq does.
#[test]
fn a_server_with_an_x509_v1_certificate_under_require() {
    let pki = pki();
    v1_cert("server-v1", "localhost");
    let pg = PgCluster::start(0);
    pg.primary().enable_ssl(
        &std::fs::read_to_string(pki.path("server-v1.crt")).unwrap(),
        &std::fs::read_to_string(pki.path("server-v1.key")).unwrap(),
    );
    for mode in ["prefer", "require"] {
        let px = Pgmux::start(&format!(
            "[pgmux]\nlisten_port = {{port}}\nauth_type = \"trust\"\nserver_tls_sslmode = \"{mode}\"\n\
             [[users]]\nname = \"app\"\n[[databases]]\nname = \"v1\"\ndbname = \"app\"\n\
             host = \"127.0.0.1\"\nport = {}\nserver_user = \"app\"\nserver_password = \"{PW}\"\n",
            pg.primary().port
        ));
        let info = format!(
            "host=127.0.0.1 port={} user=app dbname=v1 sslmode=disable",
            px.port
        );
        assert_eq!(
            psql(
                &info,
                "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ),
            Ok("true".into()),
            "{mode}"
        );
    }
}

/// A TLS connection to pgmux (by SSLRequest) that a client speaks through the returned
/// stream, and a sender that ends it as a TLS client closes: close_notify, then FIN.
async fn tls_pipe(px: &Pgmux) -> (tokio::io::DuplexStream, tokio::sync::oneshot::Sender<()>) {
    let mut tcp = TcpStream::connect(("127.0.0.1", px.port)).await.unwrap();
    tcp.write_all(&SSL_REQUEST).await.unwrap();
    let mut b = [0u8; 1];
    tcp.read_exact(&mut b).await.unwrap();
    assert_eq!(b[0], b'S', "pgmux declined SSLRequest");
    let tls = tokio_rustls::TlsConnector::from(client_config(None, false))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (close, closed) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut tls_r, mut tls_w) = tokio::io::split(tls);
        let (mut r, mut w) = tokio::io::split(theirs);
        tokio::select! {
            _ = tokio::io::copy(&mut tls_r, &mut w) => {}
            _ = tokio::io::copy(&mut r, &mut tls_w) => {}
            _ = closed => {}
        }
        let _ = tls_r.unsplit(tls_w).shutdown().await;
    });
    (ours, close)
}

/// A TLS client that closes cleanly (close_notify, then FIN) while its query waits for a
/// server leaves the line at once, as a plain one does: the close_notify it sent, which pgmux
/// has not read, is not taken for more of its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_tls_client_that_closes_leaves_the_line() {
    let px = start_with("prefer", false, "admin_users = [\"app\"]");
    let console = common::probe::Console::connect(&px, "app", Some(PW)).await;
    let waiting = |n: i64| {
        let console = &console;
        async move {
            console
                .pool("app")
                .await
                .is_some_and(|p| p["cl_waiting"] == n)
        }
    };
    // the pool's two servers held in transactions
    let mut holders = Vec::new();
    for _ in 0..2 {
        let (c, conn) = tokio_postgres::connect(&px.conn_str("app", "app", Some(PW)), NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.simple_query("BEGIN; SELECT 1").await.unwrap();
        holders.push(c);
    }
    let (stream, close) = tls_pipe(&px).await;
    let mut config = tokio_postgres::Config::new();
    config
        .user("app")
        .dbname("app")
        .password(PW)
        .ssl_mode(SslMode::Disable);
    let (client, conn) = config.connect_raw(stream, NoTls).await.unwrap();
    tokio::spawn(conn);
    let query = tokio::spawn(async move { client.simple_query("SELECT 1").await });
    common::wait_until_async("the TLS client in line", Duration::from_secs(30), || {
        waiting(1)
    })
    .await;
    close.send(()).unwrap();
    common::wait_until_async(
        "the TLS client out of line",
        Duration::from_secs(30),
        || waiting(0),
    )
    .await;
    assert!(
        query.await.unwrap().is_err(),
        "the query of a client that left was answered"
    );
    for c in &holders {
        c.simple_query("COMMIT").await.unwrap();
    }
    let p = console.wait_idle("app", 2).await;
    assert_eq!(p["sv_active"], 0, "{p:?}");
}
