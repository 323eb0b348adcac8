//! Batches: when a server comes free and several clients wait in line, each with one request
//! that stands alone (a simple query or an unnamed extended-protocol unit that opens no
//! transaction block, leaves no session state and is no COPY), the server gets all their
//! requests in one write and answers them in turn. One `drive` task owns the server
//! for the batch: it splits the answers at each ReadyForQuery and hands each client its own,
//! streamed in chunks. Each client's session sees a [`Seat`], a stand-in for the server that
//! its relay reads the answer from, so the client's accounting (statistics, SHOW QUERIES,
//! timeouts) is the one any server gets.
//!
//! Batching saves the server side a write and a read per query, and PostgreSQL a wake-up: at
//! hundreds of clients per server it is most of a pooler's system calls. The price is the
//! pipeline's: a slow query holds up the ones behind it in its batch (they waited in line
//! anyway), and a client that stops reading its answer holds up those behind it.

use crate::cancel::{Cancel, CancelTarget};
use crate::endpoint::ServerAddr;
use crate::params::Params;
use crate::pool::PooledConn;
use crate::prepared::{self, ServerStatements};
use crate::protocol::messages::parse_error_fields;
use crate::router::effects::Effects;
use crate::stats::ClientInfo;
use bytes::{Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Read size for the server's answers.
const READ_CHUNK: usize = 16 * 1024;

/// A client's place in line, as the pool keeps it for batching: its request, whole.
pub struct Ticket {
    /// The request's messages as the client sent them (`eligible`).
    pub query: Bytes,
    /// The client's settings: only a server in step with them may take it into a batch.
    pub wants: Arc<Params>,
    /// Where the client's cancels go while its query runs.
    pub client: Arc<ClientInfo>,
}

/// Whether a client's request may run in a batch: nothing but one unit the server answers
/// with one ReadyForQuery and that leaves nothing behind, either a simple Query, or an
/// extended-protocol unit on the unnamed statement and portal (Parse first, Bind, Describe,
/// Execute, and its Sync last). Every query text must stand alone: `effects` (the caller's
/// lexer pass, so it can keep what it found) must be none, `Effects::unbatchable` included.
pub fn eligible(buf: &[u8], mut effects: impl FnMut(&str) -> Effects) -> bool {
    let mut text_ok = |text: &str| !text.is_empty() && !effects(text).any();
    let (mut at, mut first, mut ended) = (0, true, false);
    while let Some(head) = buf.get(at..at + 5) {
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let Some(body) = buf.get(at + 5..at + 1 + len).filter(|_| len >= 4) else {
            return false;
        };
        at += 1 + len;
        let last = at == buf.len();
        let ok = match head[0] {
            b'Q' => first && last && text_ok(prepared::query_text(body)),
            // the unnamed statement is made here, not found on the server
            b'P' => {
                first
                    && prepared::split_parse(body).is_some_and(|(name, rest)| {
                        name.is_empty() && text_ok(prepared::query_text(rest))
                    })
            }
            b'B' => {
                !first
                    && prepared::bind_names(body)
                        .is_some_and(|(p, s, _)| p.is_empty() && s.is_empty())
            }
            b'D' => !first && prepared::target(body).is_some_and(|(_, name)| name.is_empty()),
            b'E' => !first && body.first() == Some(&0),
            b'S' => !first && last,
            _ => false,
        };
        if !ok {
            return false;
        }
        first = false;
        ended = last && matches!(head[0], b'Q' | b'S');
    }
    // a Query or a Sync ends it, and nothing follows
    ended
}

/// What a client in a batch is lent instead of a server.
pub struct Seat {
    pub pipe: Pipe,
    /// The request as the batch sent it: sent again if it did not take effect
    /// (`Pipe::unrun`).
    pub request: Bytes,
    /// The server's id and address, for the client's statistics.
    pub conn_id: u64,
    pub addr: ServerAddr,
    /// Stand-ins for the server's own: a batched query changes neither.
    pub params: Params,
    pub statements: ServerStatements,
}

/// The client's end of the batch: reads give its answer; writes take its query, which the
/// batch has sent already, and nothing more.
pub struct Pipe {
    slot: Arc<Slot>,
    chunk: Bytes,
    unsent: usize,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.slot.close(Side::Client);
    }
}

/// The hand-off of one chunk of answer from the batch to a client: the batch waits while the
/// client has not taken the last one (so a client's answer is never held whole), and each
/// side sees the other go. Lighter than a channel: one small allocation per client.
#[derive(Default)]
struct Slot(Mutex<SlotState>);

