//! Named prepared statements under transaction pooling. A client's statement names are its
//! own; on servers pgmux prepares each distinct statement (same query text and parameter
//! types) once under a name of its own choosing (`pgmux_<id>`), shared by every client, and
//! keeps per server a bounded, least-recently-used set of what is prepared there. This file
//! owns that bookkeeping and the few message bodies it reads and writes; `relay` decides
//! when to rewrite, inject or answer.

use crate::fasthash::{Keyed, U64Map};
use crate::protocol::messages::{self, take_cstr};
use crate::router::effects::Effects;
use crate::router::normalize::fingerprint_and_effects;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One distinct statement: what a Parse carries after the statement name.
#[derive(Debug)]
pub struct StmtDef {
    pub id: u64,
    /// Query string (with its NUL) and parameter types, exactly as the client sent them.
    pub body: Bytes,
    /// Some server accepted it: a client preparing it again may be answered by pgmux alone.
    validated: AtomicBool,
    /// What running it does to the session (read once, at first sight).
    pub effects: Effects,
    /// Its SHOW QUERIES fingerprint (`router::normalize`), found in the same lexer pass: a
    /// Bind of it is recorded without reading its text again.
    pub fingerprint: u64,
    /// Raised when a server said its plan is outdated (a schema change: "cached plan must
    /// not change result type"): every server holding an older generation prepares it again.
    generation: AtomicU32,
}

impl StmtDef {
    pub fn validated(&self) -> bool {
        self.validated.load(Ordering::Relaxed)
    }

    pub fn mark_validated(&self) {
        self.validated.store(true, Ordering::Relaxed);
    }

    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::Relaxed)
    }

    /// A server refused to run it as prepared: all servers must prepare it again.
    pub fn outdate(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// The Parse message that prepares this statement under pgmux's name.
    pub fn parse_message(&self, out: &mut BytesMut) {
        messages::message(out, b'P', |b| {
            put_server_name(b, self.id);
            b.put_slice(&self.body);
        });
    }
}

/// Writes `pgmux_<id>` and its NUL.
pub fn put_server_name(b: &mut BytesMut, id: u64) {
    b.put_slice(b"pgmux_");
    let mut digits = [0u8; 20];
    let mut n = id;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    b.put_slice(&digits[i..]);
    b.put_u8(0);
}

/// Every distinct statement any client prepared, so equal statements share one id. Equal
/// means the same text and parameter types, prepared under the same `search_path`: under
/// another one the text may name tables of another shape (a schema per tenant), which
/// PostgreSQL refuses to run under a plan made for the first (`0A000 cached plan must not
/// change result type`).
#[derive(Default)]
pub struct Registry {
    by_body: Mutex<HashMap<Bytes, Arc<StmtDef>>>,
    next_id: AtomicU64,
}

/// Past this many distinct statements, ones no client holds any more are forgotten.
const REGISTRY_SWEEP_AT: usize = 10_000;

impl Registry {
    /// The statement of `body` (a Parse's text and parameter types) for a client whose
    /// `search_path` is this (None: the server's default).
    pub fn intern(&self, body: &[u8], search_path: Option<&str>) -> Arc<StmtDef> {
        // the body ends where its parameter types do, so the path after it keeps keys apart
        let keyed;
        let key = match search_path {
            Some(p) => {
                keyed = [body, b"\xff", p.as_bytes()].concat();
                &keyed[..]
            }
            None => body,
        };
        let mut map = self.by_body.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(key) {
            return d.clone();
        }
        if map.len() >= REGISTRY_SWEEP_AT {
            map.retain(|_, d| Arc::strong_count(d) > 1);
        }
        let key = Bytes::copy_from_slice(key);
        let body = Bytes::copy_from_slice(body);
        let (fingerprint, effects) = fingerprint_and_effects(query_text(&body));
        let d = Arc::new(StmtDef {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            effects,
            fingerprint,
            body: body.clone(),
            validated: AtomicBool::new(false),
            generation: AtomicU32::new(0),
        });
        map.insert(key, d.clone());
        d
    }
}

