//! Forwarding: whole transactions through the relay, the way a transaction-mode session runs
//! them (a client's simple Query to the server, its one-row answer back, the server released
//! at ReadyForQuery), on in-memory streams: the figure is pgmux's own work per transaction
//! (scanning, statement fingerprint and session-state scan, statistics), without the system
//! calls that a socket adds (docs/performance.md: those are most of a proxy's CPU).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgmux::params::Params;
use pgmux::prepared::ServerStatements;
use pgmux::relay::{Event, Relay, ServerSide};
use pgmux::stats::{Meter, PoolStats};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

/// One end of a conversation: `input` becomes readable once `armed` (the client's at once,
/// the server's when the request has been written to it); what is written is counted.
struct Peer {
    input: Vec<u8>,
    pos: usize,
    armed: bool,
    arms_on_write: bool,
    written: usize,
}

impl Peer {
    fn new(input: Vec<u8>, arms_on_write: bool) -> Peer {
        Peer {
            input,
            pos: 0,
            armed: !arms_on_write,
            arms_on_write,
            written: 0,
        }
    }

    fn rewind(&mut self) {
        self.pos = 0;
        self.armed = !self.arms_on_write;
        self.written = 0;
    }
}

impl AsyncRead for Peer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.armed || self.pos == self.input.len() {
            return Poll::Pending;
        }
        let n = buf.remaining().min(self.input.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.input[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written += buf.len();
        if self.arms_on_write {
            self.armed = true;
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// pgbench -S's transaction: its Query, and PostgreSQL's answer.
fn conversation() -> (Vec<u8>, Vec<u8>) {
    let mut query = Vec::new();
    msg(
        &mut query,
        b'Q',
        b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;\0",
    );
    let mut answer = Vec::new();
    let mut desc = vec![0, 1];
    desc.extend_from_slice(b"abalance\0");
    desc.extend_from_slice(&[
        0, 0, 0x40, 0x01, 0, 3, 0, 0, 0, 23, 0, 4, 0xff, 0xff, 0xff, 0xff, 0, 0,
    ]);
    msg(&mut answer, b'T', &desc);
    msg(&mut answer, b'D', &[0, 1, 0, 0, 0, 1, b'0']);
    msg(&mut answer, b'C', b"SELECT 1\0");
    msg(&mut answer, b'Z', b"I");
    (query, answer)
}

/// Runs one transaction through the relay until it has nothing more to do.
fn transaction(
    relay: &mut Relay,
    client: &mut Peer,
    server: &mut Peer,
    params: &mut Params,
    statements: &mut ServerStatements,
    wants: &mut Arc<Params>,
) {
    let mut cx = Context::from_waker(Waker::noop());
    client.rewind();
    server.rewind();
    loop {
        let side = ServerSide {
            stream: &mut *server,
            params: &mut *params,
            statements: &mut *statements,
        };
        match relay.poll(&mut cx, &mut *client, Some(side), wants) {
            Poll::Ready(Event::Release) => continue,
            Poll::Ready(other) => panic!("unexpected relay event {other:?}"),
            Poll::Pending => break,
        }
    }
    assert_eq!(
        client.written,
        server.input.len(),
        "the whole answer reached the client"
    );
}

fn bench(c: &mut Criterion) {
    let (query, answer) = conversation();
    let mut client = Peer::new(query, false);
    let mut server = Peer::new(answer, true);
    let mut params = Params::default();
    let mut statements = ServerStatements::default();
    let mut wants = Arc::new(Params::default());
    let mut relay = Relay::new(256 * 1024 * 1024, true, Box::leak(Box::default()), 200);
    relay.meter = Meter::new(PoolStats::new("bench", "bench"));
    let mut g = c.benchmark_group("relay");
    g.throughput(Throughput::Elements(1));
    g.bench_function("simple_query_transaction", |b| {
        b.iter(|| {
            transaction(
                &mut relay,
                &mut client,
                &mut server,
                &mut params,
                &mut statements,
                &mut wants,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