#[derive(Default)]
struct SlotState {
    chunk: Option<Bytes>,
    client_gone: bool,
    batch_gone: bool,
    /// The request did not take effect and is to be sent again.
    unrun: Option<Unrun>,
    client: Option<Waker>,
    batch: Option<Waker>,
}

/// Why a batched request is sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unrun {
    /// The batch's server was lost before it started the request: PostgreSQL runs a
    /// pipeline's requests in turn, so it never ran.
    ServerLost,
    /// A cancel meant for a request ahead of it in the batch reached the server while it ran
    /// (`Exposure`): it failed before any statement of it completed, and was rolled back.
    CancelledForAnother,
}

enum Side {
    Client,
    Batch,
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self, side: Side) {
        let mut s = self.state();
        let other = match side {
            Side::Client => {
                s.client_gone = true;
                s.chunk = None;
                s.batch.take()
            }
            Side::Batch => {
                s.batch_gone = true;
                s.client.take()
            }
        };
        drop(s);
        other.into_iter().for_each(Waker::wake);
    }

    /// The request is to be sent again, its answer (if any) dropped.
    fn close_unrun(&self, why: Unrun) {
        self.state().unrun = Some(why);
        self.close(Side::Batch);
    }

    /// Ready(false) when the client has gone.
    fn poll_put(&self, cx: &mut Context<'_>, chunk: &mut Option<Bytes>) -> Poll<bool> {
        let mut s = self.state();
        if s.client_gone {
            return Poll::Ready(false);
        }
        if s.chunk.is_some() {
            s.batch = Some(cx.waker().clone());
            return Poll::Pending;
        }
        s.chunk = chunk.take();
        let w = s.client.take();
        drop(s);
        w.into_iter().for_each(Waker::wake);
        Poll::Ready(true)
    }

    /// Ready(None) at the end of the batch's part.
    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut s = self.state();
        if let Some(c) = s.chunk.take() {
            let w = s.batch.take();
            drop(s);
            w.into_iter().for_each(Waker::wake);
            return Poll::Ready(Some(c));
        }
        if s.batch_gone {
            return Poll::Ready(None);
        }
        s.client = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Pipe {
    /// Whether, and why, the client's request is to be sent again: the batch ended its part
    /// without an answer.
    pub fn unrun(&self) -> Option<Unrun> {
        self.slot.state().unrun
    }
}

