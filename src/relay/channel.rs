//! One direction of the relay: bytes read from one peer and not yet written to the other.
//! `buf[..scanned]` has been scanned and may be written; `out` holds chunks spliced ahead of
//! it (bytes sealed off the front of `buf`, messages pgmux wrote in), so rewriting a message
//! moves pointers instead of copying the stream.

use crate::protocol::scan::Scanner;
use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

/// Bytes asked of the kernel per read.
pub const READ_CHUNK: usize = 16 * 1024;
/// First read of an idle connection: most requests are small, and idle memory matters.
const FIRST_READ: usize = 512;
/// Unwritten bytes in one direction beyond which its source is not read.
pub const HIGH_WATER: usize = 64 * 1024;
/// Chunks gathered into one vectored write.
const MAX_SLICES: usize = 8;

#[derive(Default)]
pub struct Channel {
    pub buf: BytesMut,
    pub scanned: usize,
    pub scanner: Scanner,
    out: VecDeque<Bytes>,
    out_len: usize,
    /// At least the size of any allocation `buf` has been a view of: only a buffer known to
    /// be small goes to the spares, since a small view of a large allocation (the tail of a
    /// large message) keeps all of it alive.
    grown: usize,
}

impl Channel {
    /// A channel whose unscanned input is `buf` (a request sent again elsewhere).
    pub fn with_input(buf: BytesMut) -> Channel {
        Channel {
            buf,
            // of unknown origin: never a spare
            grown: usize::MAX,
            ..Channel::default()
        }
    }

    /// Bytes ready to be written.
    pub fn ready_len(&self) -> usize {
        self.out_len + self.scanned
    }

