//! A per-thread memo of the lexer pass (`normalize::fingerprint_and_effects`) by exact query
//! text. Over the extended protocol the same text comes back with every Parse of the unnamed
//! statement (parameters go in the Bind) and with every Bind of a tracked named one; its
//! fingerprint (SHOW QUERIES) and its effects (transaction pooling) were lexed again each
//! time, twice for a Parse. A simple Query's text usually carries its constants, so that
//! path does not use the memo: a miss costs a hash and a copy of the text.
//!
//! Both results are functions of the text alone, and a hit compares the whole text, so the
//! memo cannot answer for another statement. Bounded: [`SLOTS`] texts of at most
//! [`MAX_TEXT`] bytes per thread.

use super::effects::Effects;
use super::normalize::fingerprint_and_effects;
use std::cell::RefCell;

/// Texts kept per thread, one per slot (chosen by the text's hash).
const SLOTS: usize = 64;
/// Longest text kept: longer ones are lexed each time (and are rarer).
const MAX_TEXT: usize = 512;

struct Slot {
    text: Vec<u8>,
    lexed: (u64, Effects),
}

thread_local! {
    static MEMO: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

/// `fingerprint_and_effects(sql)`, from this thread's memo when it lexed the same text last.
pub fn lexed(sql: &str) -> (u64, Effects) {
    if sql.len() > MAX_TEXT {
        return fingerprint_and_effects(sql);
    }
    let at = (hash(sql.as_bytes()) % SLOTS as u64) as usize;
    let found = MEMO
        .try_with(|m| {
            let m = m.borrow();
            m.get(at)
                .filter(|s| s.text == sql.as_bytes())
                .map(|s| s.lexed)
        })
        .ok()
        .flatten();
    if let Some(lexed) = found {
        return lexed;
    }
    let lexed = fingerprint_and_effects(sql);
    // a thread being torn down keeps nothing
    let _ = MEMO.try_with(|m| {
        let mut m = m.borrow_mut();
        if m.is_empty() {
            m.resize_with(SLOTS, || Slot {
                text: Vec::new(),
                lexed: (0, Effects::default()),
            });
        }
        let slot = &mut m[at];
        slot.text.clear();
        slot.text.extend_from_slice(sql.as_bytes());
        slot.lexed = lexed;
    });
    lexed
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

    fn slot_of(sql: &str) -> Option<(Vec<u8>, (u64, Effects))> {
        let at = (hash(sql.as_bytes()) % SLOTS as u64) as usize;
        MEMO.with(|m| m.borrow().get(at).map(|s| (s.text.clone(), s.lexed)))
    }

    #[test]
    fn the_memo_answers_as_the_lexer_does_and_keeps_what_it_lexed() {
        let texts = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "SET search_path = app",
            "LISTEN jobs",
            "SELECT pg_advisory_lock($1)",
            "BEGIN",
            "select 'unterminated",
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
        let last_in_slot = texts
            .iter()
            .rev()
            .find(|o| hash(o.as_bytes()) % SLOTS as u64 == hash(t.as_bytes()) % SLOTS as u64)
            .unwrap();
        assert_eq!(kept, last_in_slot.as_bytes());
        assert_eq!(lexed_then, fingerprint_and_effects(last_in_slot));
    }

    #[test]
    fn a_text_of_the_same_slot_is_never_taken_for_another() {
        // many texts, so that slots are shared: each still gets its own answer
        let texts: Vec<String> = (0..SLOTS * 4)
            .map(|i| {
                if i % 2 == 0 {
                    format!("SELECT c{i} FROM t WHERE id = $1")
                } else {
                    format!("SET app.v{i} = 'x'")
                }
            })
            .collect();
        for _ in 0..2 {
            for t in &texts {
                assert_eq!(lexed(t), fingerprint_and_effects(t), "{t}");
            }
        }
    }

    #[test]
    fn long_texts_are_lexed_each_time_and_not_kept() {
        let long = format!("SELECT {} FROM t", "a, ".repeat(MAX_TEXT));
        assert_eq!(lexed(&long), fingerprint_and_effects(&long));
        assert!(slot_of(&long).is_none_or(|(kept, _)| kept != long.as_bytes()));
    }
}