impl AsyncRead for Pipe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.chunk.is_empty() {
            match self.slot.poll_take(cx) {
                Poll::Ready(Some(c)) => self.chunk = c,
                // the batch ended before this answer did: end of stream
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.chunk.len().min(buf.remaining());
        buf.put_slice(&self.chunk.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.len() > self.unsent {
            return Poll::Ready(Err(io::Error::other(
                "a batched client sent more than its query",
            )));
        }
        self.unsent -= buf.len();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The server's side of one client in the batch.
struct Place {
    slot: Arc<Slot>,
    client: Arc<ClientInfo>,
}

impl Drop for Place {
    fn drop(&mut self) {
        // a batch ended early (its server lost) leaves no client marked as queued in it
        self.client.set_batch_queued(false);
        self.slot.close(Side::Batch);
    }
}

/// A batch being formed (by the pool, under its lock): the queries in order, one place each.
pub struct Batch {
    out: BytesMut,
    places: Vec<Place>,
}

impl Batch {
    /// Room for `n` requests like `first`.
    pub fn with_capacity(n: usize, first: &Ticket) -> Batch {
        Batch {
            out: BytesMut::with_capacity(n * first.query.len()),
            places: Vec::with_capacity(n),
        }
    }

    pub fn len(&self) -> usize {
        self.places.len()
    }

    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }

    /// A seat for the ticket's client; its query joins the batch only if the client takes
    /// the seat (`hand` gives it back when the client has left the line).
    pub fn seat(&mut self, conn_id: u64, addr: ServerAddr, t: &Ticket) -> (Seat, PlaceKey) {
        let slot = Arc::new(Slot::default());
        let seat = Seat {
            pipe: Pipe {
                slot: slot.clone(),
                chunk: Bytes::new(),
                unsent: t.query.len(),
            },
            request: t.query.clone(),
            conn_id,
            addr,
            params: Params::default(),
            statements: ServerStatements::default(),
        };
        (
            seat,
            PlaceKey {
                slot,
                client: t.client.clone(),
                query: t.query.clone(),
            },
        )
    }

    /// The client took its seat.
    pub fn add(&mut self, key: PlaceKey) {
        // behind another client's query: a cancel for it waits until it runs
        key.client.set_batch_queued(!self.places.is_empty());
        self.out.extend_from_slice(&key.query);
        self.places.push(Place {
            slot: key.slot,
            client: key.client,
        });
    }
}

/// What joins a batch once its client took the seat.
pub struct PlaceKey {
    slot: Arc<Slot>,
    client: Arc<ClientInfo>,
    query: Bytes,
}

/// Runs a batch on its server, then gives the server back (or closes it when the answers
/// were not what a batch of plain queries gives).
pub async fn drive(mut conn: PooledConn, batch: Batch) {
    let Batch { out, places } = batch;
    // the place whose answer comes now
    let mut at = 0;
    let mut begun = Begun::default();
    let mut exposure = Exposure::new(conn.cancel_target());
    let lost = match conn.stream.write_all(&out).await {
        Err(e) => Err(e),
        Ok(()) => {
            if let Some(first) = places.first() {
                begun.watch(runs_now(&conn, &first.client));
            }
            relay_answers(&mut conn, &places, &mut at, &mut begun, &mut exposure).await
        }
    };
    begun.seen();
    match lost {
        Ok(true) => conn.release(),
        Ok(false) => tracing::debug!("closing server after a batch: unexpected answer"),
        Err(e) => {
            // The request running fails with the server, as any client's would; those behind
            // it never started and go back in line (the connection, dropped, is closed).
            tracing::debug!(
                "batch ended: server i/o error: {e}; {} requests to send again",
                places.len().saturating_sub(at + 1)
            );
            for p in places.iter().skip(at + 1) {
                p.slot.close_unrun(Unrun::ServerLost);
            }
        }
    }
}

/// The client's query runs now: its cancels go to the server, and one it asked for while
/// the query waited in the batch is sent now (a counted cancel, as any other). Returns what
/// that deferred cancel watches for: the query's first answer bytes.
fn runs_now(conn: &PooledConn, client: &Arc<ClientInfo>) -> Option<Arc<AtomicBool>> {
    client.cancel.set_target(Some(conn.cancel_target()));
    client.set_batch_queued(false);
    let c = client.cancel_if_running()?;
    let begun = Arc::new(AtomicBool::new(false));
    let timeout = conn.pool_settings().connect_timeout;
    tokio::spawn(send_deferred(c, client.clone(), begun.clone(), timeout));
    Some(begun)
}

/// Waits before each resend of a deferred cancel whose query has not answered.
const RESEND_AFTER: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
];

/// Sends a cancel deferred in a batch, and sends it again while its query has answered
/// nothing. PostgreSQL ignores a cancel that reaches a backend between two pipelined queries
/// (it is reading its next command); the batch sends the cancel as the query ahead ends,
/// just then. A query cancelled, or running and answering, sends bytes; a resend stops at
/// the first, or once the client's query is no longer the one running (no target).
async fn send_deferred(
    mut c: Cancel,
    client: Arc<ClientInfo>,
    begun: Arc<AtomicBool>,
    timeout: Duration,
) {
    for wait in RESEND_AFTER {
        let to = c.to.clone();
        if let Err(e) = crate::cancel::send_cancel(c, timeout).await {
            tracing::warn!("sending a cancel deferred in a batch to {to} failed: {e}");
            return;
        }
        tokio::time::sleep(wait).await;
        if begun.load(Ordering::Acquire) {
            return;
        }
        c = match client.cancel.start_cancel(client.cancel.secret) {
            Some(c) => c,
            None => return,
        };
        tracing::debug!("resending a cancel deferred in a batch: its query answered nothing");
    }
    let to = c.to.clone();
    if let Err(e) = crate::cancel::send_cancel(c, timeout).await {
        tracing::warn!("sending a cancel deferred in a batch to {to} failed: {e}");
    }
}

/// The deferred cancel of the place running now, if it has one: told when the place's
/// answer begins (or the place is done, or the batch ends), so it is not sent again.
#[derive(Default)]
struct Begun(Option<Arc<AtomicBool>>);

impl Begun {
    fn watch(&mut self, begun: Option<Arc<AtomicBool>>) {
        self.seen();
        self.0 = begun;
    }

