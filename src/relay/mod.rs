//! The byte pump between a client and the server lent to it. One buffer per direction
//! (`channel`) holds bytes as read; a scanner walks message headers in place, acting on the
//! few messages that matter (ReadyForQuery, ParameterStatus, Terminate, and in transaction
//! mode the named-statement messages `statements` rewrites) and counting requests in flight.
//! Scanned bytes are written on from the same buffer. Reads stop while a direction has
//! `HIGH_WATER` bytes unwritten, so a slow reader holds back its writer instead of growing
//! pgmux's memory.

mod begin;
pub mod channel;
mod keys;
pub mod retry;
pub mod statements;

use crate::clock::Mono;
use crate::params::{self, Params};
use crate::prepared::{self, Registry, ServerStatements};
use crate::protocol::messages::{is_frontend_type, parse_parameter_status};
use crate::protocol::scan::{ScanError, Step};
use crate::router::effects::{custom_setting_names, Effects, PinReason};
use crate::router::memo;
use crate::stats::Meter;
use bytes::{Bytes, BytesMut};
pub use channel::{Channel, HIGH_WATER, READ_CHUNK};
use statements::Tracker;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

/// Rounds of work in one poll before yielding to other tasks.
const POLL_BUDGET: u32 = 32;

/// A Sync message, as pgmux sends it to end a flushed read unit (`end_flushed_read`).
const SYNC: &[u8] = b"S\0\0\0\x04";
/// A Flush message.
const FLUSH: &[u8] = b"H\0\0\0\x04";
const READY_IDLE: &[u8] = b"Z\0\0\0\x05I";

/// What the session must act on.
#[derive(Debug)]
pub enum Event {
    /// Detached, and the client sent something a server must answer.
    NeedServer,
    /// Transaction mode: the server is idle with nothing in flight and may go back.
    Release,
    /// Transaction mode: a pinned client reset settings, which on its server went to the
    /// server's defaults; it is idle with nothing in flight, to be brought back to the
    /// client's startup settings before it goes on.
    Resync,
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
    /// While a retry is armed, the server's first error said the server itself failed
    /// (`retry::is_server_failure`); the error has not reached the client.
    ServerFailed(String),
    /// The client broke framing: bad length, oversized or unknown message.
    Protocol(ClientProtocolError),
}

/// How a client broke the protocol; it is told so (FATAL 08P01) and closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientProtocolError {
    /// A number, as PostgreSQL prints it: the byte itself may be a NUL.
    #[error("invalid frontend message type {0}")]
    UnknownType(u8),
    #[error("invalid message length {0}")]
    BadLength(u32),
    #[error("message of {0} bytes exceeds max_message_size {1}")]
    TooLarge(usize, usize),
}

impl From<ScanError> for ClientProtocolError {
    fn from(e: ScanError) -> Self {
        match e {
            ScanError::BadLength(n) => ClientProtocolError::BadLength(n),
            ScanError::TooLarge(n, max) => ClientProtocolError::TooLarge(n, max),
        }
    }
}

/// Checks the header at the front of `head` (at least 5 bytes) before the message is acted
/// on: a message no server may see must not cost a server (one lent for it would be closed,
/// half-fed) nor be written to the one attached.
/// Binds up to this size are read whole; a larger one (a big parameter) streams through
/// with only its head rewritten, so that pgmux never holds a whole large Bind.
const BIND_READ_WHOLE: usize = 16 * 1024;

/// At `rest`: a Bind too large to read whole whose two names have arrived.
fn big_bind_named(rest: &[u8]) -> bool {
    let Some(&[b'B', a, b, c, d]) = rest.get(..5) else {
        return false;
    };
    let total = u32::from_be_bytes([a, b, c, d]) as usize + 1;
    total > BIND_READ_WHOLE && prepared::bind_names(&rest[5..rest.len().min(total)]).is_some()
}

/// Buffered input beyond which an unfinished unit is routed as it stands (then as a write:
/// work not all seen is primary work).
const UNIT_WAIT_LIMIT: usize = 1 << 20;

/// Whether the unit at the front of `buf` can be routed: extended messages up to a Sync,
/// Flush, Query or FunctionCall (a client waits for answers only after one; PostgreSQL
/// answers a Query sent behind unsynced extended messages too).
fn unit_complete(buf: &[u8]) -> bool {
    let mut at = 0;
    while let Some(head) = buf.get(at..at + 5) {
        if matches!(head[0], b'S' | b'H' | b'Q' | b'F') {
            return true;
        }
        at += 1 + u32::from_be_bytes([head[1], head[2], head[3], head[4]]).max(4) as usize;
    }
    buf.len() >= UNIT_WAIT_LIMIT
}

