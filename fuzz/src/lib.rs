//! The properties pgmux's peer-facing parsers must keep for any input: no panic, no hang, no
//! allocation beyond what the input's own bounds allow, and answers consistent with the
//! input. One function per fuzz target (`fuzz_targets/*.rs`, run by libFuzzer); the same
//! functions run under proptest in `cargo test` (`tests/fuzz_props.rs` includes this file), so
//! the seconds-long CI run and the minutes-long fuzz runs check exactly the same things.
//!
//! Each check takes raw bytes, as a fuzzer produces them, and panics when a property fails.

use pgmux::auth::password::{salted_password, ScramVerifier, Secret};
use pgmux::auth::scram::{hmac_sha256, sha256, ScramError, ScramServer};
use pgmux::protocol::messages::{parse_error_fields, parse_parameter_status};
use pgmux::protocol::scan::{Scanner, Step};
use pgmux::protocol::startup::{parse_initial, parse_options, Initial, MAX_STARTUP_LEN};
use pgmux::router::classify::{classify, Class};
use std::sync::OnceLock;

/// The startup packet body (after the length word) and the `options` it may carry.
pub fn check_startup(data: &[u8]) {
    // read_initial never hands over more than this; larger bodies are refused before parsing
    let data = &data[..data.len().min(MAX_STARTUP_LEN - 4)];
    if let Ok(Initial::Startup(p)) = parse_initial(data) {
        assert_eq!(&data[..2], &[0, 3], "only protocol 3.x is accepted");
        assert_eq!(p.minor, u16::from_be_bytes([data[2], data[3]]));
        assert_eq!(data.last(), Some(&0), "a packet ends with its terminator");
        for (k, v) in &p.params {
            assert!(!k.starts_with("_pq_."), "protocol options are kept apart");
            assert!(!k.contains('\0') && !v.contains('\0'));
        }
        if let Some(options) = p.get("options") {
            check_options(options);
        }
    }
    check_options(&String::from_utf8_lossy(data));
}

fn check_options(options: &str) {
    if let Ok(settings) = parse_options(options) {
        for (name, _) in settings {
            assert!(!name.contains('-'), "dashes in names become underscores");
        }
    }
}

/// The message scanner over any chunking of a byte stream: what it finds must not depend on
/// how the bytes were split across reads. The first three bytes choose the chunking, which
/// tags are inspected and the size limit; the rest is the stream.
pub fn check_scan(data: &[u8]) {
    let [seed, mask, limit, ref stream @ ..] = *data else {
        return;
    };
    let max_len = [5usize, 64, 1024, 1 << 20][limit as usize % 4];
    // inspect a data-chosen subset of tags, always including the ones the relay reads
    let inspect =
        move |tag: u8| matches!(tag, b'Z' | b'S' | b'E') || (tag ^ mask).is_multiple_of(3);
    let whole = scan_chunks(stream, &[stream.len()], inspect, max_len);
    let mut sizes = Vec::new();
    let mut state = u32::from(seed).wrapping_mul(2654435761) | 1;
    let mut left = stream.len();
    while left > 0 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state as usize % 17 + 1).min(left);
        sizes.push(n);
        left -= n;
    }
    let chunked = scan_chunks(stream, &sizes, inspect, max_len);
    assert_eq!(whole, chunked, "chunking changed what was scanned");
}

#[derive(Debug, PartialEq, Eq)]
enum Found {
    Message(u8, Vec<u8>, usize),
    Passed(u8, usize, usize),
    Error(String),
}

/// Feeds `stream` in pieces of `sizes` into a growing buffer, as the relay's reads do, and
/// records every step up to the first error.
fn scan_chunks(
    stream: &[u8],
    sizes: &[usize],
    inspect: impl Fn(u8) -> bool + Copy,
    max_len: usize,
) -> Vec<Found> {
    let mut scanner = Scanner::default();
    let mut found = Vec::new();
    let (mut buf, mut pos, mut fed) = (Vec::new(), 0usize, 0usize);
    for &n in sizes {
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            match scanner.step(&buf, &mut pos, inspect, max_len) {
                Ok(Step::Message { tag, body, start }) => {
                    assert!(inspect(tag));
                    assert_eq!(start + body.len() + 5, pos);
                    found.push(Found::Message(tag, body.to_vec(), start));
                }
                Ok(Step::Passed { tag, len, start }) => {
                    assert!(
                        len >= 5 && len <= max_len,
                        "length {len} outside 5..={max_len}"
                    );
                    found.push(Found::Passed(tag, len, start));
                }
                Ok(Step::NeedMore { reserve }) => {
                    // what the relay would grow its buffer to: bounded by the limit
                    assert!(
                        reserve <= max_len.max(5),
                        "reserve {reserve} over the limit"
                    );
                    break;
                }
                Err(e) => {
                    found.push(Found::Error(e.to_string()));
                    return found;
                }
            }
            assert!(pos <= buf.len());
        }
    }
    found
}

/// Backend message bodies pgmux reads: ErrorResponse/NoticeResponse and ParameterStatus.
pub fn check_backend(data: &[u8]) {
    let f = parse_error_fields(data);
    // every field parsed is a NUL-terminated piece of the body
    assert!(f.severity.len() + f.code.len() + f.message.len() <= data.len() * 3);
    if let Some((name, value)) = parse_parameter_status(data) {
        assert!(!name.contains(&0) && !value.contains(&0));
        assert!(name.len() + value.len() + 2 <= data.len());
    }
}