    fn seen(&mut self) {
        if let Some(b) = self.0.take() {
            b.store(true, Ordering::Release);
        }
    }
}

/// Hands each place its answer, up to and including its ReadyForQuery. Ok(false): the
/// server changed a setting or asked for COPY data, so it cannot go back to the pool.
async fn relay_answers(
    conn: &mut PooledConn,
    places: &[Place],
    at: &mut usize,
    begun: &mut Begun,
    exposure: &mut Exposure,
) -> io::Result<bool> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut scan = Split::default();
    let mut clean = true;
    while let Some(place) = places.get(*at) {
        match scan.step(&buf) {
            Some(SplitStep::Message(b'S')) => clean = false,
            Some(SplitStep::Message(b'G' | b'W')) => return Ok(false),
            Some(SplitStep::Message(_)) => {}
            Some(SplitStep::Bad) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "ReadyForQuery of a wrong length",
                ))
            }
            Some(SplitStep::Ready) => {
                let answer = buf.split_to(scan.take()).freeze();
                let idle = answer.last() == Some(&b'I');
                // before the client can see its answer: after it, the client may be lent
                // another server for its next request and point its cancels there
                place.client.cancel.set_target(None);
                if idle && exposure.hit(&answer) {
                    tracing::debug!("a batched request was cancelled for another: sent again");
                    place.slot.close_unrun(Unrun::CancelledForAnother);
                } else {
                    deliver(place, answer).await;
                }
                if !idle {
                    // A request that stood alone to the lexer opened a transaction block: the
                    // requests behind it ran inside it, and closing the server undoes them,
                    // so they are sent again (`drive`), never reported done.
                    return Err(io::Error::other(
                        "a batched request left its session in a transaction",
                    ));
                }
                *at += 1;
                if let Some(next) = places.get(*at) {
                    exposure.place_starts();
                    begun.watch(runs_now(conn, &next.client));
                    if !buf.is_empty() {
                        // its answer is here already
                        begun.seen();
                    }
                }
            }
            None => {
                // all buffered is walked: what belongs to this answer goes now (unless it is
                // kept back), then more
                if !exposure.keeps_back(scan.walked) {
                    let n = scan.take();
                    if n > 0 {
                        deliver(place, buf.split_to(n).freeze()).await;
                    }
                }
                buf.reserve(READ_CHUNK);
                if conn.stream.read_buf(&mut buf).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                begun.seen();
            }
        }
    }
    // anything more is not an answer to the batch
    Ok(clean && buf.is_empty())
}

/// How much of an exposed place's answer is kept back at most: a larger one goes on as it
/// comes (and is no longer sent again).
const KEEP_BACK: usize = 64 * 1024;

/// Whether another client's cancel may have reached the request answering now.
///
/// The server runs a batch's requests back to back, ahead of pgmux reading their answers:
/// a cancel sent while pgmux still reads the answer of one request may reach the backend
/// once it runs the next. PostgreSQL cancels whatever statement runs when the signal lands,
/// so that request, another client's, would fail for a cancel it never asked for. Once some
/// cancel was begun on the server during the batch, each request that starts after it is
/// exposed: its answer is kept back (up to [`KEEP_BACK`]), and if it ends in a cancel
/// (57014) before any of its statements completed, and its own client asked for none, it is
/// sent again instead (`Unrun::CancelledForAnother`): the failed implicit transaction left
/// nothing behind.
struct Exposure {
    flight: CancelTarget,
    /// Cancels begun on the server when the batch started.
    at_batch: u32,
    /// Cancels begun when the current request started: any more are its own client's.
    at_place: u32,
    keeping: bool,
}

impl Exposure {
    fn new(flight: CancelTarget) -> Exposure {
        let n = flight.begun();
        Exposure {
            flight,
            at_batch: n,
            at_place: n,
            keeping: false,
        }
    }

    /// The next request starts (called before its client's cancels go to the server, and
    /// after the previous client's can no longer: `set_target` takes the same lock as
    /// `start_cancel`).
    fn place_starts(&mut self) {
        self.at_place = self.flight.begun();
        self.keeping = self.at_place != self.at_batch;
    }

    /// Whether the `walked` bytes of the current answer stay back for now.
    fn keeps_back(&mut self, walked: usize) -> bool {
        self.keeping &= walked <= KEEP_BACK;
        self.keeping
    }

    /// The current request's whole answer, kept back, shows a cancel it did not ask for.
    fn hit(&self, answer: &[u8]) -> bool {
        self.keeping && self.flight.begun() == self.at_place && cancelled_before_completing(answer)
    }
}