/// A client's named statements, and its unnamed one.
#[derive(Default)]
pub struct ClientStatements {
    by_name: HashMap<Box<[u8]>, Arc<StmtDef>, Keyed>,
    /// The client's last unnamed Parse, whole (`relay::statements` keeps it, since its
    /// server may serve others before the client binds it); None: it has none.
    unnamed: Option<Bytes>,
}

impl ClientStatements {
    /// Returns the definition the name had before, if any.
    pub fn insert(&mut self, name: &[u8], d: Arc<StmtDef>) -> Option<Arc<StmtDef>> {
        self.by_name.insert(name.into(), d)
    }

    pub fn get(&self, name: &[u8]) -> Option<&Arc<StmtDef>> {
        self.by_name.get(name)
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<Arc<StmtDef>> {
        self.by_name.remove(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// The client's statement with pgmux's id `id` (a scan: for errors only).
    pub fn find(&self, id: u64) -> Option<&Arc<StmtDef>> {
        self.by_name.values().find(|d| d.id == id)
    }

    /// A name the client gave statement `id` (a scan: for errors only).
    pub fn name_of(&self, id: u64) -> Option<&[u8]> {
        self.by_name
            .iter()
            .find(|(_, d)| d.id == id)
            .map(|(n, _)| &n[..])
    }

    pub fn names(&self) -> impl Iterator<Item = Box<[u8]>> + '_ {
        self.by_name.keys().cloned()
    }

    /// No named statement and no unnamed one.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty() && self.unnamed.is_none()
    }

    /// The client's unnamed statement: its Parse message, whole.
    pub fn unnamed(&self) -> Option<&Bytes> {
        self.unnamed.as_ref()
    }

    /// The unnamed statement's query string and parameter types (as `StmtDef::body`).
    pub fn unnamed_body(&self) -> Option<&[u8]> {
        let msg = self.unnamed.as_deref()?;
        split_parse(msg.get(5..)?).map(|(_, rest)| rest)
    }

    /// The client parsed the unnamed statement with Parse message `msg`.
    pub fn set_unnamed(&mut self, msg: &[u8]) {
        // most clients parse the same few texts again and again: no copy then
        if self.unnamed.as_deref() != Some(msg) {
            self.unnamed = Some(Bytes::copy_from_slice(msg));
        }
    }

    /// The client's unnamed statement is gone (a simple Query, a Close, a failed Parse).
    pub fn drop_unnamed(&mut self) {
        self.unnamed = None;
    }
}

/// What one server has prepared under pgmux's names, with use ticks for LRU eviction and
/// the generation of each statement it prepared (`StmtDef::outdate`).
#[derive(Debug, Default)]
pub struct ServerStatements {
    ticks: U64Map<(u64, u32)>,
    clock: u64,
    /// A client's query may have dropped some of them unseen (`Effects::may_drop_statements`):
    /// the server deallocates all before it serves another client.
    pub unsure: bool,
}

/// Whether a server holds a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    No,
    Current,
    /// Prepared before its plan was outdated: to close and prepare again.
    Outdated,
}

impl ServerStatements {
    pub fn contains(&self, id: u64) -> bool {
        self.ticks.contains_key(&id)
    }

    pub fn holds(&self, def: &StmtDef) -> Held {
        match self.ticks.get(&def.id) {
            None => Held::No,
            Some(&(_, g)) if g == def.generation() => Held::Current,
            Some(_) => Held::Outdated,
        }
    }

    /// Marks a statement prepared (or just used), as of its current generation: it becomes
    /// the most recently used.
    pub fn touch(&mut self, def: &StmtDef) {
        self.clock += 1;
        self.ticks.insert(def.id, (self.clock, def.generation()));
    }

    pub fn forget(&mut self, id: u64) {
        self.ticks.remove(&id);
    }

    pub fn clear(&mut self) {
        self.ticks.clear();
    }

    pub fn len(&self) -> usize {
        self.ticks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ticks.is_empty()
    }

    /// The clock now: statements touched after this are in use by the current batch.
    pub fn now(&self) -> u64 {
        self.clock
    }

