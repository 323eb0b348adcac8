//! A per-thread memo of the lexer pass (`normalize::fingerprint_and_effects`). In transaction
//! mode every statement needs its fingerprint (SHOW QUERIES) and its effects (session state),
//! and most statements an application sends are a few texts that differ only in their
//! numbers: pgbench's `... WHERE aid = 463221`, an ORM's `LIMIT 20`, and over the extended
//! protocol the same text with every Parse of the unnamed statement and every Bind.
//!
//! The memo is keyed by the text with each run of digits that does not continue a word
//! replaced by one 0xFF byte (which UTF-8 text never holds): `aid = 5` and `aid = 463221`
//! share a key, `t1` and `t2` do not. Both results are functions of that key: the lexer
//! decides by byte classes, never by which digit it reads, so such a run is always a number,
//! a parameter's digits or part of a string or comment, each of which fingerprints and scans
//! as a placeholder or not at all. Two exceptions are keyed by their exact text: a text with
//! a `"` (a quoted identifier, `"col 1"`, keeps its digits) and a text the lexer cannot read
//! to its end (its fingerprint holds the unread rest as written), whose results are not kept.
//! A hit compares the whole key, so the memo cannot answer for another statement. Bounded:
//! [`SLOTS`] keys of at most [`MAX_TEXT`] bytes per thread.

use super::classify::is_ident_char;
use super::effects::{Effects, PinReason};
use super::normalize::fingerprint_and_effects;
use std::cell::RefCell;

/// Keys kept per thread, one per slot (chosen by the key's hash).
const SLOTS: usize = 256;
/// Longest text kept: longer ones are lexed each time (and are rarer).
const MAX_TEXT: usize = 512;

/// What stands for a run of digits in a key.
const DIGITS: u8 = 0xFF;

struct Slot {
    key: Vec<u8>,
    lexed: (u64, Effects),
}

#[derive(Default)]
struct Memo {
    slots: Vec<Slot>,
    /// The key being looked up, built here so a lookup does not allocate.
    scratch: Vec<u8>,
    /// The slot of the last lookup: the same text often comes twice in a row (a Parse is
    /// fingerprinted, then scanned for its effects).
    last: usize,
}

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo::default());
}

/// `fingerprint_and_effects(sql)`, from this thread's memo when it lexed a text with the same
/// key last.
pub fn lexed(sql: &str) -> (u64, Effects) {
    if sql.len() > MAX_TEXT {
        return fingerprint_and_effects(sql);
    }
    // a thread being torn down keeps nothing
    MEMO.try_with(|m| lexed_in(&mut m.borrow_mut(), sql))
        .unwrap_or_else(|_| fingerprint_and_effects(sql))
}

fn lexed_in(m: &mut Memo, sql: &str) -> (u64, Effects) {
    let Memo {
        slots,
        scratch,
        last,
    } = m;
    // A key equal to the text itself holds no masked run (0xFF is never in UTF-8), so it is
    // that text's own key: no need to build it.
    if let Some(s) = slots.get(*last).filter(|s| s.key == sql.as_bytes()) {
        return s.lexed;
    }
    let key: &[u8] = match masked_into(sql.as_bytes(), scratch) {
        true => scratch,
        false => sql.as_bytes(),
    };
    let at = (hash(key) % SLOTS as u64) as usize;
    *last = at;
    if let Some(s) = slots.get(at).filter(|s| s.key == key) {
        return s.lexed;
    }
    let lexed = fingerprint_and_effects(sql);
    if lexed.1.pin == Some(PinReason::Unreadable) {
        return lexed;
    }
    if slots.is_empty() {
        slots.resize_with(SLOTS, || Slot {
            key: Vec::new(),
            lexed: (0, Effects::default()),
        });
    }
    let slot = &mut slots[at];
    slot.key.clear();
    slot.key.extend_from_slice(key);
    slot.lexed = lexed;
    lexed
}

