//! Hostile and broken clients on a raw socket: each gets a clear ErrorResponse (where the
//! protocol allows) and is closed, no server connection leaks, and a well-behaved client
//! running alongside is never disturbed.

mod common;

use common::{wait_until, PgCluster, Pgmux};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn start(db: &str, auth: &str) -> Pgmux {
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "{auth}"
default_pool_size = 1
query_wait_timeout = 10
max_message_size = 4096
auth_timeout = 0.5
[[users]]
name = "app"
password = "secret"
[[users]]
name = "trusty"
[[databases]]
name = "{db}"
host = "127.0.0.1"
port = {}
server_user = "postgres"
"#,
        pg.primary().port
    ))
}

fn raw(px: &Pgmux) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", px.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn startup(params: &[(&str, &str)], version: u32) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Every message until pgmux closes the connection.
fn read_all(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut data = Vec::new();
    let _ = s.read_to_end(&mut data);
    let mut out = Vec::new();
    let mut rest = &data[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if rest.len() < len + 1 {
            break;
        }
        out.push((rest[0], rest[5..len + 1].to_vec()));
        rest = &rest[len + 1..];
    }
    out
}

fn read_msg(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).unwrap();
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).unwrap();
    (head[0], body)
}

/// The SQLSTATE of the first ErrorResponse.
fn error_code(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'E')?;
    body.split(|&b| b == 0)
        .find(|f| f.first() == Some(&b'C'))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
}

struct ErrorText {
    severity: String,
    message: String,
    /// How many fields the body holds, read as a client does (up to the NUL that ends them).
    fields: usize,
}

/// The first ErrorResponse's message and field count.
fn error_fields(msgs: &[(u8, Vec<u8>)]) -> ErrorText {
    let (_, body) = msgs
        .iter()
        .find(|(t, _)| *t == b'E')
        .expect("an ErrorResponse");
    let mut out = ErrorText {
        severity: String::new(),
        message: String::new(),
        fields: 0,
    };
    for f in body.split(|&b| b == 0).take_while(|f| !f.is_empty()) {
        out.fields += 1;
        let text = String::from_utf8_lossy(&f[1..]).into_owned();
        match f[0] {
            b'M' => out.message = text,
            b'S' => out.severity = text,
            _ => {}
        }
    }
    out
}

fn refused_with(px: &Pgmux, bytes: &[u8]) -> Option<String> {
    let mut s = raw(px);
    let _ = s.write_all(bytes);
    error_code(&read_all(&mut s))
}

/// Logs in as the trusted user; returns the stream after the first ReadyForQuery.
fn logged_in(px: &Pgmux, db: &str) -> TcpStream {
    let mut s = raw(px);
    s.write_all(&startup(&[("user", "trusty"), ("database", db)], 196608))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed during login: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() >= 6 && buf[buf.len() - 6] == b'Z' {
            return s;
        }
    }
}

/// A well-behaved client keeps working the whole time.
fn bystander(px: &Pgmux, db: &str) -> std::thread::JoinHandle<()> {
    let url = px.conn_str("app", db, Some("secret"));
    let stop_file = px.config_path.with_extension("stop");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut n = 0u64;
            while !stop_file.exists() || n < 10 {
                let r = c.simple_query("SELECT 1").await.expect("bystander query");
                assert!(!r.is_empty());
                n += 1;
            }
        })
    })
}

