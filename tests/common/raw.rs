//! Protocol v3 on a bare blocking socket, for tests that must do what no driver does: vanish
//! halfway through a COPY or a batch, pipeline bytes, stop reading, guess cancel keys.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A StartupMessage (protocol 3.0) with these parameters.
pub fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
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

/// A CancelRequest for (pid, secret).
pub fn cancel_request(pid: i32, secret: i32) -> Vec<u8> {
    let mut b = 16u32.to_be_bytes().to_vec();
    b.extend(80877102u32.to_be_bytes());
    b.extend(pid.to_be_bytes());
    b.extend(secret.to_be_bytes());
    b
}

/// One tagged message.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A simple Query.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    msg(b'Q', &body)
}

pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to pgmux");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Next message; None at EOF or on a read error.
pub fn read_msg(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    s.read_exact(&mut body).ok()?;
    Some((head[0], body))
}

/// Messages up to and including the next ReadyForQuery (or until EOF).
pub fn until_ready(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    until_tag(s, b'Z')
}

/// Messages up to and including the next one of type `tag` (or until EOF).
pub fn until_tag(s: &mut TcpStream, tag: u8) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(m) = read_msg(s) {
        let done = m.0 == tag;
        out.push(m);
        if done {
            break;
        }
    }
    out
}

/// The message types of `msgs`, as a string ("12DCZ").
pub fn tags(msgs: &[(u8, Vec<u8>)]) -> String {
    msgs.iter().map(|m| m.0 as char).collect()
}

/// Every message until the peer closes.
pub fn until_eof(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(m) = read_msg(s) {
        out.push(m);
    }
    out
}

/// The SQLSTATE of the first ErrorResponse among `msgs`.
pub fn error_code(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'E')?;
    body.split(|&b| b == 0)
        .find(|f| f.first() == Some(&b'C'))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
}

/// A session logged in without a password (auth_type trust): the socket after the first
/// ReadyForQuery, and the (pid, secret) of its BackendKeyData.
pub fn login(port: u16, user: &str, db: &str) -> (TcpStream, (i32, i32)) {
    let mut s = connect(port);
    s.write_all(&startup(&[("user", user), ("database", db)]))
        .unwrap();
    let msgs = until_ready(&mut s);
    assert_eq!(
        msgs.last().map(|m| m.0),
        Some(b'Z'),
        "login as {user} to {db}: {msgs:?}"
    );
    let (_, key) = msgs
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData");
    let pid = i32::from_be_bytes(key[..4].try_into().unwrap());
    let secret = i32::from_be_bytes(key[4..8].try_into().unwrap());
    (s, (pid, secret))
}