/// The memo's key of `sql` into `key` (see the module's comment), or false when the key is
/// `sql` as it is (nothing masked, or a `"` in it). Copies only around masked runs.
fn masked_into(sql: &[u8], key: &mut Vec<u8>) -> bool {
    let mut masked = false;
    // sql[copied..] is not in the key yet
    let mut copied = 0;
    let mut i = 0;
    while i < sql.len() {
        // to the next digit or quote, eight bytes at a time: most of a statement has none
        match sql.get(i..i + 8) {
            Some(w) => match first_digit_or_quote(u64::from_le_bytes(w.try_into().expect("8"))) {
                None => {
                    i += 8;
                    continue;
                }
                Some(at) => i += at,
            },
            // the last few bytes one by one
            None if !(sql[i].is_ascii_digit() || sql[i] == b'"') => {
                i += 1;
                continue;
            }
            None => {}
        }
        if sql[i] == b'"' {
            return false;
        }
        let run = i;
        while i < sql.len() && sql[i].is_ascii_digit() {
            i += 1;
        }
        if run > 0 && is_ident_char(sql[run - 1]) {
            // part of a word (`t1`) or a parameter (`$1`): kept as written
            continue;
        }
        if !masked {
            key.clear();
            masked = true;
        }
        key.extend_from_slice(&sql[copied..run]);
        key.push(DIGITS);
        copied = i;
    }
    if masked {
        key.extend_from_slice(&sql[copied..]);
    }
    masked
}

/// Which of the eight bytes of `w` (little-endian) is the first ASCII digit or `"`, if any
/// (bitwise, per byte; a byte of 0x80 or more is neither).
fn first_digit_or_quote(w: u64) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let ascii = !w & HIGH;
    // per byte, below 0x80 no sum carries into the next byte
    let low7 = w & !HIGH;
    let at_least_0 = low7 + ONES * (0x80 - b'0' as u64);
    let above_9 = low7 + ONES * (0x7F - b'9' as u64);
    let digit = at_least_0 & !above_9 & ascii;
    // a zero byte of w ^ "...": exact at the lowest one (a borrow only runs up from a zero)
    let q = w ^ (ONES * b'"' as u64);
    let quote = q.wrapping_sub(ONES) & !q & HIGH;
    let found = digit | quote;
    (found != 0).then(|| (found.trailing_zeros() / 8) as usize)
}