/// Whether an answer's first error is a cancel (57014) and no statement completed before it.
fn cancelled_before_completing(mut answer: &[u8]) -> bool {
    while let Some(head) = answer.get(..5) {
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let Some(body) = answer.get(5..1 + len).filter(|_| len >= 4) else {
            return false;
        };
        match head[0] {
            b'C' => return false,
            b'E' => return parse_error_fields(body).code == "57014",
            _ => {}
        }
        answer = &answer[1 + len..];
    }
    false
}

/// A client that left drops its answer.
async fn deliver(place: &Place, chunk: Bytes) {
    let mut chunk = Some(chunk);
    std::future::poll_fn(|cx| place.slot.poll_put(cx, &mut chunk)).await;
}

/// Walks message headers in the server's output: how much of the buffer may go to the
/// current client, and where its answer ends (a whole ReadyForQuery).
#[derive(Default)]
struct Split {
    /// Bytes of the buffer already walked and not yet taken.
    walked: usize,
    /// Bytes of the current message still to come after `walked`.
    rest: usize,
}

enum SplitStep {
    /// A message header was walked (its tag).
    Message(u8),
    /// A whole ReadyForQuery was walked: `take` ends the current answer.
    Ready,
    /// A ReadyForQuery of another length than PostgreSQL's: read whole, its length word
    /// alone would size the buffer, so the server is given up instead.
    Bad,
}