#[test]
fn bad_startups_are_refused_with_clear_errors() {
    let db = "badstart";
    let px = start(db, "trust");
    // a wrong port or protocol: HTTP instead of a startup packet
    assert_eq!(
        refused_with(&px, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").as_deref(),
        Some("08P01")
    );
    assert_eq!(
        refused_with(&px, &startup(&[("database", db)], 196608)).as_deref(),
        Some("28000")
    );
    // another major version: PostgreSQL's feature_not_supported and its words, whether the
    // packet comes first or after declined encryption requests (the third is declined by the
    // login, which reads the packet after it)
    for (version, text) in [
        (
            4 << 16,
            "unsupported frontend protocol 4.0: server supports 3.0 to 3.0",
        ),
        (
            2 << 16,
            "unsupported frontend protocol 2.0: server supports 3.0 to 3.0",
        ),
    ] {
        for requests in [0, 1, 3] {
            let mut s = raw(&px);
            for code in [80877104u32, 80877103, 80877103].into_iter().take(requests) {
                let mut req = 8u32.to_be_bytes().to_vec();
                req.extend(code.to_be_bytes());
                s.write_all(&req).unwrap();
                let mut answer = [0u8; 1];
                s.read_exact(&mut answer).unwrap();
                assert_eq!(&answer, b"N");
            }
            s.write_all(&startup(&[("user", "trusty"), ("database", db)], version))
                .unwrap();
            let msgs = read_all(&mut s);
            assert_eq!(
                error_code(&msgs).as_deref(),
                Some("0A000"),
                "after {requests} requests: {msgs:?}"
            );
            let e = error_fields(&msgs);
            assert_eq!((e.severity.as_str(), e.message.as_str()), ("FATAL", text));
        }
    }
    let mut huge = 20_000u32.to_be_bytes().to_vec();
    huge.extend(vec![0u8; 19_996]);
    assert_eq!(refused_with(&px, &huge).as_deref(), Some("08P01"));
    let mut unterminated = startup(&[("user", "trusty")], 196608);
    unterminated.pop();
    assert_eq!(refused_with(&px, &unterminated).as_deref(), Some("08P01"));
    // a password message before any challenge, and a SASL response naming another mechanism
    let scram = start(db, "scram-sha-256");
    let mut early = startup(&[("user", "app"), ("database", db)], 196608);
    early.extend(msg(b'p', b"garbage"));
    assert_eq!(refused_with(&scram, &early).as_deref(), Some("08P01"));
    let mut other_mech = startup(&[("user", "app"), ("database", db)], 196608);
    other_mech.extend(msg(b'p', b"SCRAM-SHA-256-PLUS\0\0\0\0\x04n,,x"));
    assert_eq!(refused_with(&scram, &other_mech).as_deref(), Some("08P01"));
    // unknown users and wrong passwords are refused alike, with 28P01
    let mut wrong = startup(&[("user", "trusty"), ("database", db)], 196608);
    wrong.extend(msg(b'p', b"SCRAM-SHA-256\0\0\0\0\x0cn,,n=,r=abcd"));
    let msgs = {
        let mut s = raw(&scram);
        s.write_all(&wrong).unwrap();
        // the server-first message arrives; answer it with a bogus proof
        let (tag, sasl) = read_msg(&mut s);
        assert_eq!(
            (tag, &sasl[..4]),
            (b'R', &[0, 0, 0, 10][..]),
            "AuthenticationSASL"
        );
        let (tag, cont) = read_msg(&mut s);
        assert_eq!(
            (tag, &cont[..4]),
            (b'R', &[0, 0, 0, 11][..]),
            "AuthenticationSASLContinue"
        );
        let text = String::from_utf8_lossy(&cont[4..]).into_owned();
        let nonce = text
            .split(',')
            .find_map(|f| f.strip_prefix("r="))
            .unwrap()
            .to_string();
        let fin = format!("c=biws,r={nonce},p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        s.write_all(&msg(b'p', fin.as_bytes())).unwrap();
        read_all(&mut s)
    };
    assert_eq!(error_code(&msgs).as_deref(), Some("28P01"));
    // a client that connects and sends nothing is cut off by auth_timeout
    assert_eq!(refused_with(&px, b"").as_deref(), Some("08P01"));
    // an SSL request is declined, then the session works
    let mut s = raw(&px);
    s.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");
    s.write_all(&startup(&[("user", "trusty"), ("database", db)], 196608))
        .unwrap();
    s.write_all(&msg(b'X', b"")).unwrap();
    let msgs = read_all(&mut s);
    assert_eq!(
        msgs.last().map(|m| m.0),
        Some(b'Z'),
        "logged in, then Terminate closed it"
    );
}

#[test]
fn bad_messages_after_login_close_only_that_client() {
    let db = "badmsg";
    let px = start(db, "trust");
    let watcher = bystander(&px, db);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // the type as PostgreSQL prints it: a number, so a NUL cannot end up in the text
        (
            msg(b'Y', b"unknown type"),
            "invalid frontend message type 89",
        ),
        (msg(0, b"nul type"), "invalid frontend message type 0"),
        (msg(b'p', b"secret\0"), "invalid frontend message type 112"),
        (msg(b'Q', &vec![b'x'; 5000]), "max_message_size"),
        (vec![b'Q', 0, 0, 0, 2], "invalid message length 2"),
        (vec![b'Q', 0x7f, 0xff, 0xff, 0xff], "max_message_size"),
    ];
    for (bytes, text) in cases {
        let mut s = logged_in(&px, db);
        s.write_all(&bytes).unwrap();
        let msgs = read_all(&mut s);
        let shown: Vec<_> = msgs
            .iter()
            .map(|(t, b)| (*t as char, String::from_utf8_lossy(b)))
            .collect();
        let what = format!("for {:?}: {shown:?}", &bytes[..5]);
        assert_eq!(error_code(&msgs).as_deref(), Some("08P01"), "{what}");
        let e = error_fields(&msgs);
        assert!(e.message.contains(text), "{what}");
        assert_eq!(e.fields, 4, "S, V, C and M, nothing more: {what}");
    }
    // vanishing halfway through a message, and mid-transaction, leak nothing
    for bytes in [
        msg(b'Q', b"SELECT 1;\0")[..8].to_vec(),
        msg(b'Q', b"BEGIN\0"),
        msg(b'Q', b"BEGIN; SELECT 1\0"),
    ] {
        let mut s = logged_in(&px, db);
        s.write_all(&bytes).unwrap();
        drop(s);
    }
    std::fs::write(px.config_path.with_extension("stop"), "").unwrap();
    watcher.join().expect("the bystander never failed");
    // the pool of one is whole: a new client is served
    let mut s = logged_in(&px, db);
    s.write_all(&msg(b'Q', b"SELECT 42\0")).unwrap();
    s.write_all(&msg(b'X', b"")).unwrap();
    let msgs = read_all(&mut s);
    assert!(
        msgs.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"42")),
        "{msgs:?}"
    );
    let pg = PgCluster::shared();
    wait_until("no server left busy", Duration::from_secs(20), || {
        pg.psql(
            pg.primary(),
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state <> 'idle'"
            ),
        ) == "0"
    });
}