fn check_header(head: &[u8], max_message: usize) -> Result<(), ClientProtocolError> {
    if !is_frontend_type(head[0]) {
        return Err(ClientProtocolError::UnknownType(head[0]));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len < 4 {
        return Err(ClientProtocolError::BadLength(len));
    }
    let total = len as usize + 1;
    if total > max_message {
        return Err(ClientProtocolError::TooLarge(total, max_message));
    }
    Ok(())
}

/// Request/response bookkeeping between a client and its server.
pub struct Flow {
    /// Queries, Syncs and FunctionCalls sent minus ReadyForQuery received.
    pub pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// The server's last transaction status ('I', 'T' or 'E').
    pub status: u8,
    /// The client sent Terminate.
    pub terminated: bool,
    /// Last client input or server ReadyForQuery: when idling started.
    pub idle_since: Mono,
    /// COPY FROM STDIN bookkeeping: the server ignores Syncs while it is in copy-in mode,
    /// started by a Query or an Execute. Syncs sent since the last of those (before a
    /// CopyDone or CopyFail): ignored if it turns out to start a COPY.
    syncs_since_start: u32,
    copy_done_sent: bool,
    copy_in: bool,
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
    pub statements: &'a mut ServerStatements,
}

pub struct Relay {
    pub c2s: Channel,
    pub s2c: Channel,
    pub flow: Flow,
    pub max_message: usize,
    pub transaction_mode: bool,
    /// Named-statement rewriting (transaction mode with max_prepared_statements > 0): made
    /// at the client's first extended-protocol message (`new_tracker`), so a client that only
    /// sends simple Queries never has one.
    pub tracker: Option<Tracker>,
    /// Whether this client's statements are tracked, and with what.
    pub tracking: Option<Tracking>,
    /// Statistics hook (bytes, query and transaction clocks); see `stats::Meter`.
    pub meter: Meter,
    /// What the client's queries did to the server session (transaction mode).
    pub session: SessionState,
    /// Which statement each request runs (SHOW QUERIES).
    keys: keys::Keys,
    /// The request kept, and the answer held back, while a replica read may be retried.
    pub retry: retry::Retry,
    /// The server serves one routed unit (a replica read): what the client sends after that
    /// unit's end stays unscanned until the server goes back, to be routed on its own (a
    /// pipelined write must not reach the replica).
    one_unit: bool,
    /// The server (a replica) serves a read-only transaction: a unit is scanned only once
    /// the one before it is answered, so that what follows the transaction's end (the
    /// server's ReadyForQuery `I`) stays unscanned, to be routed on its own once the server
    /// goes back. Pipelined, a write behind the COMMIT would reach the replica (25006).
    unit_at_a_time: bool,
    /// Units (Query, Sync, FunctionCall) scanned since the server was attached.
    units: u32,
    /// pgmux sent a Sync of its own to end a flushed read unit (`end_flushed_read`): the
    /// next ReadyForQuery is its answer, not the client's.
    own_sync: bool,
    /// An ErrorResponse came since the last ReadyForQuery: the server skips to the next Sync.
    unit_failed: bool,
    /// A PortalSuspended came since the last ReadyForQuery: the client may still fetch more
    /// of that portal, on this server.
    suspended: bool,
    /// The last message sent was a Flush (the client's, or pgmux's to learn how a flushed
    /// read ended): the server answers all that came before it.
    flushed: bool,
    /// The client sent a Flush since its last Sync, Query or FunctionCall: it may have read
    /// answers and sent more after them (a batch's request never has one).
    client_flushed: bool,
    /// The server is in COPY FROM STDIN (CopyInResponse came; no CopyDone, CopyFail or
    /// ReadyForQuery since): it answers nothing until the client's data ends.
    copy_from_client: bool,
    /// Read/write splitting: an extended-protocol unit is routed once it is whole (its Sync,
    /// or a Flush, has arrived), so a write behind a read in the same unit is seen.
    pub whole_units: bool,
    /// A message no server may see came after valid ones: as PostgreSQL, pgmux answers what
    /// came before it, then refuses (and the server, clean again, goes back to the pool).
    refused: Option<ClientProtocolError>,
    /// The fingerprint and effects of the Query at the front of the input, found while its
    /// client waited (`client::batch_ticket`): the scan takes them instead of lexing again.
    pub prescanned: Option<(u64, Effects)>,
    /// Set by the session before each poll: whether it acts on every `Event::Quiet` (a
    /// client timeout is set, which starts or stops there, or it holds a batch's seat).
    /// Otherwise a quiet server is reported only when the pin changed from `pin_shown`: in
    /// a transaction of many statements each report cost the session a turn of its loop.
    pub quiet_wanted: bool,
    /// The pin the session shows (SHOW CLIENTS), set with `quiet_wanted`.
    pub pin_shown: Option<PinReason>,
    /// Transaction mode with `defer_begin`: a lone BEGIN is answered by pgmux (`begin`).
    pub defers_begin: bool,
    /// pgmux answered the BEGIN at the front of the client's input: it waits there for the
    /// client's next request, and the server's answer to it is not the client's.
    pub begin_answered: bool,
}

/// Session state a transaction-mode client left on its server.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Settings may have changed since the server was lent: read them back before it goes.
    pub settings_changed: bool,
    /// State that cannot follow the client to another server: it keeps this one.
    pub pin: Option<PinReason>,
    /// pgmux settings the unit reset (`router::effects::PGMUX_ROUTE`...), for the read-back.
    pub pgmux_reset: u8,
    /// Custom settings the unit named (`myapp.tenant`): PostgreSQL does not list them in
    /// pg_settings, so the read-back asks for each by name. Bounded: past
    /// `MAX_CUSTOM_SETTINGS` the client keeps its server (`PinReason::Settings`).
    pub custom_settings: Vec<String>,
    /// The pin the client's startup settings give it (a `search_path` naming `pg_temp`),
    /// which a DISCARD ALL, going back to them, does not undo.
    pub startup_pin: Option<PinReason>,
    /// The client reset a setting (`Effects::resets`) since its server was last brought in
    /// step with it.
    pub reset_seen: bool,
    /// A DISCARD ALL was sent and nothing pinned since: when the server says it ran, what
    /// pinned the client is gone (`Relay::discarded`).
    pub unpin_at_discard: bool,
}

/// Custom setting names one unit of work may name before its client is pinned instead.
pub const MAX_CUSTOM_SETTINGS: usize = 64;

impl SessionState {
    fn pin(&mut self, reason: PinReason) {
        self.pin.get_or_insert(reason);
        self.unpin_at_discard = false;
    }

    /// The server ran a DISCARD ALL: what pinned the client before it is gone, unless the
    /// client sent something that pins since (it may have run after it). The startup pin
    /// comes back once the server is let go (`Session::detach`): the server's settings are
    /// now its defaults, and the next one is brought to the client's startup settings.
    fn discarded(&mut self) {
        if std::mem::take(&mut self.unpin_at_discard) {
            self.pin = None;
        }
    }

    fn note_custom_settings(&mut self, names: impl IntoIterator<Item = String>) {
        for name in names {
            if self.custom_settings.contains(&name) {
                continue;
            }
            if self.custom_settings.len() >= MAX_CUSTOM_SETTINGS {
                self.pin(PinReason::Settings);
                return;
            }
            self.custom_settings.push(name);
        }
    }
}

/// What a relay makes its client's statement tracker with.
#[derive(Clone, Copy)]
pub struct Tracking {
    pub registry: &'static Registry,
    pub max_prepared: usize,
}

impl Tracking {
    /// Tracking as configured: transaction mode with max_prepared_statements > 0.
    pub fn when(
        transaction_mode: bool,
        registry: &'static Registry,
        max_prepared: usize,
    ) -> Option<Tracking> {
        (transaction_mode && max_prepared > 0).then_some(Tracking {
            registry,
            max_prepared,
        })
    }
}

/// A tracker made while a server is attached, as one there since the lending would be now:
/// it expects the ReadyForQuery of each unit still `pending` (the simple Queries before it,
/// which a tracker only counts), and journals if a replay is armed.
fn new_tracker(how: Tracking, server: &ServerStatements, pending: u32, journal: bool) -> Tracker {
    let mut t = Tracker::new(how.registry, how.max_prepared);
    t.attach(server);
    for _ in 0..pending {
        t.owes_ready();
    }
    if journal {
        t.begin_journal();
    }
    t
}