    /// Nothing buffered and not inside a message.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.out.is_empty() && self.scanner.at_boundary()
    }

    /// Gives the memory back while the connection sits idle: to this thread's spares, for
    /// the next channel's first read (`spares`). In transaction mode a client gives its
    /// buffers back after each transaction; freeing and allocating them each time cost
    /// about 350 instructions per transaction (benches/instructions.sh).
    pub fn shrink_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            let buf = std::mem::take(&mut self.buf);
            if self.grown <= crate::spares::MAX_BUF {
                crate::spares::give_buf(buf, FIRST_READ);
            }
            self.grown = 0;
        }
    }

    /// Moves the scanned bytes `buf[..at]` to the queue of chunks to write.
    pub fn seal(&mut self, at: usize) {
        if at > 0 {
            let chunk = self.buf.split_to(at).freeze();
            self.scanned -= at;
            self.push(chunk);
        }
    }

    /// Queues bytes to write after everything sealed so far.
    pub fn push(&mut self, chunk: Bytes) {
        self.out_len += chunk.len();
        self.out.push_back(chunk);
    }

    /// Drops `n` scanned bytes from the front of `buf` (after a `seal`).
    #[inline]
    pub fn skip(&mut self, n: usize) {
        self.buf.advance(n);
        self.scanned -= n;
    }

    /// Drops the scanned bytes from `start` (the start of a message pgmux answers in its
    /// own way, or not at all) to the scanned position.
    pub fn drop_scanned_from(&mut self, start: usize) {
        let end = self.scanned;
        self.seal(start);
        self.skip(end - start);
    }

    /// Inserts a message at the scanned position, which must be a message boundary.
    pub fn insert(&mut self, msg: Bytes) {
        self.seal(self.scanned);
        self.push(msg);
    }

    /// Drops `n` bytes not yet scanned from the front (pgmux answered them itself).
    pub fn consume_unscanned(&mut self, n: usize) {
        debug_assert!(self.scanned == 0 && self.scanner.at_boundary());
        self.buf.advance(n);
    }

    /// Drops `n` bytes not yet scanned from `at` on (a message pgmux answered itself, behind
    /// one it keeps).
    pub fn remove_unscanned(&mut self, at: usize, n: usize) {
        if at == 0 {
            return self.consume_unscanned(n);
        }
        debug_assert!(self.scanned == 0 && self.scanner.at_boundary());
        let mut rest = self.buf.split_off(at);
        rest.advance(n);
        self.buf.unsplit(rest);
    }

    /// Everything ready is dropped (the reader is gone).
    pub fn discard_ready(&mut self) {
        self.out.clear();
        self.out_len = 0;
        self.skip(self.scanned);
    }

    /// All ready bytes as one buffer, for a last write outside the relay.
    pub fn take_ready(&mut self) -> BytesMut {
        let mut all = BytesMut::with_capacity(self.ready_len());
        for c in self.out.drain(..) {
            all.extend_from_slice(&c);
        }
        self.out_len = 0;
        all.extend_from_slice(&self.buf[..self.scanned]);
        self.skip(self.scanned);
        all
    }

    /// Writes what is ready; Ok(true) when some bytes went out. Chunks spliced ahead of the
    /// stream (a renamed Bind's head before the rest of the request) go out in one vectored
    /// write: written one by one, each was a send of its own, and the peer woke for each
    /// (strace at `pgbench -M prepared`: 3 sends a transaction instead of 2).
    // Inlined into the relay's loop, which calls it several times a transaction: left to
    // the compiler, whether it was depended on unrelated changes (100 to 400 instructions
    // per transaction, benches/instructions.sh).
    #[inline(always)]
    pub fn write_to<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> io::Result<bool> {
        let mut progress = false;
        loop {
            let written = if self.out.is_empty() {
                if self.scanned == 0 {
                    break;
                }
                Pin::new(&mut *w).poll_write(cx, &self.buf[..self.scanned])
            } else {
                self.write_chunks(cx, w)
            };
            let n = match written {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(progress),
            };
            progress = true;
            self.written(n);
        }
        if progress {
            if let Poll::Ready(Err(e)) = Pin::new(w).poll_flush(cx) {
                return Err(e);
            }
        }
        Ok(progress)
    }

    /// One write of the queued chunks and then the scanned bytes, as many as fit one call.
    fn write_chunks<W: AsyncWrite + Unpin>(
        &self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<usize>> {
        let mut slices = [io::IoSlice::new(&[]); MAX_SLICES];
        let mut k = 0;
        for c in self.out.iter().take(MAX_SLICES) {
            slices[k] = io::IoSlice::new(c);
            k += 1;
        }
        if k < MAX_SLICES && self.scanned > 0 {
            slices[k] = io::IoSlice::new(&self.buf[..self.scanned]);
            k += 1;
        }
        if k == 1 || !w.is_write_vectored() {
            return Pin::new(w).poll_write(cx, &slices[0]);
        }
        Pin::new(w).poll_write_vectored(cx, &slices[..k])
    }

    /// Drops `n` written bytes: queued chunks first, then scanned bytes.
    fn written(&mut self, mut n: usize) {
        while n > 0 {
            match self.out.front_mut() {
                Some(c) => {
                    let k = n.min(c.len());
                    c.advance(k);
                    self.out_len -= k;
                    n -= k;
                    if c.is_empty() {
                        self.out.pop_front();
                    }
                }
                None => {
                    self.skip(n);
                    n = 0;
                }
            }
        }
    }

    /// False while too much is waiting to be written: `read_from` reads nothing then.
    pub fn reads(&self) -> bool {
        self.ready_len() < HIGH_WATER
    }

    /// Reads more unless too much is waiting; Some(0) is end of stream, None nothing yet.
    #[inline(always)]
    pub fn read_from<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
    ) -> io::Result<Option<usize>> {
        if !self.reads() {
            return Ok(None);
        }
        if self.buf.capacity() == 0 {
            match crate::spares::take_buf() {
                Some(b) => {
                    self.buf = b;
                    self.grown = self.grown.max(crate::spares::MAX_BUF);
                }
                None => self.grow(FIRST_READ),
            }
        }
        if self.buf.capacity() - self.buf.len() < 256 {
            self.grow(READ_CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(r), cx, &mut self.buf) {
            Poll::Ready(Ok(n)) => Ok(Some(n)),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(None),
        }
    }

    /// Makes room for an inspected message of `need` bytes starting at `scanned`.
    pub fn reserve_for(&mut self, need: usize) {
        let have = self.buf.len() - self.scanned;
        if need > have {
            self.grow(need - have);
        }
    }

    /// Room for `n` more bytes: a new allocation, if any, is a whole one of `capacity()`.
    fn grow(&mut self, n: usize) {
        self.buf.reserve(n);
        self.grown = self.grown.max(self.buf.capacity());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(cap: usize) -> Channel {
        let mut ch = Channel::default();
        ch.reserve_for(cap);
        ch.buf.extend_from_slice(b"Q\0\0\0\x0dSELECT 1\0");
        ch.scanned = ch.buf.len();
        ch.seal(ch.scanned);
        ch
    }

    #[test]
    fn an_emptied_buffer_is_kept_whole_for_the_next_read() {
        while crate::spares::take_buf().is_some() {}
        let mut ch = drained(FIRST_READ);
        let at = ch.buf.as_ptr();
        ch.out.clear(); // written
        ch.shrink_if_empty();
        assert_eq!(ch.buf.capacity(), 0, "the channel gave it up");
        let b = crate::spares::take_buf().expect("kept");
        assert!(b.is_empty());
        assert!(b.capacity() >= FIRST_READ);
        assert_eq!(b.as_ptr(), at.wrapping_sub(14), "from its start again");
        assert!(crate::spares::take_buf().is_none());
    }

    #[test]
    fn a_buffer_still_shared_or_large_is_not_kept() {
        while crate::spares::take_buf().is_some() {}
        // the sealed chunk is not written yet: its bytes are still held
        let mut ch = drained(FIRST_READ);
        ch.shrink_if_empty();
        assert!(crate::spares::take_buf().is_none());
        let mut ch = drained(crate::spares::MAX_BUF * 2);
        ch.out.clear();
        ch.shrink_if_empty();
        assert!(crate::spares::take_buf().is_none());
        // a small view left at the end of a large allocation, nothing else holding it
        let mut ch = Channel::default();
        ch.reserve_for(1 << 20);
        let fill = ch.buf.capacity() - 2 * FIRST_READ;
        ch.buf.resize(fill, b'x');
        ch.scanned = fill;
        ch.seal(fill);
        ch.out.clear();
        assert_eq!(ch.buf.capacity(), 2 * FIRST_READ);
        ch.shrink_if_empty();
        let kept = crate::spares::take_buf();
        assert!(
            kept.is_none(),
            "it would keep 1 MiB alive: {:?}",
            kept.map(|b| b.capacity())
        );
    }

    /// A peer that takes at most `limit` bytes a call and records each call's bytes.
    struct Recorder {
        calls: Vec<Vec<u8>>,
        limit: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.limit);
            self.calls.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = all.len().min(self.limit);
            self.calls.push(all[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A channel holding a spliced message, two sealed chunks around it and scanned bytes.
    fn spliced() -> (Channel, Vec<u8>) {
        let mut ch = Channel::default();
        ch.reserve_for(64);
        ch.buf.extend_from_slice(b"B-head|B-tail|D|E|S|unscanned");
        ch.scanned = 20;
        ch.seal(7);
        ch.push(Bytes::from_static(b"<renamed>"));
        (ch, b"B-head|<renamed>B-tail|D|E|S|".to_vec())
    }

    #[test]
    fn spliced_chunks_go_out_in_one_write() {
        let (mut ch, want) = spliced();
        let mut peer = Recorder {
            calls: vec![],
            limit: usize::MAX,
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(ch.write_to(&mut cx, &mut peer).unwrap());
        assert_eq!(peer.calls, vec![want]);
        assert_eq!(ch.ready_len(), 0);
        assert_eq!(&ch.buf[..], b"unscanned");
    }

    #[test]
    fn short_writes_resume_where_they_stopped() {
        for limit in 1..12 {
            let (mut ch, want) = spliced();
            let mut peer = Recorder {
                calls: vec![],
                limit,
            };
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(ch.write_to(&mut cx, &mut peer).unwrap());
            assert_eq!(peer.calls.concat(), want, "limit {limit}");
            assert_eq!(ch.ready_len(), 0);
            assert_eq!(&ch.buf[..], b"unscanned");
        }
    }
}
