//! Cancel keys: each client gets pgmux's own BackendKeyData, and a CancelRequest carrying it
//! is sent on to whichever server connection serves that client at that moment.
//!
//! A cancel can reach PostgreSQL after the query it was meant for has finished; in
//! transaction mode the server may by then run another client's query, which the cancel
//! would kill. So, as PgBouncer does, a server with a cancel in flight is not lent again
//! until the cancel has been delivered: each server connection has a [`CancelFlight`]
//! counting cancels on their way to it, and the pool holds back a released server until that
//! count is zero. Delivery is known when PostgreSQL closes the cancel connection, which it
//! does after signalling the backend (an idle backend ignores the signal). A cancel that
//! fails or does not finish within its bound leaves the server's state unknown: it is closed.

use crate::endpoint::{Dial, TcpOrUnix};
use bytes::{BufMut, BytesMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// How long a cancel may take when `server_connect_timeout` is 0 (unbounded).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a client's query runs right now: its server connection's key and flight, shared
/// with the connection, so pointing a client at its server allocates nothing.
pub type CancelTarget = Arc<CancelFlight>;

/// One server connection's cancel key (its BackendKeyData) and the cancels on their way to it.
#[derive(Debug)]
pub struct CancelFlight {
    /// How to reach the server again: its TCP address or its socket file.
    pub to: Dial,
    pub pid: i32,
    pub secret: i32,
    /// The server's host name when its connection is TLS: the cancel goes encrypted too, as
    /// libpq 17 sends it (some managed services accept nothing else).
    pub tls_host: Option<Arc<str>>,
    pending: AtomicU32,
    /// Cancels begun on this server ever: a batch compares counts to tell whether one was
    /// aimed at a request ahead of the one running (`batch::Exposure`).
    begun: AtomicU32,
    /// A cancel failed or timed out: whether it reached the backend is unknown.
    failed: AtomicBool,
    settled: Notify,
}

impl Default for CancelFlight {
    /// No key yet (a server still logging in).
    fn default() -> Self {
        CancelFlight::new(Dial::Tcp(SocketAddr::from(([0, 0, 0, 0], 0))), 0, 0)
    }
}

impl CancelFlight {
    pub fn new(to: Dial, pid: i32, secret: i32) -> CancelFlight {
        CancelFlight {
            to,
            pid,
            secret,
            tls_host: None,
            pending: AtomicU32::new(0),
            begun: AtomicU32::new(0),
            failed: AtomicBool::new(false),
            settled: Notify::new(),
        }
    }

    /// Cancels to this server go over TLS, verified against `host` (its connection is TLS).
    pub fn with_tls_host(mut self, host: Option<Arc<str>>) -> CancelFlight {
        self.tls_host = host;
        self
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.begun.fetch_add(1, Ordering::AcqRel);
        self.pending.fetch_add(1, Ordering::AcqRel);
        InFlight {
            flight: self.clone(),
            delivered: false,
        }
    }

    /// A cancel of whatever this server runs now, counted in its flight.
    pub fn cancel(self: &Arc<Self>) -> Cancel {
        Cancel {
            to: self.to.clone(),
            pid: self.pid,
            secret: self.secret,
            tls_host: self.tls_host.clone(),
            in_flight: self.begin(),
        }
    }

    /// How many cancels were begun on this server so far.
    pub fn begun(&self) -> u32 {
        self.begun.load(Ordering::Acquire)
    }

    /// Some cancel is on its way.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// Some cancel may or may not have reached the backend.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Waits until no cancel is on its way; true if every one was delivered.
    pub async fn settled(&self) -> bool {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            // registered before the check, so a cancel settling in between still wakes us
            notified.as_mut().enable();
            if !self.pending() {
                return !self.failed();
            }
            notified.await;
        }
    }
}

/// One cancel on its way; dropped without being marked delivered, it counts as failed.
#[derive(Debug)]
pub struct InFlight {
    flight: Arc<CancelFlight>,
    delivered: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.delivered {
            self.flight.failed.store(true, Ordering::Release);
        }
        if self.flight.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.flight.settled.notify_waiters();
        }
    }
}

/// A cancel to send: where, the server's key, and its place in the server's flight.
#[derive(Debug)]
pub struct Cancel {
    pub to: Dial,
    pid: i32,
    secret: i32,
    tls_host: Option<Arc<str>>,
    in_flight: InFlight,
}