impl Relay {
    pub fn new(
        max_message: usize,
        transaction_mode: bool,
        registry: &'static Registry,
        max_prepared: usize,
    ) -> Relay {
        let mut relay = Relay::bare(max_message, transaction_mode, Mono::now());
        relay.tracking = Tracking::when(transaction_mode, registry, max_prepared);
        relay
    }

    /// A relay without a statement tracker or a pool's statistics, its client last heard
    /// from at `idle_since`.
    pub fn bare(max_message: usize, transaction_mode: bool, idle_since: Mono) -> Relay {
        Relay {
            c2s: Channel::default(),
            s2c: Channel::default(),
            flow: Flow {
                pending: 0,
                unsynced: false,
                status: b'I',
                terminated: false,
                idle_since,
                syncs_since_start: 0,
                copy_done_sent: false,
                copy_in: false,
            },
            max_message,
            transaction_mode,
            tracker: None,
            tracking: None,
            meter: Meter::default(),
            session: SessionState::default(),
            keys: keys::Keys::default(),
            retry: retry::Retry::default(),
            one_unit: false,
            unit_at_a_time: false,
            units: 0,
            own_sync: false,
            unit_failed: false,
            suspended: false,
            flushed: false,
            client_flushed: false,
            copy_from_client: false,
            whole_units: false,
            refused: None,
            prescanned: None,
            quiet_wanted: true,
            pin_shown: None,
            defers_begin: false,
            begin_answered: false,
        }
    }

    /// A server was just lent to the client.
    pub fn attached(&mut self, statements: &ServerStatements) {
        self.flow.status = b'I';
        self.one_unit = false;
        self.unit_at_a_time = false;
        self.units = 0;
        self.own_sync = false;
        self.unit_failed = false;
        self.suspended = false;
        self.flushed = false;
        self.client_flushed = false;
        self.copy_from_client = false;
        // no COPY runs on a server just lent
        self.flow.copy_in = false;
        if let Some(t) = self.tracker.as_mut() {
            t.attach(statements);
        }
    }

    /// The server just attached serves only the unit it was routed for (`one_unit`).
    pub fn serve_one_unit(&mut self) {
        self.one_unit = true;
    }

    /// The server just attached takes one unit at a time (`unit_at_a_time`).
    pub fn serve_unit_at_a_time(&mut self) {
        self.unit_at_a_time = true;
    }

    /// Arms the retry of the unit about to be sent (a replica read): only when nothing is
    /// waiting for the client, so everything held back from now on is this unit's answer.
    pub fn arm_retry(&mut self) {
        if self.s2c.ready_len() == 0 && self.s2c.buf.is_empty() && self.c2s.scanned == 0 {
            self.retry.arm(&self.c2s.buf);
            if let (true, Some(t)) = (self.retry.is_armed(), self.tracker.as_mut()) {
                t.begin_journal();
            }
        }
    }

    /// The server failed before any of the unit's answer reached the client: everything
    /// sent to it is put back as unscanned client input, its answers are dropped, and the
    /// relay is as it was before the server was attached. None when not armed.
    pub fn take_for_replay(&mut self) -> Option<()> {
        let request = self.retry.take()?;
        if let Some(t) = self.tracker.as_mut() {
            t.roll_back();
        }
        self.restart_with(request);
        Some(())
    }

    /// A request a batch sent for this client was never run, its server lost: it is put
    /// back in front of what the client sent after it, as if it had just arrived. (Batched
    /// requests use only the unnamed statement, which their Parse makes again.)
    pub fn put_back(&mut self, request: &[u8]) {
        let later = &self.c2s.buf[self.c2s.scanned..];
        let mut input = BytesMut::with_capacity(request.len() + later.len());
        input.extend_from_slice(request);
        input.extend_from_slice(later);
        self.restart_with(input);
    }

    /// The relay as before the server was attached, `input` unscanned client bytes.
    fn restart_with(&mut self, input: BytesMut) {
        self.c2s = Channel::with_input(input);
        self.s2c = Channel::default();
        let f = &mut self.flow;
        f.pending = 0;
        f.unsynced = false;
        f.status = b'I';
        f.terminated = false;
        f.syncs_since_start = 0;
        f.copy_done_sent = false;
        f.copy_in = false;
        self.own_sync = false;
        self.unit_failed = false;
        self.suspended = false;
        self.flushed = false;
        self.client_flushed = false;
        self.copy_from_client = false;
        // requests in flight on the lost server are counted again when replayed
        self.meter.statements.forget_pending();
    }

    /// Nothing kept here outlives the moment (besides the channels, flow, session state and
    /// tracker the caller checks): the relay may be dropped while the client idles.
    pub fn is_parkable(&self) -> bool {
        self.keys.is_empty() && self.meter.is_idle()
    }

    /// The server may go back: it owes nothing and nothing is half-sent to it.
    pub fn server_clean(&self) -> bool {
        self.flow.quiet()
            && self.flow.status == b'I'
            && self.c2s.ready_len() == 0
            && self.c2s.scanner.at_boundary()
            && self.s2c.scanner.at_boundary()
            && self.tracker.as_ref().is_none_or(Tracker::is_settled)
    }

