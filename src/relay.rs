//! The byte pump between a client and the server lent to it. One buffer per direction holds
//! bytes as read; a scanner walks message headers in place, acting on the few messages that
//! matter (ReadyForQuery, ParameterStatus, Terminate) and counting requests in flight, and
//! scanned bytes are written on from the same buffer. Reads stop while a direction has
//! `HIGH_WATER` bytes unwritten, so a slow reader holds back its writer instead of growing
//! pgmux's memory.

use crate::params::{self, Params};
use crate::protocol::messages::parse_parameter_status;
use crate::protocol::scan::{ScanError, Scanner, Step};
use crate::stats::Meter;
use bytes::{Buf, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

/// Bytes asked of the kernel per read.
pub const READ_CHUNK: usize = 16 * 1024;
/// Unwritten bytes in one direction beyond which its source is not read.
pub const HIGH_WATER: usize = 64 * 1024;
/// Rounds of work in one poll before yielding to other tasks.
const POLL_BUDGET: u32 = 32;

/// One direction: bytes read but not yet written; `buf[..scanned]` is ready to write.
#[derive(Default)]
pub struct Channel {
    pub buf: BytesMut,
    pub scanned: usize,
    pub scanner: Scanner,
}

impl Channel {
    /// Nothing buffered and not inside a message.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.scanner.at_boundary()
    }

    /// Gives the memory back while the connection sits idle.
    pub fn shrink_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// Writes what is ready; Ok(true) when some bytes went out.
    fn write_to<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> io::Result<bool> {
        if self.scanned == 0 {
            return Ok(false);
        }
        match Pin::new(&mut *w).poll_write(cx, &self.buf[..self.scanned]) {
            Poll::Ready(Ok(0)) => Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                self.buf.advance(n);
                self.scanned -= n;
                if self.scanned == 0 {
                    if let Poll::Ready(Err(e)) = Pin::new(w).poll_flush(cx) {
                        return Err(e);
                    }
                }
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(false),
        }
    }

    /// Reads more unless too much is waiting; Some(0) is end of stream, None nothing yet.
    fn read_from<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
    ) -> io::Result<Option<usize>> {
        if self.scanned >= HIGH_WATER {
            return Ok(None);
        }
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(r), cx, &mut self.buf) {
            Poll::Ready(Ok(n)) => Ok(Some(n)),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(None),
        }
    }
}

/// What the session must act on.
#[derive(Debug)]
pub enum Event {
    /// Detached, and the client sent something a server must answer.
    NeedServer,
    /// Transaction mode: the server is idle with nothing in flight and may go back.
    Release,
    /// The server answered everything and keeps serving this client (inside a transaction,
    /// or in session mode): idle timeouts start now.
    Quiet,
    /// The client closed its socket.
    ClientClosed,
    /// The client sent Terminate and everything before it has been answered.
    Terminated,
    ClientIo(io::Error),
    ServerClosed,
    ServerIo(io::Error),
    /// The client broke framing: bad length, oversized or unknown message.
    Protocol(String),
}

/// Request/response bookkeeping between a client and its server.
pub struct Flow {
    /// Queries, Syncs and FunctionCalls sent (or about to be) minus ReadyForQuery received.
    pub pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// The server's last transaction status ('I', 'T' or 'E').
    pub status: u8,
    /// The client sent Terminate.
    pub terminated: bool,
    /// Last client input or server ReadyForQuery: when idling started.
    pub idle_since: Instant,
}

impl Flow {
    /// The server owes the client nothing and the client is between requests.
    pub fn quiet(&self) -> bool {
        self.pending == 0 && !self.unsynced
    }
}

/// The server side as the relay sees it.
pub struct ServerSide<'a, S> {
    pub stream: &'a mut S,
    pub params: &'a mut Params,
}

pub struct Relay {
    pub c2s: Channel,
    pub s2c: Channel,
    pub flow: Flow,
    pub max_message: usize,
    pub transaction_mode: bool,
    /// Statistics hook (bytes, query and transaction clocks); see `stats::Meter`.
    pub meter: Meter,
}

impl Relay {
    pub fn new(max_message: usize, transaction_mode: bool) -> Relay {
        Relay {
            c2s: Channel::default(),
            s2c: Channel::default(),
            flow: Flow {
                pending: 0,
                unsynced: false,
                status: b'I',
                terminated: false,
                idle_since: Instant::now(),
            },
            max_message,
            transaction_mode,
            meter: Meter::default(),
        }
    }