/// The backend pid of the server a new client of `db` is lent.
fn server_pid(px: &Pgmux, db: &str) -> String {
    let mut s = logged_in(px, db);
    s.write_all(&msg(b'Q', b"SELECT pg_backend_pid()\0"))
        .unwrap();
    s.write_all(&msg(b'X', b"")).unwrap();
    let msgs = read_all(&mut s);
    let (_, row) = msgs
        .iter()
        .find(|(t, _)| *t == b'D')
        .unwrap_or_else(|| panic!("no row: {msgs:?}"));
    String::from_utf8_lossy(&row[6..]).into_owned()
}

#[test]
fn bad_messages_cost_no_pooled_server() {
    let db = "badidle";
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    // pools of one server: a server lost to a bad client would come back with another pid
    let px = Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
default_pool_size = 1
max_message_size = 4096
[[users]]
name = "trusty"
[[databases]]
name = "{db}"
host = "127.0.0.1"
port = {port}
server_user = "postgres"
[[databases]]
name = "{db}_s"
dbname = "{db}"
host = "127.0.0.1"
port = {port}
server_user = "postgres"
pool_mode = "session"
"#,
        port = pg.primary().port
    ));
    let session_db = format!("{db}_s");
    let bad: Vec<Vec<u8>> = vec![
        msg(b'Y', b"unknown type"),
        msg(0, b"nul type"),
        msg(b'p', b"secret\0"),
        msg(b'Q', &vec![b'x'; 5000]),
        vec![b'Q', 0, 0, 0, 2],
    ];
    for pool in [db, session_db.as_str()] {
        let pid = server_pid(&px, pool);
        for bytes in &bad {
            // transaction mode: no server attached, none is taken for the message; session
            // mode: the client's server, attached by a first query, goes back to the pool
            let mut s = logged_in(&px, pool);
            if pool == session_db {
                s.write_all(&msg(b'Q', b"SELECT 1\0")).unwrap();
                let mut answered = Vec::new();
                while answered.last().map(|m: &(u8, Vec<u8>)| m.0) != Some(b'Z') {
                    answered.push(read_msg(&mut s));
                }
            }
            s.write_all(bytes).unwrap();
            let msgs = read_all(&mut s);
            assert_eq!(
                error_code(&msgs).as_deref(),
                Some("08P01"),
                "{pool}, {:?}: {msgs:?}",
                &bytes[..5]
            );
            assert_eq!(
                server_pid(&px, pool),
                pid,
                "{pool}: the server survives {:?}",
                &bytes[..5]
            );
            // behind valid requests in the same write: those are answered, as PostgreSQL
            // answers them, then the refusal; the server is kept
            let mut s = logged_in(&px, pool);
            let extended = [
                msg(b'P', b"\0SELECT 7\0\0\0"),
                msg(b'B', b"\0\0\0\0\0\0\0\0"),
                msg(b'E', b"\0\0\0\0\0"),
                msg(b'S', b""),
            ]
            .concat();
            s.write_all(&[msg(b'Q', b"SELECT 41 + 1\0"), extended, bytes.clone()].concat())
                .unwrap();
            let msgs = read_all(&mut s);
            let tags: Vec<u8> = msgs.iter().map(|(t, _)| *t).collect();
            assert_eq!(
                tags,
                b"TDCZ12DCZE".to_vec(),
                "{pool}, {:?} behind requests: {msgs:?}",
                &bytes[..5]
            );
            assert_eq!(&msgs[1].1[6..], b"42");
            assert_eq!(error_code(&msgs).as_deref(), Some("08P01"));
            assert_eq!(
                server_pid(&px, pool),
                pid,
                "{pool}: the server survives {:?} behind requests",
                &bytes[..5]
            );
        }
    }
}