    /// Moves bytes until something needs the session's attention.
    pub fn poll<C, S>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        mut server: Option<ServerSide<'_, S>>,
        wants: &mut Arc<Params>,
    ) -> Poll<Event>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // A side whose read came back Pending has the task's waker: more data wakes the task
        // for a new poll, so this one does not ask again (each ask costs a readiness check
        // and a waker registration: about 230 instructions, several times per transaction).
        let (mut client_dry, mut server_dry) = (false, false);
        for _ in 0..POLL_BUDGET {
            // a replica read that may still be retried: its answer is held back
            let written = if self.retry.is_armed() {
                Ok(false)
            } else {
                self.s2c.write_to(cx, client)
            };
            let mut progress = match written {
                Ok(p) => p,
                Err(_) if self.flow.terminated => {
                    // after Terminate the client may be gone: drop its replies, drain the server
                    self.s2c.discard_ready();
                    true
                }
                Err(e) => return Poll::Ready(Event::ClientIo(e)),
            };
            if let Some(s) = server.as_mut() {
                match self.c2s.write_to(cx, &mut *s.stream) {
                    Ok(p) => progress |= p,
                    Err(e) => return Poll::Ready(Event::ServerIo(e)),
                }
                let asks = !server_dry && self.s2c.reads();
                let read = if server_dry {
                    Ok(None)
                } else {
                    self.s2c.read_from(cx, &mut *s.stream)
                };
                match read {
                    Ok(Some(0)) => return Poll::Ready(Event::ServerClosed),
                    Ok(Some(n)) => {
                        progress = true;
                        self.meter.sent(n);
                        if let Some(ev) = self.scan_server(s, wants) {
                            return Poll::Ready(ev);
                        }
                        if self.retry.is_armed() && self.s2c.ready_len() > retry::HOLD_LIMIT {
                            self.retry.disarm();
                        }
                    }
                    Ok(None) => server_dry |= asks,
                    Err(e) => return Poll::Ready(Event::ServerIo(e)),
                }
            }
            if self.refused.is_some() {
                // answered what came before it, or it can never be (a batch without its Sync
                // is answered only at the Sync that will not come)
                if self.c2s.ready_len() == 0 && (self.flow.pending == 0 || self.flow.unsynced) {
                    if let Some(e) = self.refused.take() {
                        return Poll::Ready(Event::Protocol(e));
                    }
                }
            } else if !self.flow.terminated {
                let asks = !client_dry && self.c2s.reads();
                let read = if client_dry {
                    Ok(None)
                } else {
                    self.c2s.read_from(cx, client)
                };
                match read {
                    Ok(Some(0)) => return Poll::Ready(Event::ClientClosed),
                    Ok(Some(n)) => {
                        progress = true;
                        self.meter.received(n);
                        self.flow.idle_since = Mono::now();
                        if self.retry.is_armed() {
                            let b = &self.c2s.buf;
                            self.retry.client_bytes(&b[b.len() - n..]);
                        }
                    }
                    Ok(None) => client_dry |= asks,
                    Err(e) => return Poll::Ready(Event::ClientIo(e)),
                }
                if let Some(s) = server.as_mut() {
                    if self.c2s.buf.len() > self.c2s.scanned {
                        let before = (self.c2s.ready_len(), self.s2c.ready_len());
                        if let Err(e) = self.scan_client(s, wants) {
                            self.refused = Some(e);
                            progress = true;
                        }
                        progress |= (self.c2s.ready_len(), self.s2c.ready_len()) != before;
                    }
                }
            }
            if server.is_none() {
                if matches!(self.c2s.buf.first(), Some(b'd' | b'c' | b'f')) {
                    self.drop_stray_copy();
                }
                if self.tracker.is_none() && self.c2s.buf.first() == Some(&b'P') {
                    // a Parse may be answered without a server (`answer_prepare_alone`)
                    if let Some(how) = self.tracking {
                        self.tracker = Some(Tracker::new(how.registry, how.max_prepared));
                    }
                }
                if let Some(t) = self.tracker.as_mut() {
                    // Behind a BEGIN pgmux answered, what it answers alone is looked for
                    // behind it (pgx deallocates an evicted statement right after its BEGIN:
                    // sent with it, the server would not know the client's name).
                    let at = match self.begin_answered {
                        true => begin::front_len(&self.c2s.buf).unwrap_or(0),
                        false => 0,
                    };
                    // most passes here have no input: skip the calls, not only their work
                    if !self.flow.terminated
                        && self.c2s.buf.len() > at + 5
                        && ((at == 0
                            && t.answer_prepare_alone(&mut self.c2s, &mut self.s2c, wants))
                            || t.answer_deallocate_alone(
                                &mut self.c2s,
                                &mut self.s2c,
                                at,
                                self.begin_answered,
                            ))
                    {
                        self.meter.count_prepared(std::mem::take(&mut t.counts));
                        continue;
                    }
                }
                if matches!(self.c2s.buf.first(), Some(b'H' | b'S'))
                    && !self.flow.terminated
                    && self.answer_lone_flushes_and_syncs()
                {
                    // the answer goes out on the next pass
                    continue;
                }
                if self.defers_begin
                    && !self.begin_answered
                    && !self.flow.terminated
                    && self.answer_lone_begin()
                {
                    if self.quiet_wanted {
                        // the session's idle timeout is now idle_transaction_timeout's; the
                        // answer goes out at its next poll
                        return Poll::Ready(Event::Quiet);
                    }
                    // the answer goes out on the next pass
                    continue;
                }
                if let Some(ev) = self.detached_input() {
                    return Poll::Ready(ev);
                }
                if !progress && self.s2c.ready_len() == 0 {
                    self.s2c.shrink_if_empty();
                    self.c2s.shrink_if_empty();
                }
            } else if self.flow.terminated
                && (self.copy_from_client || (self.c2s.ready_len() == 0 && self.flow.pending == 0))
            {
                // A Terminate in the middle of COPY FROM STDIN ends it, on PostgreSQL with an
                // error (pgx sends one when a context deadline cuts its CopyFrom short): the
                // server would wait for data that never comes, and pgmux for its answer.
                // The session ends with the server owing its answer: it is closed.
                return Poll::Ready(Event::Terminated);
            }
            if !progress {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Without a server, input is only looked at: a whole header means work for a server,
    /// except a Terminate, which ends the session, and a header no server may see.
    fn detached_input(&mut self) -> Option<Event> {
        if self.flow.terminated {
            return Some(Event::Terminated);
        }
        let head = self.c2s.buf.get(..5)?;
        if let Err(e) = check_header(head, self.max_message) {
            return Some(Event::Protocol(e));
        }
        match head[0] {
            b'X' => {
                self.flow.terminated = true;
                return Some(Event::Terminated);
            }
            // the rest of a stray CopyData (`drop_stray_copy`) has yet to arrive
            b'd' | b'c' | b'f' => return None,
            _ => {}
        }
        if self.begin_answered {
            // the BEGIN pgmux answered waits for what the client sends next
            let after = begin::front_len(&self.c2s.buf)?;
            let next = &self.c2s.buf[after.min(self.c2s.buf.len())..];
            match next.first() {
                None => return None,
                Some(b'X') => {
                    // a transaction of nothing, ended with the session
                    self.flow.terminated = true;
                    return Some(Event::Terminated);
                }
                // a short Query not all here yet may be one pgmux answers (a DEALLOCATE)
                Some(b'Q') if begin::short_and_cut(next) => return None,
                Some(_) => {}
            }
        }
        if self.whole_units && !unit_complete(&self.c2s.buf) {
            return None;
        }
        Some(Event::NeedServer)
    }

    /// The client's input is a lone plain BEGIN (`begin`): pgmux answers it and keeps it
    /// for the server of the client's next request. Returns whether it answered.
    fn answer_lone_begin(&mut self) -> bool {
        let Some(answer) = begin::lone_begin_answer(&self.c2s.buf) else {
            return false;
        };
        self.s2c.insert(answer);
        self.begin_answered = true;
        true
    }

    /// CopyData, CopyDone and CopyFail with no server attached belong to no COPY (one keeps
    /// its server until its ReadyForQuery): PostgreSQL would ignore them, and so does pgmux
    /// rather than take a server for them. pgx goes on sending rows after the server refused
    /// one; those must not hold back the unit that follows either. A message not all here
    /// yet stays, for the next pass.
    #[cold]
    fn drop_stray_copy(&mut self) {
        while let Some(head) = self.c2s.buf.get(..5) {
            if !matches!(head[0], b'd' | b'c' | b'f')
                || check_header(head, self.max_message).is_err()
            {
                return;
            }
            let total = 1 + u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if self.c2s.buf.len() < total {
                self.c2s.reserve_for(total);
                return;
            }
            self.c2s.consume_unscanned(total);
        }
    }

    /// A Flush or a Sync with no server attached has nothing to flush or end: PostgreSQL
    /// would answer the Flush with nothing, and the Sync with ReadyForQuery, idle (a client
    /// holds its server while in a transaction). A server lent for a Flush alone would be held
    /// by its client; sqlx sends a lone Sync to check each pooled connection when it takes it
    /// and when it gives it back, which took a server each time.
    /// Returns whether it answered anything.
    #[cold]
    fn answer_lone_flushes_and_syncs(&mut self) -> bool {
        let mut answered = false;
        loop {
            match self.c2s.buf.get(..5) {
                Some(FLUSH) => {}
                Some(SYNC) => {
                    self.s2c.insert(Bytes::from_static(READY_IDLE));
                    answered = true;
                }
                _ => return answered,
            }
            self.c2s.consume_unscanned(5);
        }
    }

    /// Scans what the client sent, now that a server is attached (a client's messages are
    /// only scanned once it is known which server they go to).
    pub fn scan_client<S>(
        &mut self,
        server: &mut ServerSide<'_, S>,
        wants: &Params,
    ) -> Result<(), ClientProtocolError> {
        let tracking = self.tracking.is_some();
        let transaction_mode = self.transaction_mode;
        loop {
            let ch = &mut self.c2s;
            if self.one_unit
                && self.units > 0
                && ch.scanner.at_boundary()
                && !self.tracker.as_ref().is_some_and(Tracker::is_skipping)
            {
                // the routed unit is sent whole; what follows waits to be routed itself.
                // Unless the unit failed before a Query in it (which the server skipped): the
                // server skips what follows up to a Sync, which it must be sent
                return Ok(());
            }
            if self.unit_at_a_time
                && self.flow.pending > 0
                && !self.flow.copy_in
                && ch.scanner.at_boundary()
            {
                // scanned again at the answer's ReadyForQuery, or routed anew if that ended
                // the transaction (a COPY's data goes on: its answer waits for it)
                return Ok(());
            }
            let mut big_bind = false;
            if ch.scanner.at_boundary() {
                // refused before it is scanned: what went before may still be answered and
                // the server kept (a session-mode client's goes back to the pool)
                let mut next = 0;
                if let Some(head) = ch.buf.get(ch.scanned..ch.scanned + 5) {
                    check_header(head, self.max_message)?;
                    next = head[0];
                }
                if matches!(next, b'Q' | b'P' | b'B') && self.flushed_read_open(next) {
                    if self
                        .tracker
                        .as_ref()
                        .is_some_and(|t| !t.is_settled() && !t.is_skipping())
                    {
                        // the read's answers are owed: if it failed, PostgreSQL skips what
                        // follows to the Sync, which must then stay with it. What came after
                        // the client's last Flush is answered only at a Flush: pgmux sends
                        // one of its own (it adds no answer)
                        if !self.flushed {
                            self.c2s.insert(Bytes::from_static(FLUSH));
                            self.flushed = true;
                        }
                        return Ok(());
                    }
                    match self.starts_own_statement(next) {
                        Some(true) => {
                            self.end_flushed_read(server.statements);
                            return Ok(());
                        }
                        Some(false) => {}
                        // a Bind whose names are still on their way
                        None => return Ok(()),
                    }
                }
                let ch = &self.c2s;
                big_bind = tracking && big_bind_named(&ch.buf[ch.scanned..]);
            }
            let ch = &mut self.c2s;
            let step = ch.scanner.step(
                &ch.buf,
                &mut ch.scanned,
                |t| {
                    // Query and Parse texts for SHOW QUERIES (bounded by max_message_size)
                    t == b'X'
                        || t == b'Q'
                        || t == b'P'
                        || (tracking && statements::inspects_client(t) && !big_bind)
                },
                self.max_message,
            )?;
            if let (None, Some(how), Step::Message { tag, .. } | Step::Passed { tag, .. }) =
                (&self.tracker, self.tracking, &step)
            {
                if statements::needs_tracker(*tag) {
                    let journal = self.retry.is_armed();
                    self.tracker = Some(new_tracker(
                        how,
                        server.statements,
                        self.flow.pending,
                        journal,
                    ));
                }
            }
            let (tag, start) = match step {
                Step::Message {
                    tag: b'X', start, ..
                } => {
                    // Terminate is pgmux's to act on; a server never sees it
                    ch.buf.truncate(start);
                    ch.scanned = start;
                    self.flow.terminated = true;
                    return Ok(());
                }
                Step::Message {
                    tag: b'Q',
                    body,
                    start,
                } => {
                    let text = prepared::query_text(body);
                    let at_boundary = self.s2c.scanner.at_boundary();
                    let dealloc = deallocation_to_answer(
                        &self.flow,
                        self.tracker.as_ref(),
                        at_boundary,
                        text,
                    );
                    if let (Some(name), Some(t)) = (dealloc, self.tracker.as_mut()) {
                        let in_block = self.flow.status == b'T';
                        t.answer_deallocate(
                            name.as_bytes(),
                            start,
                            &mut self.c2s,
                            &mut self.s2c,
                            in_block,
                        );
                        continue;
                    }
                    if transaction_mode {
                        // both from one pass of the lexer (or its memo), made already if the
                        // query was looked at for a batch while its client waited
                        let (fp, fx) = match self.prescanned.take() {
                            Some(pre) if start == 0 && self.units == 0 => pre,
                            _ => memo::lexed(text),
                        };
                        self.keys.query_fingerprinted(&mut self.meter, text, fp);
                        if fx.custom_settings {
                            self.session
                                .note_custom_settings(custom_setting_names(text));
                        }
                        self.apply_effects(fx);
                        // a failed transaction refuses it: nothing is dropped
                        if fx.may_drop_statements && self.flow.status != b'E' {
                            let in_block = self.flow.status == b'T';
                            statements::query_drops(
                                self.tracker.as_mut(),
                                fx,
                                in_block,
                                server.statements,
                            );
                        }
                    } else {
                        self.keys.query(&mut self.meter, text);
                    }
                    (b'Q', None)
                }
                Step::Message { tag, start, body } => {
                    match tag {
                        b'P' if transaction_mode && !tracking => {
                            // no tracker to note what the statement does to the session
                            // (max_prepared_statements = 0): noted here, at its Parse
                            self.keys.parse(&mut self.meter, body, tracking);
                            let text = prepared::split_parse(body)
                                .map_or("", |(_, rest)| prepared::query_text(rest));
                            let fx = memo::lexed(text).1;
                            if fx.custom_settings {
                                self.session
                                    .note_custom_settings(custom_setting_names(text));
                            }
                            self.apply_effects(fx);
                        }
                        b'P' => self.keys.parse(&mut self.meter, body, tracking),
                        b'B' => {
                            let stmts = self.tracker.as_ref().map(|t| &t.stmts);
                            self.keys.bind(&mut self.meter, body, stmts);
                        }
                        _ => {}
                    }
                    (tag, Some(start))
                }
                Step::Passed { tag, start, .. } => {
                    if tag == b'B' {
                        // the names lead the body and have usually arrived with the header
                        let head = ch.buf.get(start + 5..ch.scanned).unwrap_or(&[]);
                        let stmts = self.tracker.as_ref().map(|t| &t.stmts);
                        self.keys.bind(&mut self.meter, head, stmts);
                    }
                    // a large Bind streams through; its names, all there, are rewritten
                    (tag, big_bind.then_some(start))
                }
                Step::NeedMore { reserve } => {
                    ch.reserve_for(reserve);
                    return Ok(());
                }
            };
            if matches!(tag, b'Q' | b'F') && self.tracker.as_ref().is_some_and(Tracker::is_skipping)
            {
                // PostgreSQL skips it on its way to the Sync after an error: nothing is owed
                if tag == b'Q' {
                    self.keys.take_query();
                }
                continue;
            }
            if !self.count_request(tag)? {
                continue;
            }
            if let Some(t) = self.tracker.as_mut() {
                if !self.retry.is_armed() {
                    t.end_journal();
                }
                match start {
                    Some(start) => {
                        let fx = t.client_message(
                            tag,
                            start,
                            &mut self.c2s,
                            &mut self.s2c,
                            server.statements,
                            statements::Where {
                                aborted: self.flow.status == b'E',
                                wants,
                            },
                        );
                        if fx.custom_settings {
                            self.session
                                .note_custom_settings(t.custom_settings.drain(..));
                        }
                        if t.counts != [0; 3] {
                            self.meter.count_prepared(std::mem::take(&mut t.counts));
                        }
                        // run at its Execute, which `statements::command_complete` follows
                        server.statements.unsure |= fx.may_drop_statements;
                        self.apply_effects(fx);
                    }
                    None => t.client_passed(tag, server.statements),
                }
            }
        }
    }

    /// A replica lent for one read unit was sent that unit up to a Flush, without its Sync,
    /// and nothing failed or was left half-fetched (asyncpg prepares a `SELECT` of the table
    /// this way before its `COPY ... FROM STDIN`; psycopg's pipeline mode flushes to fetch a
    /// result before it sends the next statement). A new statement now (`starts_own_statement`)
    /// would run on the replica as part of that unit. A portal left suspended may still be
    /// fetched from, unless the next message is a Query (`next`), which ends the read's
    /// implicit transaction and its portals with it.
    fn flushed_read_open(&self, next: u8) -> bool {
        let f = &self.flow;
        // without the client's Flush the unit is still being sent: a lone COMMIT or
        // ROLLBACK (not a read, so no retry is armed) goes on to its Bind and Sync
        self.one_unit
            && self.client_flushed
            && self.units == 0
            && f.unsynced
            && f.pending == 0
            && !f.copy_in
            && !self.unit_failed
            && (!self.suspended || next == b'Q')
            && !self.own_sync
            && !self.retry.is_armed()
            && self.session.pin.is_none()
    }

    /// Whether the client message at the scan position, of type `tag`, starts a statement
    /// of its own: a Query, a Parse, or a Bind of a named statement the tracker knows (and
    /// prepares wherever it runs). A Bind of the unnamed statement runs what the read
    /// parsed. None until a Bind's names have arrived.
    fn starts_own_statement(&self, tag: u8) -> Option<bool> {
        if tag != b'B' {
            return Some(true);
        }
        let ch = &self.c2s;
        let head = ch.buf.get(ch.scanned..ch.scanned + 5)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let end = (ch.scanned + 1 + len).min(ch.buf.len());
        let body = &ch.buf[ch.scanned + 5..end];
        let Some((_, stmt, _)) = prepared::bind_names(body) else {
            // malformed if the whole message is here: the server will say so
            return (body.len() + 4 >= len).then_some(false);
        };
        let known = self
            .tracker
            .as_ref()
            .is_some_and(|t| t.stmts.get(stmt).is_some());
        Some(!stmt.is_empty() && known)
    }

    /// Ends the flushed read unit with a Sync of pgmux's own, so what follows is routed on
    /// its own once the replica goes back: a write must reach the primary. PostgreSQL would
    /// run it in the read's implicit transaction, which only read; a Query drops the unnamed
    /// statement and ends that transaction anyway, a Parse defines the statement it runs,
    /// and a named statement is the tracker's to prepare wherever it is used.
    fn end_flushed_read(&mut self, statements: &ServerStatements) {
        self.c2s.insert(Bytes::from_static(SYNC));
        let f = &mut self.flow;
        f.pending += 1;
        f.unsynced = false;
        self.units += 1;
        self.own_sync = true;
        if let Some(t) = self.tracker.as_mut() {
            t.client_passed(b'S', statements);
        }
    }

    /// Session effects of a query the client sent (transaction mode).
    fn apply_effects(&mut self, fx: Effects) {
        if !fx.any() {
            return;
        }
        self.session.settings_changed |= fx.settings;
        self.session.pgmux_reset |= fx.pgmux_reset;
        // unpinned only once the server says it ran: PostgreSQL refuses it in a
        // transaction block or a pipeline
        self.session.unpin_at_discard |= fx.discard_all;
        self.session.reset_seen |= fx.resets;
        if let Some(p) = fx.pin {
            self.session.pin(p);
        }
    }

    /// Counts a client message; Ok(false) when the server will ignore it (a Sync during
    /// COPY FROM STDIN), so nothing is owed for it.
    fn count_request(&mut self, tag: u8) -> Result<bool, ClientProtocolError> {
        self.flushed = tag == b'H';
        match tag {
            b'H' => self.client_flushed = true,
            b'S' | b'Q' | b'F' => self.client_flushed = false,
            _ => {}
        }
        let f = &mut self.flow;
        match tag {
            b'Q' | b'F' => {
                f.pending += 1;
                self.units += 1;
                // it ends an unsynced extended unit (a Parse, Describe and Flush before it),
                // as a Sync would: PostgreSQL commits that unit's implicit transaction with
                // its own, and answers one ReadyForQuery
                f.unsynced = false;
                if tag == b'Q' {
                    // it may start a COPY FROM STDIN
                    f.syncs_since_start = 0;
                    f.copy_done_sent = false;
                }
                let fp = if tag == b'Q' {
                    self.keys.take_query()
                } else {
                    0
                };
                self.meter.request(fp, f.idle_since);
            }
            b'S' if f.copy_in => return Ok(false),
            b'S' => {
                f.pending += 1;
                self.units += 1;
                f.unsynced = false;
                if !f.copy_done_sent {
                    f.syncs_since_start += 1;
                }
                self.meter.request(self.keys.sync(), f.idle_since);
            }
            b'E' => {
                self.keys.execute();
                f.unsynced = true;
                f.syncs_since_start = 0;
                f.copy_done_sent = false;
            }
            b'H' => {
                // the client waits for answers without a Sync: they must not be held back.
                // A Flush adds no answer of its own: only what came before it (a Parse,
                // Bind...) leaves the server owing more than its ReadyForQuerys. psycopg's
                // pipeline sends a Flush right behind each Sync, and the server must still
                // go back at that Sync's ReadyForQuery.
                self.retry.disarm();
            }
            b'P' | b'B' | b'D' | b'C' => f.unsynced = true,
            b'c' | b'f' => {
                f.copy_done_sent = true;
                f.copy_in = false;
                self.copy_from_client = false;
            }
            b'd' => {}
            // refused before scanning (`check_header`); kept so that no path forwards one
            other => return Err(ClientProtocolError::UnknownType(other)),
        }
        Ok(true)
    }

    /// The server entered COPY FROM STDIN, started by the last Query or Execute: it ignores
    /// every Sync that arrives before CopyDone or CopyFail. Those sent already are owed
    /// nothing, and later ones are not counted. (A Sync sent during a COPY started by a Query
    /// was owed a ReadyForQuery that never came: the server never went back to the pool.)
    fn copy_in_started(&mut self) {
        let f = &mut self.flow;
        let ignored = f.syncs_since_start;
        f.pending = f.pending.saturating_sub(ignored);
        f.syncs_since_start = 0;
        f.copy_in = !f.copy_done_sent;
        self.meter.statements.ignored(ignored);
        if let Some(t) = self.tracker.as_mut() {
            t.syncs_ignored(ignored);
        }
    }

    fn scan_server<S>(
        &mut self,
        server: &mut ServerSide<'_, S>,
        wants: &mut Arc<Params>,
    ) -> Option<Event> {
        let tracking = self.tracking.is_some();
        let mut quiet = false;
        loop {
            let ch = &mut self.s2c;
            let step = ch.scanner.step(
                &ch.buf,
                &mut ch.scanned,
                // errors are rare and small: always read for their SQLSTATE class (stats)
                |t| {
                    t == b'Z'
                        || t == b'S'
                        || t == b'E'
                        // CommandComplete: small, carries the row count (SHOW QUERIES)
                        || t == b'C'
                        || (tracking && statements::inspects_server(t))
                },
                usize::MAX,
            );
            let (tag, start) = match step {
                Ok(Step::Message {
                    tag: b'S', body, ..
                }) => {
                    note_parameter(body, server.params, wants);
                    continue;
                }
                Ok(Step::Message {
                    tag: b'Z',
                    body,
                    start,
                }) => {
                    self.flow.status = body.first().copied().unwrap_or(b'I');
                    (b'Z', start)
                }
                Ok(Step::Message {
                    tag: b'E',
                    body,
                    start,
                }) => {
                    if self.retry.is_armed() && retry::is_server_failure(body) {
                        let e = crate::protocol::messages::parse_error_fields(body);
                        return Some(Event::ServerFailed(format!("{}: {}", e.code, e.message)));
                    }
                    self.meter.error(body);
                    self.unit_failed = true;
                    (b'E', start)
                }
                Ok(Step::Message {
                    tag: b'C',
                    body,
                    start,
                }) => {
                    self.meter.statements.command_complete(body);
                    if body.first() == Some(&b'D') {
                        if body == b"DISCARD ALL\0" {
                            self.session.discarded();
                        }
                        if tracking {
                            statements::command_complete(
                                self.tracker.as_mut(),
                                body,
                                server.statements,
                            );
                        }
                    }
                    (b'C', start)
                }
                Ok(Step::Message { tag, start, .. }) | Ok(Step::Passed { tag, start, .. }) => {
                    (tag, start)
                }
                // a message pgmux reads whole (ReadyForQuery, ErrorResponse...) may not claim
                // more than max_message_size: its length word alone must not size a buffer
                Ok(Step::NeedMore { reserve }) if reserve > self.max_message => {
                    return Some(Event::ServerIo(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "server message of {reserve} bytes exceeds max_message_size {}",
                            self.max_message
                        ),
                    )));
                }
                Ok(Step::NeedMore { reserve }) => {
                    ch.reserve_for(reserve);
                    let reported = self.quiet_wanted || self.session.pin != self.pin_shown;
                    return (quiet && reported).then_some(Event::Quiet);
                }
                Err(e) => {
                    return Some(Event::ServerIo(io::Error::new(
                        io::ErrorKind::InvalidData,
                        e,
                    )));
                }
            };
            if self.begin_answered {
                match tag {
                    // the first answer the server gives is the BEGIN's, already answered
                    b'C' => {
                        self.s2c.drop_scanned_from(start);
                        continue;
                    }
                    // a BEGIN refused by a server in no transaction: what followed it may
                    // have run outside the transaction its client believes it is in
                    b'E' => {
                        let body = &self.s2c.buf[start + 5..self.s2c.scanned];
                        let e = crate::protocol::messages::parse_error_fields(body);
                        return Some(Event::ServerFailed(format!(
                            "BEGIN refused: {}: {}",
                            e.code, e.message
                        )));
                    }
                    _ => {}
                }
            }
            let begin_ready = tag == b'Z' && std::mem::take(&mut self.begin_answered);
            if tag == b'G' {
                self.copy_in_started();
                self.copy_from_client = true;
            } else if matches!(tag, b'E' | b'Z') && self.copy_from_client {
                // the COPY failed (or ended): the client may stop sending its data without
                // CopyDone or CopyFail (psycopg, asyncpg), and the Syncs it sends from now on
                // are answered
                self.copy_from_client = false;
                self.flow.copy_in = false;
            }
            if tag == b's' {
                self.suspended = true;
            }
            if matches!(tag, b'G' | b'W') {
                // the server waits for the client's data: it must see the answer
                self.retry.disarm();
            }
            if let Some(t) = self.tracker.as_mut() {
                t.server_message(tag, start, &mut self.s2c, server.statements);
                if begin_ready {
                    // before answers of pgmux's due after it go in behind it
                    self.s2c.drop_scanned_from(start);
                }
                t.answer_ready(&mut self.s2c);
                let skipped = t.take_skipped();
                if skipped > 0 {
                    // Queries sent behind a failed extended message, before its Sync
                    self.flow.pending = self.flow.pending.saturating_sub(skipped);
                    self.meter.statements.ignored(skipped);
                }
                if t.is_skipping() {
                    // the server waits for the client's Sync
                    self.flow.unsynced = true;
                }
            } else if begin_ready {
                self.s2c.drop_scanned_from(start);
            }
            if tag == b'Z' {
                // the answer to pgmux's own Sync, the last thing the server was sent (so no
                // answer of pgmux's was put in behind it)
                let own = !begin_ready && self.own_sync && self.flow.pending == 1;
                if own {
                    self.s2c.drop_scanned_from(start);
                    self.own_sync = false;
                }
                self.unit_failed = false;
                self.suspended = false;
                self.copy_from_client = false;
                self.flow.pending = self.flow.pending.saturating_sub(1);
                if self.flow.quiet() {
                    // the unit is answered in full: it goes to the client now
                    self.retry.disarm();
                }
                let now = Mono::now();
                if !own {
                    self.meter
                        .ready(self.flow.status, self.flow.pending > 0, now);
                }
                self.flow.idle_since = now;
                if self.transaction_mode && self.session.pin.is_none() && self.server_clean() {
                    // whatever follows belongs to the server, not to this client
                    let ch = &mut self.s2c;
                    ch.buf.truncate(ch.scanned);
                    // the read-back on its return brings the client's startup settings back
                    self.session.reset_seen = false;
                    return Some(Event::Release);
                }
                if self.one_unit
                    && (self.session.pin.is_some() || self.flow.status != b'I')
                    && self.flow.quiet()
                {
                    // pinned by the unit it was lent for, or left in a transaction by it (a
                    // BEGIN in a unit that stayed on its replica, behind a suspended portal):
                    // the client keeps this server for what follows, which waited to be
                    // routed on its own and would otherwise wait for good
                    self.one_unit = false;
                }
                if self.transaction_mode && self.session.reset_seen && self.server_clean() {
                    self.session.reset_seen = false;
                    return Some(Event::Resync);
                }
                quiet = self.flow.quiet();
            }
        }
    }
}