    /// The least recently used statement not used since `since`, to close when over budget.
    pub fn evictable(&self, since: u64) -> Option<u64> {
        self.ticks
            .iter()
            .filter(|(_, &(t, _))| t <= since)
            .min_by_key(|(_, &(t, _))| t)
            .map(|(&id, _)| id)
    }
}

/// What a query text that is not UTF-8 reads as. A database in SQL_ASCII takes any bytes, so
/// such a text may well change the session; this reads as an unterminated comment, which
/// every scan takes as unreadable (its client keeps its server, `PinReason::Unreadable`),
/// and SHOW QUERIES shows as it is.
pub const NOT_UTF8: &str = "/* query text not valid UTF-8";

/// The query text at the start of a Parse body after the name (or of a Query body), or
/// [`NOT_UTF8`]; empty when the body has no terminated text.
pub fn query_text(body: &[u8]) -> &str {
    let Some((q, ascii)) = cstr_ascii(body) else {
        return "";
    };
    if ascii {
        // SAFETY: every byte is below 0x80: ASCII, which is UTF-8
        return unsafe { std::str::from_utf8_unchecked(q) };
    }
    std::str::from_utf8(q).unwrap_or(NOT_UTF8)
}

/// The bytes of `b` before its first NUL (None without one), and whether they are all
/// ASCII: one pass, eight bytes at a time. Every simple Query and Parse goes through here;
/// finding the NUL and then checking the text as UTF-8 (`take_cstr`, `str::from_utf8`) cost
/// about 180 instructions for pgbench's 55-byte SELECT.
fn cstr_ascii(b: &[u8]) -> Option<(&[u8], bool)> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut high = 0u64;
    let mut i = 0;
    while let Some(w) = b.get(i..i + 8) {
        let w = u64::from_le_bytes(w.try_into().expect("eight bytes"));
        // exact at the lowest zero byte (a borrow only runs up from a zero)
        let zero = w.wrapping_sub(ONES) & !w & HIGH;
        if zero != 0 {
            let at = (zero.trailing_zeros() / 8) as usize;
            // the bytes below the NUL
            high |= w & ((1u64 << (at * 8)) - 1);
            return Some((&b[..i + at], high & HIGH == 0));
        }
        high |= w;
        i += 8;
    }
    let end = i + b[i..].iter().position(|&c| c == 0)?;
    let tail = b[i..end].iter().fold(0u8, |a, &c| a | c);
    Some((&b[..end], high & HIGH == 0 && tail < 0x80))
}

/// The statement name a Parse body names, and the rest (query and types).
pub fn split_parse(mut body: &[u8]) -> Option<(&[u8], &[u8])> {
    let name = take_cstr(&mut body)?;
    Some((name, body))
}

/// The (portal, statement) names at the start of a Bind body, and how many bytes they take.
pub fn bind_names(mut body: &[u8]) -> Option<(&[u8], &[u8], usize)> {
    let total = body.len();
    let portal = take_cstr(&mut body)?;
    let stmt = take_cstr(&mut body)?;
    Some((portal, stmt, total - body.len()))
}

/// Describe or Close: ('S' or 'P', name).
pub fn target(body: &[u8]) -> Option<(u8, &[u8])> {
    let (&kind, mut rest) = body.split_first()?;
    let name = take_cstr(&mut rest)?;
    rest.is_empty().then_some((kind, name))
}

/// A statement name no [`StmtDef`] takes (theirs end in digits).
const PROBE_NAME: &[u8] = b"pgmux_probe\0";

/// Parse of `def`'s text under a name of its own, then Close of that name: for the server's
/// verdict on a Parse (inside a failed transaction) when the server already holds `def`
/// under pgmux's name, which a second Parse would find taken.
pub fn probe_messages(out: &mut BytesMut, def: &StmtDef) {
    messages::message(out, b'P', |b| {
        b.put_slice(PROBE_NAME);
        b.put_slice(&def.body);
    });
    messages::message(out, b'C', |b| {
        b.put_u8(b'S');
        b.put_slice(PROBE_NAME);
    });
}