/// A multiply-rotate hash eight bytes at a time: it only spreads texts over the slots.
fn hash(b: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = b.len() as u64;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("eight bytes"));
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    (h.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(sql: &str) -> Vec<u8> {
        let mut k = Vec::new();
        match masked_into(sql.as_bytes(), &mut k) {
            true => k,
            false => sql.as_bytes().to_vec(),
        }
    }

    #[test]
    fn the_first_digit_or_quote_of_eight_bytes_is_found_as_byte_by_byte() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for n in 0..200_000u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // every byte value, and words mostly of the bytes near the edges
            let w = if n < 256 {
                n * 0x0101_0101_0101_0101
            } else {
                seed
            };
            let w = match n % 3 {
                0 => (w & 0x0f0f_0f0f_0f0f_0f0f) | 0x2020_2020_2020_2020,
                1 => (w & 0x0f0f_0f0f_0f0f_0f0f) | 0x3030_3030_3030_3030,
                _ => w,
            };
            let alone = w
                .to_le_bytes()
                .iter()
                .position(|b| b.is_ascii_digit() || *b == b'"');
            assert_eq!(first_digit_or_quote(w), alone, "{w:#018x}");
        }
    }

    fn slot_of(sql: &str) -> Option<(Vec<u8>, (u64, Effects))> {
        let at = (hash(&key_of(sql)) % SLOTS as u64) as usize;
        MEMO.with(|m| m.borrow().slots.get(at).map(|s| (s.key.clone(), s.lexed)))
    }

    #[test]
    fn the_memo_answers_as_the_lexer_does_and_keeps_what_it_lexed() {
        let texts = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "SET search_path = app",
            "LISTEN jobs",
            "SELECT pg_advisory_lock($1)",
            "BEGIN",
            "",
        ];
        for round in 0..3 {
            for t in texts {
                assert_eq!(lexed(t), fingerprint_and_effects(t), "{t:?}, round {round}");
            }
        }
        let t = texts[1];
        let (kept, lexed_then) = slot_of(t).expect("slots made");
        // the last text lexed in its slot is kept (two of these may share a slot)
        let slot = |o: &str| hash(&key_of(o)) % SLOTS as u64;
        let last_in_slot = texts.iter().rev().find(|o| slot(o) == slot(t)).unwrap();
        assert_eq!(kept, key_of(last_in_slot));
        assert_eq!(lexed_then, fingerprint_and_effects(last_in_slot));
    }

    #[test]
    fn texts_that_differ_only_in_their_numbers_share_one_entry() {
        let a = "UPDATE pgbench_accounts SET abalance = abalance + -2311 WHERE aid = 463221;";
        let b = "UPDATE pgbench_accounts SET abalance = abalance + -7 WHERE aid = 12;";
        assert_eq!(key_of(a), key_of(b));
        assert_eq!(lexed(a), fingerprint_and_effects(a));
        // b is answered from a's entry, which stays as it was
        assert_eq!(lexed(b), fingerprint_and_effects(b));
        assert_eq!(slot_of(b).map(|(k, _)| k), Some(key_of(a)));
        assert_eq!(key_of("SELECT 1.5e10"), b"SELECT \xFF.\xFFe10");
    }

    #[test]
    fn digits_that_name_something_keep_their_key_apart() {
        // each pair has one key only if the lexer would read both alike
        let pairs = [
            ("SELECT c FROM t1", "SELECT c FROM t2"),
            ("SELECT \"col 1\" FROM t", "SELECT \"col 2\" FROM t"),
            ("SELECT 'a\"' || \"b 1\"", "SELECT 'a\"' || \"b 2\""),
            ("SELECT # FROM t", "SELECT 5 FROM t"),
            ("SELECT $a1$x$a1$", "SELECT $a2$x$a2$"),
            ("SELECT 1e5", "SELECT 1e6"),
            ("SELECT 'unterminated 1", "SELECT 'unterminated 2"),
            ("SELECT é1", "SELECT é2"),
        ];
        for (a, b) in pairs {
            for _ in 0..2 {
                assert_eq!(lexed(a), fingerprint_and_effects(a), "{a}");
                assert_eq!(lexed(b), fingerprint_and_effects(b), "{b}");
            }
        }
        // what the lexer reads apart is told apart
        for (a, b) in &pairs[..2] {
            assert_ne!(lexed(a).0, lexed(b).0, "{a} / {b}");
        }
    }

    /// Texts put together from pieces that hold digits in every place the lexer knows (words,
    /// numbers, strings, escapes, parameters, dollar quotes, comments, quoted identifiers,
    /// lists), each with digits drawn at random: the memo answers each as the lexer does.
    #[test]
    fn the_memo_never_answers_for_another_text() {
        const PIECES: &[&str] = &[
            "SELECT",
            "t#",
            "c#_x",
            "#",
            "-#",
            "#.#",
            ".#",
            "#e#",
            "'s#'",
            "E'\\#'",
            "$#",
            "$a#$b#$a#$",
            "$$#$$",
            "/* # */",
            "-- #\n",
            "\"q #\"",
            "IN (#, #)",
            "= #",
            "pg_advisory_lock(#)",
            "set_config('a.b#', '#', false)",
            "SET x = #",
            ";",
            "é#",
            "U&'\\00#'",
            "'#",
            "/* #",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..4000 {
            let mut sql = String::new();
            for _ in 0..1 + next(6) {
                let piece = PIECES[next(PIECES.len() as u64) as usize];
                for ch in piece.chars() {
                    match ch {
                        '#' => {
                            let digits = 1 + next(4) as u32;
                            sql.push_str(&next(10u64.pow(digits)).to_string());
                        }
                        c => sql.push(c),
                    }
                }
                sql.push(' ');
            }
            // twice: the second time from the last slot looked up
            for _ in 0..2 {
                assert_eq!(lexed(&sql), fingerprint_and_effects(&sql), "{sql:?}");
            }
        }
    }

    #[test]
    fn long_texts_are_lexed_each_time_and_not_kept() {
        let long = format!("SELECT {} FROM t", "a, ".repeat(MAX_TEXT));
        assert_eq!(lexed(&long), fingerprint_and_effects(&long));
        assert!(slot_of(&long).is_none_or(|(kept, _)| kept != key_of(&long)));
    }
}