/// A simple query that only deallocates one of the client's statements, with a server
/// attached and nothing else in flight (so the status pgmux answers with is known) and the
/// server's output at a message boundary (so the answer can go in): pgmux answers it
/// (`Tracker::answer_deallocate`), since the server knows the statement by pgmux's name.
/// Inside a transaction block; or between transactions, where the server stays attached to a
/// pinned client, or after a failed COPY whose client is still sending rows (pgx), until
/// its next ReadyForQuery. A detached client's is answered by
/// `Tracker::answer_deallocate_alone`.
fn deallocation_to_answer(
    flow: &Flow,
    tracker: Option<&Tracker>,
    s2c_at_boundary: bool,
    text: &str,
) -> Option<String> {
    let t = tracker?;
    let known_status = match flow.status {
        b'T' => flow.pending == 0,
        b'I' => flow.quiet(),
        _ => false,
    };
    if !known_status || !s2c_at_boundary || !t.is_settled() {
        return None;
    }
    // most statements of a transaction: not one that can start with DEALLOCATE
    if !text.starts_with(['D', 'd', '/', '-', ' ', '\t', '\n', '\r']) {
        return None;
    }
    crate::router::effects::deallocated_name(text).filter(|n| t.stmts.get(n.as_bytes()).is_some())
}