pub fn close_statement(out: &mut BytesMut, id: u64) {
    messages::message(out, b'C', |b| {
        b.put_u8(b'S');
        put_server_name(b, id);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_text_reads_as_the_text_before_the_first_nul_checked_as_utf8() {
        let old = |mut b: &[u8]| -> String {
            take_cstr(&mut b)
                .map_or("", |q| std::str::from_utf8(q).unwrap_or(NOT_UTF8))
                .to_string()
        };
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let pieces: [&[u8]; 8] = [
            b"a",
            b"SELECT 1",
            b"\0",
            b"\xc3\xa9",
            b"\xff",
            b"\xe2\x82",
            b"x",
            b"\x7f",
        ];
        for n in 0..20_000 {
            let mut body = Vec::new();
            for _ in 0..n % 23 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                body.extend_from_slice(pieces[(seed % 8) as usize]);
            }
            assert_eq!(query_text(&body), old(&body), "{body:?}");
        }
        assert_eq!(
            query_text(b"SELECT abalance FROM t WHERE aid = 5;\0"),
            "SELECT abalance FROM t WHERE aid = 5;"
        );
        assert_eq!(query_text(b"SELECT 1"), "");
        assert_eq!(query_text(b"caf\xc3\xa9\0"), "caf\u{e9}");
        assert_eq!(query_text(b"abcdefg\xff\0"), NOT_UTF8);
        assert_eq!(query_text(b"abcdefgh\0\xff"), "abcdefgh");
    }

    #[test]
    fn a_text_that_is_not_utf8_reads_as_unreadable() {
        assert_eq!(query_text(b"SELECT 1\0\0\0"), "SELECT 1");
        assert_eq!(query_text(b"SELECT 1"), "");
        let text = query_text(b"SET search_path = a /* \xff */\0\0\0");
        assert_eq!(text, NOT_UTF8);
        assert_eq!(
            crate::router::effects::effects(text).pin,
            Some(crate::router::effects::PinReason::Unreadable)
        );
    }

    #[test]
    fn names_and_bodies() {
        let mut b = BytesMut::new();
        put_server_name(&mut b, 0);
        put_server_name(&mut b, 1234567);
        assert_eq!(&b[..], b"pgmux_0\0pgmux_1234567\0");
        assert_eq!(
            split_parse(b"s1\0SELECT 1\0\0\0"),
            Some((&b"s1"[..], &b"SELECT 1\0\0\0"[..]))
        );
        assert_eq!(bind_names(b"p\0s1\0rest"), Some((&b"p"[..], &b"s1"[..], 5)));
        assert_eq!(target(b"Ss1\0"), Some((b'S', &b"s1"[..])));
        assert_eq!(target(b"S"), None);
        assert_eq!(bind_names(b"p\0"), None);
    }

    #[test]
    fn equal_statements_share_an_id() {
        let r = Registry::default();
        let a = r.intern(b"SELECT 1\0\0\0", None);
        let b = r.intern(b"SELECT 1\0\0\0", None);
        let c = r.intern(b"SELECT 2\0\0\0", None);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
    }

    #[test]
    fn lru_eviction_spares_the_current_batch() {
        let r = Registry::default();
        let d: Vec<_> = (0..4)
            .map(|i| r.intern(format!("SELECT {i}\0\0\0").as_bytes(), None))
            .collect();
        let mut s = ServerStatements::default();
        s.touch(&d[1]);
        s.touch(&d[2]);
        let batch_start = s.now();
        s.touch(&d[3]);
        s.touch(&d[1]);
        assert_eq!(s.evictable(batch_start), Some(d[2].id));
        s.forget(d[2].id);
        assert_eq!(s.evictable(batch_start), None);
    }

    #[test]
    fn an_outdated_statement_is_held_as_outdated_until_prepared_again() {
        let r = Registry::default();
        let d = r.intern(b"SELECT * FROM t\0\0\0", None);
        let mut s = ServerStatements::default();
        assert_eq!(s.holds(&d), Held::No);
        s.touch(&d);
        assert_eq!(s.holds(&d), Held::Current);
        d.outdate();
        assert_eq!(s.holds(&d), Held::Outdated);
        assert_eq!(r.intern(b"SELECT * FROM t\0\0\0", None).generation(), 1);
        s.touch(&d);
        assert_eq!(s.holds(&d), Held::Current);
    }
}
