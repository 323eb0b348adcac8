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

/// The relay in transaction mode (scanner, request accounting, the named-statement tracker
/// of `relay::statements`) driven by a script the input encodes: frontend and backend
/// messages (well-formed ones from a small vocabulary of statement names and texts, and raw
/// bytes), the chunk sizes the peers' reads deliver, and two servers lent in turn as the
/// relay asks for one and gives it back. Properties: no panic or hang; what reaches each
/// server and the client is framed (every length word at least 4); a statement pgmux names
/// (`pgmux_<id>`) is only bound, described or executed on a server after pgmux sent that
/// server its Parse, and not after closing it there; a server given back owes nothing and
/// has nothing half-sent; buffers stay within a bound of the input's size.
pub fn check_relay(data: &[u8]) {
    relay_fuzz::run(data);
}

mod relay_fuzz {
    use pgmux::params::Params;
    use pgmux::prepared::{self, Registry, ServerStatements};
    use pgmux::relay::{Event, Relay, ServerSide};
    use std::collections::{HashSet, VecDeque};
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// One registry for every run, as pgmux has one for its process.
    fn registry() -> &'static Registry {
        static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
        REGISTRY.get_or_init(Registry::default)
    }

    /// A peer: bytes to deliver in chunks of at most `chunk`, and everything written to it,
    /// taken at most `write_cap` bytes per write (so writes are partial).
    #[derive(Default)]
    struct Peer {
        input: VecDeque<u8>,
        out: Vec<u8>,
        chunk: usize,
        write_cap: usize,
    }

    impl AsyncRead for Peer {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.input.is_empty() {
                return Poll::Pending;
            }
            let n = self.input.len().min(buf.remaining()).min(self.chunk.max(1));
            let bytes: Vec<u8> = self.input.drain(..n).collect();
            buf.put_slice(&bytes);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Peer {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.write_cap.max(1));
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    struct Server {
        peer: Peer,
        params: Params,
        statements: ServerStatements,
    }

    /// Reads the script.
    struct Script<'a>(&'a [u8]);

    impl Script<'_> {
        fn byte(&mut self) -> Option<u8> {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            Some(b)
        }
        fn pick<'s>(&mut self, from: &[&'s [u8]]) -> &'s [u8] {
            from[self.byte().unwrap_or(0) as usize % from.len()]
        }
        fn raw(&mut self) -> Vec<u8> {
            let n = (self.byte().unwrap_or(0) as usize % 24).min(self.0.len());
            let (taken, rest) = self.0.split_at(n);
            self.0 = rest;
            taken.to_vec()
        }
    }

    const NAMES: &[&[u8]] = &[b"", b"a", b"b", b"c"];
    const TEXTS: &[&[u8]] = &[
        b"SELECT 1",
        b"SELECT $1",
        b"SELECT 2",
        b"DISCARD ALL",
        b"DEALLOCATE ALL",
        b"SET x = 1",
        b"BEGIN",
        b"COMMIT",
        b"LISTEN c",
        b"COPY t FROM STDIN",
    ];

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn cstr(parts: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in parts {
            v.extend_from_slice(p);
            v.push(0);
        }
        v
    }

    fn frontend(s: &mut Script) -> Vec<u8> {
        match s.byte().unwrap_or(0) % 16 {
            0 | 1 => {
                let (name, text) = (s.pick(NAMES), s.pick(TEXTS));
                let mut b = cstr(&[name, text]);
                b.extend_from_slice(&0i16.to_be_bytes());
                msg(b'P', &b)
            }
            2 | 3 => {
                let mut b = cstr(&[b"", s.pick(NAMES)]);
                b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
                msg(b'B', &b)
            }
            4 => {
                let kind = if s.byte().unwrap_or(0).is_multiple_of(2) {
                    b'S'
                } else {
                    b'P'
                };
                let mut b = vec![kind];
                b.extend(cstr(&[s.pick(NAMES)]));
                msg(b'D', &b)
            }
            5 => {
                let kind = if s.byte().unwrap_or(0).is_multiple_of(2) {
                    b'S'
                } else {
                    b'P'
                };
                let mut b = vec![kind];
                b.extend(cstr(&[s.pick(NAMES)]));
                msg(b'C', &b)
            }
            6 => msg(b'E', &[0, 0, 0, 0, 0]),
            7 | 8 => msg(b'S', b""),
            9 => msg(b'H', b""),
            10 => msg(b'Q', &cstr(&[s.pick(TEXTS)])),
            11 => msg(b'd', b"1\n"),
            12 => msg(b'c', b""),
            13 => msg(b'f', b"no\0"),
            14 => {
                let tag = s.byte().unwrap_or(b'Q');
                msg(tag, &s.raw())
            }
            _ => s.raw(),
        }
    }

    fn backend(s: &mut Script) -> Vec<u8> {
        match s.byte().unwrap_or(0) % 16 {
            0 => msg(b'1', b""),
            1 => msg(b'2', b""),
            2 => msg(b'3', b""),
            3 => msg(b'C', b"SELECT 1\0"),
            4 => msg(b'T', &[0, 0]),
            5 => msg(b'n', b""),
            6 => msg(b'I', b""),
            7 => msg(b's', b""),
            8 | 9 => msg(
                b'Z',
                &[[b'I', b'T', b'E'][s.byte().unwrap_or(0) as usize % 3]],
            ),
            10 => msg(b'E', b"SERROR\0C42000\0Mno\0\0"),
            11 => msg(b'G', &[0, 0, 0]),
            12 => msg(b'S', b"TimeZone\0UTC\0"),
            13 => msg(b'N', b"SNOTICE\0Mhi\0\0"),
            14 => msg(b'D', &[0, 1, 0, 0, 0, 1, b'x']),
            _ => {
                let tag = s.byte().unwrap_or(b'D');
                let mut m = msg(tag, &s.raw());
                if s.byte().unwrap_or(0) == 0xff {
                    // a length word that lies (up to 4 GiB): must not size a buffer
                    let lie = u32::from_be_bytes([0x7f, s.byte().unwrap_or(0xff), 0, 0]);
                    m[1..5].copy_from_slice(&lie.to_be_bytes());
                }
                m
            }
        }
    }

    /// Whole messages at the start of a stream: (tag, body); panics on a length below 4.
    fn messages(stream: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut at = 0;
        while stream.len() - at >= 5 {
            let len = u32::from_be_bytes(stream[at + 1..at + 5].try_into().unwrap()) as usize;
            assert!(len >= 4, "a message of length {len} was sent on");
            if stream.len() - at < 1 + len {
                break;
            }
            out.push((stream[at], &stream[at + 5..at + 1 + len]));
            at += 1 + len;
        }
        out
    }

    fn name_of(body: &[u8]) -> &[u8] {
        &body[..body.iter().position(|&b| b == 0).unwrap_or(body.len())]
    }

    /// On one server's input: pgmux's statements are used only while prepared there.
    fn check_server_stream(stream: &[u8]) {
        let mut prepared: HashSet<&[u8]> = HashSet::new();
        for (tag, body) in messages(stream) {
            let (name, use_) = match tag {
                b'P' => {
                    prepared.insert(name_of(body));
                    continue;
                }
                b'B' => {
                    let portal = name_of(body);
                    (name_of(&body[(portal.len() + 1).min(body.len())..]), true)
                }
                b'D' | b'C' if body.first() == Some(&b'S') => (name_of(&body[1..]), tag == b'D'),
                _ => continue,
            };
            if !name.starts_with(b"pgmux_") {
                continue;
            }
            if use_ {
                assert!(
                    prepared.contains(name),
                    "{} used on a server that was never sent its Parse (or had it closed)",
                    String::from_utf8_lossy(name)
                );
            } else {
                prepared.remove(name);
            }
        }
    }

    /// On what one server was sent while lent to the client (`lending`, from a message
    /// boundary): the unnamed statement is bound or described only after something in that
    /// lending set it to the client's (a Parse of it, or a Close, or a simple Query, which
    /// drops it): the server may hold another client's from before.
    fn check_unnamed_lending(lending: &[u8]) {
        let mut set = false;
        for (tag, body) in messages(lending) {
            let unnamed_use = match tag {
                b'P' | b'Q' => {
                    set |= tag == b'Q' || name_of(body).is_empty();
                    continue;
                }
                b'C' => {
                    set |= body.first() == Some(&b'S') && name_of(&body[1..]).is_empty();
                    continue;
                }
                b'B' => match prepared::bind_names(body) {
                    Some((_, stmt, _)) => stmt.is_empty(),
                    None => false,
                },
                b'D' => body.first() == Some(&b'S') && name_of(&body[1..]).is_empty(),
                _ => false,
            };
            assert!(
                !unnamed_use || set,
                "the unnamed statement used on a server before this lending set it"
            );
        }
    }

    fn new_server() -> Server {
        Server {
            peer: Peer {
                chunk: 11,
                write_cap: 5,
                ..Peer::default()
            },
            params: Params::default(),
            statements: ServerStatements::default(),
        }
    }

    pub fn run(data: &[u8]) {
        let mut s = Script(data);
        let max_prepared = 1 + s.byte().unwrap_or(0) as usize % 3;
        let mut relay = Relay::new(1 << 16, true, registry(), max_prepared);
        let mut client = Peer {
            chunk: 7,
            write_cap: 13,
            ..Peer::default()
        };
        let mut servers: Vec<Server> = (0..2).map(|_| new_server()).collect();
        // what was sent to servers closed since
        let mut closed: Vec<Vec<u8>> = Vec::new();
        let mut wants = std::sync::Arc::new(Params::default());
        let mut attached: Option<usize> = None;
        // where the attached server's input stood when it was lent
        let mut lent_at = 0;
        let mut next_server = 0;
        // pgmux's names typed by the client itself pass through unrenamed: no claim then
        let mut client_typed_ours = false;
        let mut client_bytes = 0;
        let mut server_bytes = 0;
        let mut cx = Context::from_waker(Waker::noop());
        'script: while let Some(op) = s.byte() {
            match op % 8 {
                0..=2 => {
                    let m = frontend(&mut s);
                    client_typed_ours |= m.windows(6).any(|w| w == b"pgmux_");
                    client_bytes += m.len();
                    client.input.extend(m);
                }
                3..=5 => {
                    let m = backend(&mut s);
                    server_bytes += m.len();
                    // an idle pooled server that sends something is never lent (the pool's
                    // is_broken check): only a lent server's messages matter
                    if let Some(i) = attached {
                        servers[i].peer.input.extend(m);
                    }
                }
                6 => {
                    let c = s.byte().unwrap_or(0) as usize;
                    client.chunk = 1 + c % 64;
                    servers[c % 2].peer.chunk = 1 + (c / 2) % 64;
                    client.write_cap = 1 + (c * 7) % 97;
                }
                _ => {}
            }
            // drive until the relay waits for input (each poll is bounded by its budget)
            for _ in 0..64 {
                let side = attached.map(|i| {
                    let sv = &mut servers[i];
                    ServerSide {
                        stream: &mut sv.peer,
                        params: &mut sv.params,
                        statements: &mut sv.statements,
                    }
                });
                let ev = match relay.poll(&mut cx, &mut client, side, &mut wants) {
                    Poll::Pending => break,
                    Poll::Ready(ev) => ev,
                };
                match ev {
                    Event::NeedServer => {
                        assert!(attached.is_none(), "asked for a second server");
                        let i = next_server;
                        next_server = (next_server + 1) % 2;
                        if !servers[i].peer.input.is_empty() {
                            // bytes left unread when it was given back (the rest of a message
                            // after its ReadyForQuery): the pool's is_broken check closes such
                            // a server, and a new one is opened
                            let old = std::mem::replace(&mut servers[i], new_server());
                            closed.push(old.peer.out);
                        }
                        attached = Some(i);
                        let sv = &servers[attached.unwrap()];
                        lent_at = sv.peer.out.len();
                        relay.attached(&sv.statements);
                    }
                    Event::Release => {
                        assert!(attached.is_some(), "gave back a server it did not have");
                        assert!(
                            relay.server_clean(),
                            "gave back a server that owes something"
                        );
                        assert_eq!(relay.flow.pending, 0);
                        if let Some(i) = attached.take() {
                            check_unnamed_lending(&servers[i].peer.out[lent_at..]);
                        }
                    }
                    Event::Quiet => {}
                    // the session reads the server back and keeps it: nothing owed
                    Event::Resync => assert!(relay.server_clean(), "resync with work owed"),
                    Event::ClientClosed
                    | Event::Terminated
                    | Event::ClientIo(_)
                    | Event::ServerClosed
                    | Event::ServerIo(_)
                    | Event::ServerFailed(_)
                    | Event::Protocol(_) => break 'script,
                }
            }
        }
        if let Some(i) = attached {
            check_unnamed_lending(&servers[i].peer.out[lent_at..]);
        }
        for out in closed.iter().chain(servers.iter().map(|sv| &sv.peer.out)) {
            if !client_typed_ours {
                check_server_stream(out);
            } else {
                messages(out);
            }
        }
        messages(&client.out);
        // what pgmux holds is what it was given plus its own small messages
        let bound = 4 * (client_bytes + server_bytes) + 256 * 1024;
        for cap in [relay.c2s.buf.capacity(), relay.s2c.buf.capacity()] {
            assert!(
                cap <= bound,
                "a buffer of {cap} bytes for {bound} bytes of input"
            );
        }
    }
}