    /// Moves bytes until something needs the session's attention.
    pub fn poll<C, S>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        mut server: Option<ServerSide<'_, S>>,
        wants: &mut Params,
    ) -> Poll<Event>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        for _ in 0..POLL_BUDGET {
            let mut progress = match self.s2c.write_to(cx, client) {
                Ok(p) => p,
                Err(_) if self.flow.terminated => self.discard_client_output(),
                Err(e) => return Poll::Ready(Event::ClientIo(e)),
            };
            if let Some(s) = server.as_mut() {
                match self.c2s.write_to(cx, &mut *s.stream) {
                    Ok(p) => progress |= p,
                    Err(e) => return Poll::Ready(Event::ServerIo(e)),
                }
                match self.s2c.read_from(cx, &mut *s.stream) {
                    Ok(Some(0)) => return Poll::Ready(Event::ServerClosed),
                    Ok(Some(n)) => {
                        progress = true;
                        self.meter.sent(n);
                        if let Some(ev) = self.scan_server(s.params, wants) {
                            return Poll::Ready(ev);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Event::ServerIo(e)),
                }
            }
            if !self.flow.terminated {
                match self.c2s.read_from(cx, client) {
                    Ok(Some(0)) => return Poll::Ready(Event::ClientClosed),
                    Ok(Some(n)) => {
                        progress = true;
                        self.meter.received(n);
                        self.flow.idle_since = Instant::now();
                        if let Err(e) = self.scan_client() {
                            return Poll::Ready(Event::Protocol(e));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Event::ClientIo(e)),
                }
            }
            if server.is_none() && self.c2s.scanned > 0 {
                return Poll::Ready(Event::NeedServer);
            }
            if self.flow.terminated
                && self.c2s.scanned == 0
                && (server.is_none() || self.flow.pending == 0)
            {
                return Poll::Ready(Event::Terminated);
            }
            if !progress {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// After Terminate the client may be gone: its replies are dropped, the server drained.
    fn discard_client_output(&mut self) -> bool {
        self.s2c.buf.advance(self.s2c.scanned);
        self.s2c.scanned = 0;
        true
    }

    fn scan_client(&mut self) -> Result<(), String> {
        let ch = &mut self.c2s;
        loop {
            let step = ch
                .scanner
                .step(&ch.buf, &mut ch.scanned, |t| t == b'X', self.max_message)
                .map_err(scan_error)?;
            match step {
                Step::Message { start, .. } => {
                    // Terminate is pgmux's to act on; a server never sees it
                    ch.buf.truncate(start);
                    ch.scanned = start;
                    self.flow.terminated = true;
                    return Ok(());
                }
                Step::Passed { tag, .. } => match tag {
                    b'Q' | b'F' => {
                        self.flow.pending += 1;
                        self.meter.request();
                    }
                    b'S' => {
                        self.flow.pending += 1;
                        self.flow.unsynced = false;
                        self.meter.request();
                    }
                    b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => self.flow.unsynced = true,
                    b'd' | b'c' | b'f' => {}
                    other => {
                        return Err(format!("invalid frontend message type {}", other as char))
                    }
                },
                Step::NeedMore { reserve } => {
                    reserve_for(&mut ch.buf, ch.scanned, reserve);
                    return Ok(());
                }
            }
        }
    }

    fn scan_server(&mut self, server_params: &mut Params, wants: &mut Params) -> Option<Event> {
        let ch = &mut self.s2c;
        let mut quiet = false;
        loop {
            let step = match ch.scanner.step(
                &ch.buf,
                &mut ch.scanned,
                |t| t == b'Z' || t == b'S' || t == b'E',
                usize::MAX,
            ) {
                Ok(s) => s,
                Err(e) => {
                    return Some(Event::ServerIo(io::Error::new(
                        io::ErrorKind::InvalidData,
                        e,
                    )));
                }
            };
            match step {
                Step::Message {
                    tag: b'Z', body, ..
                } => {
                    self.flow.status = body.first().copied().unwrap_or(b'I');
                    self.flow.pending = self.flow.pending.saturating_sub(1);
                    self.meter.ready(self.flow.status, self.flow.pending > 0);
                    self.flow.idle_since = Instant::now();
                    if self.transaction_mode
                        && self.flow.status == b'I'
                        && self.flow.quiet()
                        && self.c2s.scanner.at_boundary()
                    {
                        // whatever follows belongs to the server, not to this client
                        ch.buf.truncate(ch.scanned);
                        return Some(Event::Release);
                    }
                    quiet = self.flow.quiet();
                }
                // errors are rare and small: read for their SQLSTATE class (stats)
                Step::Message {
                    tag: b'E', body, ..
                } => self.meter.error(body),
                Step::Message { body, .. } => note_parameter(body, server_params, wants),
                Step::Passed { .. } => {}
                Step::NeedMore { reserve } => {
                    reserve_for(&mut ch.buf, ch.scanned, reserve);
                    return quiet.then_some(Event::Quiet);
                }
            }
        }
    }
}

fn scan_error(e: ScanError) -> String {
    match e {
        ScanError::BadLength(n) => format!("invalid message length {n}"),
        ScanError::TooLarge(n, max) => {
            format!("message of {n} bytes exceeds max_message_size {max}")
        }
    }
}

fn reserve_for(buf: &mut BytesMut, scanned: usize, need: usize) {
    let have = buf.len() - scanned;
    if need > have {
        buf.reserve(need - have);
    }
}

/// A parameter the server reported while serving the client is now what both hold.
fn note_parameter(body: &[u8], server_params: &mut Params, wants: &mut Params) {
    let Some((k, v)) = parse_parameter_status(body) else {
        return;
    };
    let (Ok(k), Ok(v)) = (std::str::from_utf8(k), std::str::from_utf8(v)) else {
        return;
    };
    server_params.set(k, v);
    if params::is_tracked(k) || wants.get(k).is_some() {
        wants.set(k, v);
    }
}
