//! Walking a stream of protocol v3 messages in place: headers are always read, bodies only
//! when the caller asks to inspect that message type, so forwarded bytes are never copied
//! and a large message (a wide DataRow, CopyData) streams through without being buffered.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScanError {
    #[error("invalid message length {0}")]
    BadLength(u32),
    #[error("message of {0} bytes is larger than the limit of {1} bytes")]
    TooLarge(usize, usize),
}

/// What one scanning step found at the front of the unscanned bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// A whole message whose type the caller asked to inspect. `start` is its offset.
    Message {
        tag: u8,
        body: &'a [u8],
        start: usize,
    },
    /// The start of a message passed through without its body being read; `start` is its
    /// offset and `len` its whole length (which may reach past the buffer).
    Passed { tag: u8, len: usize, start: usize },
    /// Nothing more can be scanned until more bytes arrive; `reserve` is how many bytes the
    /// buffer must be able to hold beyond `pos` for an inspected message to fit.
    NeedMore { reserve: usize },
}

/// Position state across reads: how much of a passed-through message is still to come.
#[derive(Debug, Default, Clone)]
pub struct Scanner {
    remaining: usize,
}

impl Scanner {
    /// True when the scanner is between messages (no passed-through body still to come).
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Scans `buf` from `*pos`, advancing `*pos` over what it consumed.
    pub fn step<'a>(
        &mut self,
        buf: &'a [u8],
        pos: &mut usize,
        inspect: impl Fn(u8) -> bool,
        max_len: usize,
    ) -> Result<Step<'a>, ScanError> {
        let avail = buf.len().saturating_sub(*pos);
        if self.remaining > 0 {
            let n = self.remaining.min(avail);
            *pos += n;
            self.remaining -= n;
            if self.remaining > 0 {
                return Ok(Step::NeedMore { reserve: 0 });
            }
        }
        let rest = &buf[*pos..];
        if rest.len() < 5 {
            return Ok(Step::NeedMore { reserve: 5 });
        }
        let tag = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        if len < 4 {
            return Err(ScanError::BadLength(len));
        }
        let total = len as usize + 1;
        if total > max_len {
            return Err(ScanError::TooLarge(total, max_len));
        }
        if inspect(tag) {
            if rest.len() < total {
                return Ok(Step::NeedMore { reserve: total });
            }
            let start = *pos;
            *pos += total;
            return Ok(Step::Message {
                tag,
                body: &rest[5..total],
                start,
            });
        }
        let start = *pos;
        let n = total.min(rest.len());
        *pos += n;
        self.remaining = total - n;
        Ok(Step::Passed {
            tag,
            len: total,
            start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn inspected_and_passed_messages() {
        let mut buf = msg(b'D', b"rowdata");
        buf.extend(msg(b'Z', b"I"));
        let (mut s, mut pos) = (Scanner::default(), 0);
        let insp = |t| t == b'Z';
        assert_eq!(
            s.step(&buf, &mut pos, insp, 1 << 20).unwrap(),
            Step::Passed {
                tag: b'D',
                len: 12,
                start: 0
            }
        );
        assert_eq!(
            s.step(&buf, &mut pos, insp, 1 << 20).unwrap(),
            Step::Message {
                tag: b'Z',
                body: b"I",
                start: 12
            }
        );
        assert_eq!(pos, buf.len());
        assert!(matches!(
            s.step(&buf, &mut pos, insp, 1 << 20).unwrap(),
            Step::NeedMore { .. }
        ));
    }

    #[test]
    fn passed_bodies_stream_across_reads() {
        let full = msg(b'd', &[7u8; 100]);
        let mut s = Scanner::default();
        let mut pos = 0;
        let part = &full[..30];
        assert!(matches!(
            s.step(part, &mut pos, |_| false, 1000).unwrap(),
            Step::Passed { tag: b'd', .. }
        ));
        assert_eq!(pos, 30);
        assert!(!s.at_boundary());
        // the next read brings the rest plus a Sync
        let mut next = full[30..].to_vec();
        next.extend(msg(b'S', b""));
        let mut pos = 0;
        assert_eq!(
            s.step(&next, &mut pos, |_| false, 1000).unwrap(),
            Step::Passed {
                tag: b'S',
                len: 5,
                start: 75
            }
        );
        assert!(s.at_boundary());
        assert_eq!(pos, next.len());
    }

    #[test]
    fn inspected_message_waits_until_whole() {
        let full = msg(b'E', b"SERROR\0\0");
        let mut s = Scanner::default();
        let mut pos = 0;
        assert_eq!(
            s.step(&full[..7], &mut pos, |_| true, 1000).unwrap(),
            Step::NeedMore {
                reserve: full.len()
            }
        );
        assert_eq!(pos, 0);
    }

    #[test]
    fn bad_and_oversized_lengths() {
        let mut s = Scanner::default();
        let mut pos = 0;
        let bad = [b'Q', 0, 0, 0, 3];
        assert_eq!(
            s.step(&bad, &mut pos, |_| true, 100),
            Err(ScanError::BadLength(3))
        );
        let big = [b'Q', 0x7f, 0, 0, 0];
        assert!(matches!(
            s.step(&big, &mut pos, |_| false, 100),
            Err(ScanError::TooLarge(..))
        ));
    }
}
