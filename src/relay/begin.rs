//! A lone BEGIN, answered by pgmux (`defer_begin`). In transaction mode a client that sends
//! BEGIN and waits for its answer would hold a server for nothing but that round trip:
//! pgmux answers it as PostgreSQL would and keeps it, and it goes to a server in front of
//! the client's next request, whose server the transaction then keeps. The server's own
//! answer to it is dropped (`Relay::scan_server`).
//!
//! Only a plain BEGIN (or BEGIN WORK, BEGIN TRANSACTION, START TRANSACTION) with no options,
//! alone in its simple Query: a server in no transaction cannot refuse it. Options
//! (isolation level, READ ONLY) go to a server as they are: one could be refused.

use bytes::Bytes;

/// The texts taken, longest `START TRANSACTION ;` with some spaces: anything longer is not one.
const MAX_TEXT: usize = 64;

/// CommandComplete `BEGIN`, then ReadyForQuery in a transaction block.
const BEGIN_ANSWER: &[u8] = b"C\0\0\0\x0aBEGIN\0Z\0\0\0\x05T";
/// CommandComplete `START TRANSACTION` (PostgreSQL's tag for it), then ReadyForQuery.
const START_ANSWER: &[u8] = b"C\0\0\0\x16START TRANSACTION\0Z\0\0\0\x05T";

/// The answer PostgreSQL would give if `buf` is exactly one simple Query of a plain BEGIN.
pub fn lone_begin_answer(buf: &[u8]) -> Option<Bytes> {
    let (&tag, rest) = buf.split_first()?;
    if tag != b'Q' || buf.len() < 6 || buf.len() > 5 + MAX_TEXT {
        return None;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    if len + 1 != buf.len() {
        return None;
    }
    let text = buf[5..].strip_suffix(b"\0")?;
    match plain_begin(text)? {
        Begin::Begin => Some(Bytes::from_static(BEGIN_ANSWER)),
        Begin::Start => Some(Bytes::from_static(START_ANSWER)),
    }
}

enum Begin {
    Begin,
    Start,
}

/// Which plain BEGIN `text` is: words in any case, any ASCII whitespace, one `;` at the end.
fn plain_begin(text: &[u8]) -> Option<Begin> {
    let text = text.trim_ascii();
    let text = text.strip_suffix(b";").unwrap_or(text);
    let mut words = text
        .split(u8::is_ascii_whitespace)
        .filter(|w| !w.is_empty());
    let first = words.next()?;
    let second = words.next();
    if words.next().is_some() {
        return None;
    }
    let is = |w: &[u8], word: &str| w.eq_ignore_ascii_case(word.as_bytes());
    match second {
        None if is(first, "begin") => Some(Begin::Begin),
        Some(w) if is(first, "begin") && (is(w, "work") || is(w, "transaction")) => {
            Some(Begin::Begin)
        }
        Some(w) if is(first, "start") && is(w, "transaction") => Some(Begin::Start),
        _ => None,
    }
}

/// Messages up to this long are waited for whole behind an answered BEGIN.
const SHORT: usize = 4096;

/// `buf` starts with a message of at most `SHORT` bytes that is not all there yet.
pub fn short_and_cut(buf: &[u8]) -> bool {
    front_len(buf).is_none_or(|n| n <= SHORT && n > buf.len())
}

/// The length of the whole message at the front of `buf`, if its header is there.
pub fn front_len(buf: &[u8]) -> Option<usize> {
    let h = buf.get(..5)?;
    Some(1 + u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(text: &str) -> Vec<u8> {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&(4 + text.len() as u32 + 1).to_be_bytes());
        m.extend_from_slice(text.as_bytes());
        m.push(0);
        m
    }

    #[test]
    fn plain_begins_are_answered_with_their_tags() {
        for t in [
            "BEGIN",
            "begin;",
            "  Begin Work ; ",
            "BEGIN\n\tTRANSACTION",
            "begin ;",
        ] {
            assert_eq!(
                lone_begin_answer(&query(t)).as_deref(),
                Some(BEGIN_ANSWER),
                "{t:?}"
            );
        }
        assert_eq!(
            lone_begin_answer(&query("start transaction;")).as_deref(),
            Some(START_ANSWER)
        );
    }

    #[test]
    fn anything_else_goes_to_a_server() {
        for t in [
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "BEGIN READ ONLY",
            "BEGIN; SELECT 1",
            "BEGIN;;",
            "/* x */ BEGIN",
            "BEGINS",
            "START",
            "COMMIT",
            "",
        ] {
            assert!(lone_begin_answer(&query(t)).is_none(), "{t:?}");
        }
        // a BEGIN followed by anything, or cut short, is not alone
        let mut two = query("BEGIN");
        two.extend_from_slice(&query("SELECT 1"));
        assert!(lone_begin_answer(&two).is_none());
        let one = query("BEGIN");
        assert!(lone_begin_answer(&one[..one.len() - 1]).is_none());
        let mut parse = query("BEGIN");
        parse[0] = b'P';
        assert!(lone_begin_answer(&parse).is_none());
    }

    #[test]
    fn a_short_message_not_all_here_is_waited_for() {
        let q = query("DEALLOCATE lrupsc_1_2");
        assert!(short_and_cut(&q[..3]), "not even its header");
        assert!(short_and_cut(&q[..q.len() - 1]));
        assert!(!short_and_cut(&q), "all here");
        let mut long = vec![b'Q'];
        long.extend_from_slice(&(SHORT as u32 + 10).to_be_bytes());
        assert!(!short_and_cut(&long), "a long one goes on as it comes");
    }

    #[test]
    fn the_answers_are_well_formed() {
        for a in [BEGIN_ANSWER, START_ANSWER] {
            let c = front_len(a).unwrap();
            assert_eq!(a[c], b'Z');
            assert_eq!(c + front_len(&a[c..]).unwrap(), a.len());
        }
    }
}