/// Messages up to and including the next ReadyForQuery.
fn until_ready(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while out.last().map(|m: &(u8, Vec<u8>)| m.0) != Some(b'Z') {
        out.push(read_msg(s));
    }
    out
}

#[test]
fn the_console_refuses_bad_messages_as_postgresql_does() {
    let px = Pgmux::start(
        "[pgmux]\nlisten_port = {port}\nauth_type = \"trust\"\nadmin_users = [\"trusty\"]\n\
         [[users]]\nname = \"trusty\"\n",
    );
    // a type PostgreSQL does not accept after login: FATAL, then the connection is closed
    for (t, text) in [
        (b'Y', "invalid frontend message type 89"),
        (0, "invalid frontend message type 0"),
        (b'p', "invalid frontend message type 112"),
    ] {
        let mut s = logged_in(&px, "pgmux");
        s.write_all(&msg(t, b"x\0")).unwrap();
        let msgs = read_all(&mut s);
        assert_eq!(msgs.len(), 1, "one error, then EOF: {msgs:?}");
        let e = error_fields(&msgs);
        assert_eq!(error_code(&msgs).as_deref(), Some("08P01"));
        assert_eq!((e.severity.as_str(), e.message.as_str()), ("FATAL", text));
    }
    let mut s = logged_in(&px, "pgmux");
    // CopyData, CopyDone and CopyFail outside COPY are ignored, as PostgreSQL ignores them
    s.write_all(&msg(b'd', b"xyz")).unwrap();
    s.write_all(&msg(b'c', b"")).unwrap();
    s.write_all(&msg(b'f', b"why\0")).unwrap();
    s.write_all(&msg(b'Q', b"SHOW VERSION\0")).unwrap();
    let msgs = until_ready(&mut s);
    let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"TDCZ", "{msgs:?}");
    // a Query that is not one NUL-terminated string: PostgreSQL's ERROR, and the session goes on
    for (body, text) in [
        (&b"SHOW VERSION"[..], "invalid string in message"),
        (b"SHOW VERSION\0SHOW STATE\0", "invalid message format"),
    ] {
        s.write_all(&msg(b'Q', body)).unwrap();
        let msgs = until_ready(&mut s);
        assert_eq!(msgs.len(), 2, "an error and ReadyForQuery: {msgs:?}");
        let e = error_fields(&msgs);
        assert_eq!(error_code(&msgs).as_deref(), Some("08P01"));
        assert_eq!((e.severity.as_str(), e.message.as_str()), ("ERROR", text));
    }
    s.write_all(&msg(b'Q', b"SHOW VERSION\0")).unwrap();
    s.write_all(&msg(b'X', b"")).unwrap();
    let msgs = read_all(&mut s);
    let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"TDCZ", "{msgs:?}");
}