/// A logged-in client's own key (the BackendKeyData pgmux gave it) and its current target.
/// Kept in the client's registry entry (`stats::ClientInfo`), which is what a CancelRequest
/// looks up: no allocation or map of its own per client.
#[derive(Debug)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
    target: Mutex<Option<CancelTarget>>,
}

impl CancelKey {
    pub fn new(pid: i32, secret: i32) -> CancelKey {
        CancelKey {
            pid,
            secret,
            target: Mutex::new(None),
        }
    }

    /// The server the client's work runs on, or None when it has none. Once this returns
    /// with None, every cancel aimed at the previous server is counted in its flight.
    pub fn set_target(&self, t: Option<CancelTarget>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    /// The client's work runs on a server now.
    pub fn has_target(&self) -> bool {
        self.target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Whether `secret` is this key's: a constant-time compare, so a guessed key learns
    /// nothing from timing.
    pub fn matches(&self, secret: i32) -> bool {
        (self.secret ^ secret) == 0
    }

    /// A cancel for the current target if `secret` is this key's, counted in the target's
    /// flight under the same lock that `set_target` takes, so a server released after
    /// `set_target(None)` sees it.
    pub fn start_cancel(&self, secret: i32) -> Option<Cancel> {
        if !self.matches(secret) {
            return None;
        }
        let t = self.target.lock().unwrap_or_else(|e| e.into_inner());
        Some(t.as_ref()?.cancel())
    }
}

/// Sends a CancelRequest to a server and waits until PostgreSQL closes the connection, which
/// it does once it has signalled the backend; all within `timeout`. Errors are only worth a
/// log line; an unfinished cancel marks the server's flight failed, so the server is closed.
pub async fn send_cancel(mut c: Cancel, timeout: Duration) -> std::io::Result<()> {
    let exchange = async {
        let mut s = match (c.to.connect().await?, &c.tls_host) {
            (TcpOrUnix::Tcp(tcp), Some(host)) => crate::tls::connect_server(tcp, host, false)
                .await
                .map_err(std::io::Error::other)?,
            (socket, _) => socket.plain(),
        };
        let mut b = BytesMut::with_capacity(16);
        b.put_i32(16);
        b.put_i32(80877102);
        b.put_i32(c.pid);
        b.put_i32(c.secret);
        s.write_all(&b).await?;
        s.flush().await?;
        // PostgreSQL answers nothing: anything read is discarded, EOF is the delivery (over
        // TLS possibly without close_notify, which is no less a delivery)
        let mut sink = [0u8; 64];
        loop {
            match s.read(&mut sink).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(())) => {
            c.in_flight.delivered = true;
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "cancel not delivered in time",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> (CancelKey, Arc<CancelFlight>) {
        let key = CancelKey::new(1, 2);
        let flight = Arc::new(CancelFlight::new(
            Dial::Tcp("127.0.0.1:1".parse().unwrap()),
            7,
            8,
        ));
        key.set_target(Some(flight.clone()));
        (key, flight)
    }

    #[tokio::test]
    async fn a_cancel_counts_in_its_servers_flight_until_it_ends() {
        let (h, flight) = handle();
        let mut c = h.start_cancel(h.secret).expect("a target");
        assert_eq!(
            (&c.to, c.pid, c.secret),
            (&Dial::Tcp(SocketAddr::from(([127, 0, 0, 1], 1))), 7, 8),
            "the server's key"
        );
        // the client's query ends: no new cancel can start, the one on its way still counts
        h.set_target(None);
        assert!(h.start_cancel(h.secret).is_none());
        assert!(flight.pending());
        c.in_flight.delivered = true;
        drop(c);
        assert!(!flight.pending());
        assert!(flight.settled().await, "delivered");
    }

    #[tokio::test]
    async fn an_unfinished_cancel_marks_the_server_failed() {
        let (h, flight) = handle();
        assert!(h.start_cancel(h.secret ^ 1).is_none(), "wrong secret");
        assert!(!flight.pending());
        let c = h.start_cancel(h.secret).unwrap();
        let waiter = {
            let f = flight.clone();
            tokio::spawn(async move { f.settled().await })
        };
        drop(c);
        assert!(
            !waiter.await.unwrap(),
            "undelivered: the server must be closed"
        );
        assert!(flight.failed());
    }

    #[tokio::test]
    async fn a_refused_cancel_connection_fails() {
        let (h, flight) = handle();
        // nothing listens on port 1
        let c = h.start_cancel(h.secret).unwrap();
        assert!(send_cancel(c, Duration::from_secs(5)).await.is_err());
        assert!(flight.failed() && !flight.pending());
    }
}