/// Password of the verifier the SCRAM check uses.
pub const SCRAM_PASSWORD: &str = "pencil";
const SCRAM_SALT: &[u8] = b"fuzz-salt-0123";
const SCRAM_ITERATIONS: u32 = 2;

fn verifier() -> &'static ScramVerifier {
    static V: OnceLock<ScramVerifier> = OnceLock::new();
    V.get_or_init(|| ScramVerifier::from_password(SCRAM_PASSWORD, SCRAM_SALT, SCRAM_ITERATIONS))
}

/// The SCRAM exchange, server side. The input is client-first, a NUL, then client-final; in
/// client-final, `NONCE` is replaced by the nonce the server chose (a fuzzer cannot guess it),
/// so inputs get past the nonce check to the proof. Whatever the input, no proof but the
/// right one may pass, and a refused exchange stays refused.
pub fn check_scram(data: &[u8]) {
    let (first, last) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let known = data.len().is_multiple_of(2);
    let mut server = ScramServer::new(known.then(|| verifier().clone()), "fuzz");
    let Ok(server_first) = server.client_first(first) else {
        assert!(
            server.client_first(b"n,,n=,r=x").is_err(),
            "a failed exchange stays failed"
        );
        return;
    };
    let text = String::from_utf8(server_first).expect("server-first is ASCII");
    let nonce = text
        .strip_prefix("r=")
        .and_then(|r| r.split(',').next())
        .expect("server-first starts with r=<nonce>");
    assert!(nonce.len() > 18, "the client's nonce plus the server's");
    assert_eq!(
        server.client_first(first),
        Err(ScramError::OutOfOrder),
        "client-first twice"
    );
    let last = replace(last, b"NONCE", nonce.as_bytes());
    match server.client_final(&last) {
        Ok(_) => panic!(
            "a proof nobody computed passed: {:?}",
            String::from_utf8_lossy(&last)
        ),
        Err(_) => assert!(server.client_key().is_none()),
    }
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// A well-behaved SCRAM client's final message for `client_first` (gs2 header `n,,`) and the
/// server's first message, knowing `password`: what a real driver sends.
pub fn scram_client_final(password: &str, client_first: &[u8], server_first: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(server_first).expect("server-first is ASCII");
    let nonce = text.strip_prefix("r=").unwrap().split(',').next().unwrap();
    let bare = &client_first[3..];
    let without_proof = format!("c=biws,r={nonce}");
    let salted = salted_password(password, SCRAM_SALT, SCRAM_ITERATIONS);
    let client_key = hmac_sha256(&salted, &[b"Client Key"]);
    let stored_key = sha256(&client_key);
    let auth: [&[u8]; 5] = [bare, b",", server_first, b",", without_proof.as_bytes()];
    let signature = hmac_sha256(&stored_key, &auth);
    let proof: Vec<u8> = client_key
        .iter()
        .zip(signature)
        .map(|(k, s)| k ^ s)
        .collect();
    let b64 = base64_encode(&proof);
    format!("{without_proof},p={b64}").into_bytes()
}

/// A server for the verifier of [`SCRAM_PASSWORD`].
pub fn scram_server() -> ScramServer {
    ScramServer::new(Some(verifier().clone()), "fuzz")
}

fn base64_encode(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The configuration file, and the secrets in it: a verifier that parses prints back the same.
pub fn check_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = pgmux::config::Config::parse(&text, "fuzz");
    if let Some(v) = ScramVerifier::parse(&text) {
        assert_eq!(ScramVerifier::parse(&v.to_string()), Some(v));
    }
    let _ = Secret::parse(&text);
}

/// The statement classifier. Whatever precedes it, a string that goes on to an INSERT must not
/// be taken for a read (or for a bare transaction command that any server may run).
pub fn check_classify(data: &[u8]) {
    let sql = String::from_utf8_lossy(data);
    let functions = ["audit.log_write".to_string()];
    let _ = classify(&sql, &functions);
    let with_write = format!("{sql}\n;INSERT INTO t VALUES (1)");
    let c = classify(&with_write, &functions);
    assert!(
        !matches!(c.class, Class::Read | Class::Transaction),
        "{with_write:?} classified as {c:?}"
    );
}

/// The prepared-statement body parsers (Parse, Bind, Describe/Close): the names they return
/// are pieces of the body and the lengths they report add up.
pub fn check_prepared(data: &[u8]) {
    use pgmux::prepared::{bind_names, split_parse, target};
    if let Some((name, rest)) = split_parse(data) {
        assert!(!name.contains(&0));
        assert_eq!(name.len() + 1 + rest.len(), data.len());
    }
    if let Some((portal, stmt, used)) = bind_names(data) {
        assert!(!portal.contains(&0) && !stmt.contains(&0));
        assert_eq!(used, portal.len() + stmt.len() + 2);
        assert!(used <= data.len());
    }
    if let Some((kind, name)) = target(data) {
        assert_eq!(data[0], kind);
        assert_eq!(name.len() + 2, data.len());
    }
}