/// A parameter the server reported while serving the client is now what both hold.
fn note_parameter(body: &[u8], server_params: &mut Params, wants: &mut Arc<Params>) {
    let Some((k, v)) = parse_parameter_status(body) else {
        return;
    };
    let (Ok(k), Ok(v)) = (std::str::from_utf8(k), std::str::from_utf8(v)) else {
        return;
    };
    server_params.set(k, v);
    let known = wants.get(k);
    if (params::is_tracked(k) || known.is_some()) && known != Some(v) {
        // the client's own copy from now on (see `Pool::share_wants`)
        Arc::make_mut(wants).set(k, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_checked_before_a_server_sees_them() {
        assert_eq!(check_header(&[b'Q', 0, 0, 0, 9], 100), Ok(()));
        assert_eq!(check_header(&[b'X', 0, 0, 0, 4], 100), Ok(()));
        for t in [b'Y', 0, b'p', b'R'] {
            assert_eq!(
                check_header(&[t, 0, 0, 0, 4], 100),
                Err(ClientProtocolError::UnknownType(t))
            );
        }
        assert_eq!(
            check_header(&[b'Q', 0, 0, 0, 3], 100),
            Err(ClientProtocolError::BadLength(3))
        );
        assert_eq!(
            check_header(&[b'Q', 0, 0, 0, 100], 100),
            Err(ClientProtocolError::TooLarge(101, 100))
        );
        assert_eq!(
            ClientProtocolError::UnknownType(0).to_string(),
            "invalid frontend message type 0"
        );
    }
}