impl Split {
    fn step(&mut self, buf: &[u8]) -> Option<SplitStep> {
        if self.rest > 0 {
            let n = self.rest.min(buf.len() - self.walked);
            self.walked += n;
            self.rest -= n;
            if self.rest > 0 {
                return None;
            }
        }
        let head = buf.get(self.walked..self.walked + 5)?;
        let tag = head[0];
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]).max(4) as usize;
        if tag == b'Z' {
            if len != 5 {
                return Some(SplitStep::Bad);
            }
            if buf.len() < self.walked + 1 + len {
                return None;
            }
            self.walked += 1 + len;
            return Some(SplitStep::Ready);
        }
        self.walked += 5;
        self.rest = len - 4;
        Some(SplitStep::Message(tag))
    }

    /// The bytes walked so far, to be split off the buffer.
    fn take(&mut self) -> usize {
        std::mem::take(&mut self.walked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(text: &str) -> Vec<u8> {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((text.len() + 5) as u32).to_be_bytes());
        m.extend_from_slice(text.as_bytes());
        m.push(0);
        m
    }

    fn eligible(buf: &[u8]) -> bool {
        super::eligible(buf, crate::router::effects::effects)
    }

    #[test]
    fn only_standalone_queries_are_batched() {
        for ok in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7",
            "UPDATE t SET x = 1",
            "select 1; select 2",
            "COMMIT",
        ] {
            assert!(eligible(&q(ok)), "{ok}");
        }
        for no in [
            "BEGIN",
            "select 1; begin",
            "START TRANSACTION",
            "SET search_path = x",
            "select set_config('search_path', 'x', false)",
            "LISTEN x",
            "CREATE TEMP TABLE t (x int)",
            "select pg_advisory_lock(1)",
            "COPY t FROM STDIN",
            "copy (select 1) to stdout",
            "PREPARE p AS SELECT 1",
            "DISCARD ALL",
            "DEALLOCATE ALL",
            "select 1; deallocate prepare all",
        ] {
            assert!(!eligible(&q(no)), "{no}");
        }
        let mut two = q("select 1");
        two.extend_from_slice(&q("select 2"));
        assert!(!eligible(&two), "two messages");
        let one = q("select 1");
        assert!(!eligible(&one[..one.len() - 1]), "cut short");
        assert!(!eligible(b"H\0\0\0\x04"), "a Flush");
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Parse (statement `stmt`), Bind (portal, statement), Describe portal, Execute, Sync.
    fn unit(stmt: &str, portal: &str, text: &str) -> Vec<u8> {
        let mut parse = format!("{stmt}\0{text}\0").into_bytes();
        parse.extend_from_slice(&[0, 0]);
        let mut bind = format!("{portal}\0{stmt}\0").into_bytes();
        bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut out = msg(b'P', &parse);
        out.extend(msg(b'B', &bind));
        out.extend(msg(b'D', format!("P{portal}\0").as_bytes()));
        let mut exec = format!("{portal}\0").into_bytes();
        exec.extend_from_slice(&[0, 0, 0, 0]);
        out.extend(msg(b'E', &exec));
        out.extend(msg(b'S', b""));
        out
    }

    #[test]
    fn unnamed_extended_units_are_batched() {
        assert!(eligible(&unit("", "", "SELECT $1::int")));
        assert!(
            !eligible(&unit("s1", "", "SELECT $1::int")),
            "a named statement"
        );
        assert!(
            !eligible(&unit("", "p1", "SELECT $1::int")),
            "a named portal"
        );
        assert!(!eligible(&unit("", "", "BEGIN")), "a transaction block");
        let whole = unit("", "", "SELECT 1");
        assert!(!eligible(&whole[..whole.len() - 5]), "no Sync yet");
        let mut two = whole.clone();
        two.extend_from_slice(&whole);
        assert!(!eligible(&two), "two units");
        // a Bind to a statement parsed earlier, on whichever server that was
        let bind_first = whole[whole.iter().position(|&b| b == b'B').unwrap()..].to_vec();
        assert!(!eligible(&bind_first));
    }

    #[test]
    fn answers_split_at_each_ready_for_query() {
        // C, Z for the first; T, D (long), C, Z for the second
        let mut out = Vec::new();
        out.extend_from_slice(b"C\0\0\0\x0dSELECT 1\0");
        out.extend_from_slice(b"Z\0\0\0\x05I");
        let first = out.len();
        out.extend_from_slice(b"D\0\0\0\x0e");
        out.extend_from_slice(&[7u8; 10]);
        out.extend_from_slice(b"Z\0\0\0\x05I");
        let mut s = Split::default();
        // fed a byte at a time, as reads may cut anywhere
        let mut ends = Vec::new();
        let mut taken = 0;
        for upto in 1..=out.len() {
            while let Some(step) = s.step(&out[taken..upto]) {
                if let SplitStep::Ready = step {
                    taken += s.take();
                    ends.push(taken);
                }
            }
        }
        assert_eq!(ends, vec![first, out.len()]);
        // a ReadyForQuery claiming 4 GiB is refused, not waited for
        let mut s = Split::default();
        assert!(matches!(
            s.step(b"Z\xff\xff\xff\xffI"),
            Some(SplitStep::Bad)
        ));
    }

    /// A listener standing in for PostgreSQL's cancel port: counts the CancelRequests it is
    /// sent, closing each connection (delivery) at once.
    async fn cancel_port() -> (crate::endpoint::Dial, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dial = crate::endpoint::Dial::Tcp(l.local_addr().unwrap());
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = n.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut req = [0u8; 16];
                if s.read_exact(&mut req).await.is_ok() {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        (dial, n)
    }

    /// A deferred cancel is sent again while its query answers nothing (PostgreSQL may have
    /// ignored it between two pipelined queries), and not once the answer has begun or the
    /// query is no longer the client's running one.
    #[tokio::test]
    async fn a_deferred_cancel_is_resent_only_while_its_query_answers_nothing() {
        let reg = Arc::new(crate::stats::ClientRegistry::default());
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let client = reg.register(
            crate::stats::PoolStats::new("db", "u"),
            crate::endpoint::ClientAddr::from(addr),
            None,
            "app",
        );
        let info = client.info().clone();
        let (dial, sent) = cancel_port().await;
        let flight = Arc::new(crate::cancel::CancelFlight::new(dial, 9, 10));
        let timeout = Duration::from_secs(5);
        let start = |info: &Arc<ClientInfo>| info.cancel.start_cancel(info.cancel.secret);

        client.set_cancel_target(Some(flight.clone()));
        let never = Arc::new(AtomicBool::new(false));
        send_deferred(start(&info).unwrap(), info.clone(), never, timeout).await;
        assert_eq!(sent.swap(0, Ordering::SeqCst), 1 + RESEND_AFTER.len());

        let begun = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(send_deferred(
            start(&info).unwrap(),
            info.clone(),
            begun.clone(),
            timeout,
        ));
        begun.store(true, Ordering::Release);
        task.await.unwrap();
        assert_eq!(sent.swap(0, Ordering::SeqCst), 1, "answered: not resent");

        let never = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(send_deferred(
            start(&info).unwrap(),
            info.clone(),
            never,
            timeout,
        ));
        client.set_cancel_target(None);
        task.await.unwrap();
        assert_eq!(sent.swap(0, Ordering::SeqCst), 1, "done: not resent");
        assert!(!flight.pending(), "every cancel sent was delivered");
    }
}