#[test]
fn newer_protocol_minor_and_encryption_requests_are_negotiated() {
    let db = "badproto";
    let px = start(db, "trust");
    // a newer 3.x minor, or a protocol option: NegotiateProtocolVersion, then a 3.0 session.
    // Its version is 3.0 written whole (0x00030000), as PostgreSQL sends it: libpq takes it
    // for the whole version, and one below 3.0 would be a refusal.
    for (minor, options, body_after_version) in [
        (
            2,
            &[("_pq_.future", "1")][..],
            &b"\0\0\0\x01_pq_.future\0"[..],
        ),
        (1, &[][..], &b"\0\0\0\0"[..]),
        (
            0,
            &[("_pq_.other", "x")][..],
            &b"\0\0\0\x01_pq_.other\0"[..],
        ),
    ] {
        let mut s = raw(&px);
        let mut params = vec![("user", "trusty"), ("database", db)];
        params.extend_from_slice(options);
        s.write_all(&startup(&params, (3 << 16) | minor)).unwrap();
        let (tag, body) = read_msg(&mut s);
        assert_eq!(tag, b'v', "3.{minor}");
        assert_eq!(&body[..4], &[0, 3, 0, 0], "3.{minor}: {body:?}");
        assert_eq!(&body[4..], body_after_version, "3.{minor}");
        s.write_all(&msg(b'Q', b"SELECT 1\0")).unwrap();
        s.write_all(&msg(b'X', b"")).unwrap();
        let msgs = read_all(&mut s);
        assert!(msgs.iter().any(|(t, _)| *t == b'D'), "3.{minor}: {msgs:?}");
    }
    // GSSENCRequest then SSLRequest, both declined, then a normal startup
    let mut s = raw(&px);
    for code in [80877104u32, 80877103] {
        let mut req = 8u32.to_be_bytes().to_vec();
        req.extend(code.to_be_bytes());
        s.write_all(&req).unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"N");
    }
    s.write_all(&startup(&[("user", "trusty"), ("database", db)], 196608))
        .unwrap();
    s.write_all(&msg(b'X', b"")).unwrap();
    assert_eq!(read_all(&mut s).last().map(|m| m.0), Some(b'Z'));
}

#[test]
fn unreachable_or_silent_servers_give_a_clear_error() {
    // a server that accepts TCP but never answers: server_connect_timeout applies
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let closed_port = common::free_port();
    let px = Pgmux::start(&format!(
        "[pgmux]\nlisten_port = {{port}}\nauth_type = \"trust\"\nserver_connect_timeout = 0.5\n[[users]]\nname = \"trusty\"\n\
         [[databases]]\nname = \"silent\"\nhost = \"127.0.0.1\"\nport = {silent_port}\n\
         [[databases]]\nname = \"closed\"\nhost = \"127.0.0.1\"\nport = {closed_port}\n"
    ));
    for db in ["silent", "closed"] {
        let mut s = raw(&px);
        s.write_all(&startup(&[("user", "trusty"), ("database", db)], 196608))
            .unwrap();
        let msgs = read_all(&mut s);
        assert_eq!(
            error_code(&msgs).as_deref(),
            Some("08006"),
            "{db}: {msgs:?}"
        );
    }
    drop(silent);
}
