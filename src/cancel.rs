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

use bytes::{BufMut, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// Where a client's query runs right now.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
    /// The server connection's count of cancels on their way.
    pub flight: Arc<CancelFlight>,
    /// The server's host name when its connection is TLS: the cancel goes encrypted too, as
    /// libpq 17 sends it (some managed services accept nothing else).
    pub tls_host: Option<Arc<str>>,
}

/// Cancels on their way to one server connection.
#[derive(Debug, Default)]
pub struct CancelFlight {
    pending: AtomicU32,
    /// A cancel failed or timed out: whether it reached the backend is unknown.
    failed: AtomicBool,
    settled: Notify,
}

impl CancelFlight {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::AcqRel);
        InFlight {
            flight: self.clone(),
            delivered: false,
        }
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
    pub addr: SocketAddr,
    pid: i32,
    secret: i32,
    tls_host: Option<Arc<str>>,
    in_flight: InFlight,
}

/// A registered client's key and current target.
#[derive(Debug)]
pub struct CancelHandle {
    pub pid: i32,
    pub secret: i32,
    target: Mutex<Option<CancelTarget>>,
}

impl CancelHandle {
    /// The server the client's work runs on, or None when it has none. Once this returns
    /// with None, every cancel aimed at the previous server is counted in its flight.
    pub fn set_target(&self, t: Option<CancelTarget>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    /// A cancel for the current target, counted in its flight under the same lock that
    /// `set_target` takes, so a server released after `set_target(None)` sees it.
    fn start_cancel(&self) -> Option<Cancel> {
        let t = self.target.lock().unwrap_or_else(|e| e.into_inner());
        let t = t.as_ref()?;
        Some(Cancel {
            addr: t.addr,
            pid: t.pid,
            secret: t.secret,
            tls_host: t.tls_host.clone(),
            in_flight: t.flight.begin(),
        })
    }
}

/// All connected clients' keys.
#[derive(Default)]
pub struct CancelRegistry {
    by_pid: Mutex<HashMap<i32, Arc<CancelHandle>>>,
}

impl CancelRegistry {
    /// Registers a new client under a fresh random key; unregister when it leaves.
    pub fn register(&self) -> Arc<CancelHandle> {
        let mut map = self.by_pid.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let pid = rand::random::<i32>() & 0x7fff_ffff;
            if pid == 0 || map.contains_key(&pid) {
                continue;
            }
            let h = Arc::new(CancelHandle {
                pid,
                secret: rand::random(),
                target: Mutex::new(None),
            });
            map.insert(pid, h.clone());
            return h;
        }
    }

    pub fn unregister(&self, pid: i32) {
        self.by_pid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }

    /// A cancel to send, if the key is valid and its client is running a query.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<Cancel> {
        let h = self
            .by_pid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pid)
            .cloned()?;
        // constant-time compare so a guessed key learns nothing from timing
        let ok = (h.secret ^ secret) == 0;
        if ok {
            h.start_cancel()
        } else {
            None
        }
    }
}

/// Sends a CancelRequest to a server and waits until PostgreSQL closes the connection, which
/// it does once it has signalled the backend; all within `timeout`. Errors are only worth a
/// log line; an unfinished cancel marks the server's flight failed, so the server is closed.
pub async fn send_cancel(mut c: Cancel, timeout: Duration) -> std::io::Result<()> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(c.addr).await?;
        let mut s = match &c.tls_host {
            Some(host) => crate::tls::connect_server(tcp, host)
                .await
                .map_err(std::io::Error::other)?,
            None => crate::tls::ServerStream::Plain(tcp),
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

    fn handle() -> (CancelRegistry, Arc<CancelHandle>, Arc<CancelFlight>) {
        let reg = CancelRegistry::default();
        let h = reg.register();
        let flight = Arc::new(CancelFlight::default());
        h.set_target(Some(CancelTarget {
            addr: "127.0.0.1:1".parse().unwrap(),
            pid: 7,
            secret: 8,
            flight: flight.clone(),
            tls_host: None,
        }));
        (reg, h, flight)
    }

    #[tokio::test]
    async fn a_cancel_counts_in_its_servers_flight_until_it_ends() {
        let (reg, h, flight) = handle();
        let mut c = reg.lookup(h.pid, h.secret).expect("a target");
        // the client's query ends: no new cancel can start, the one on its way still counts
        h.set_target(None);
        assert!(reg.lookup(h.pid, h.secret).is_none());
        assert!(flight.pending());
        c.in_flight.delivered = true;
        drop(c);
        assert!(!flight.pending());
        assert!(flight.settled().await, "delivered");
    }

    #[tokio::test]
    async fn an_unfinished_cancel_marks_the_server_failed() {
        let (reg, h, flight) = handle();
        assert!(reg.lookup(h.pid, h.secret ^ 1).is_none(), "wrong secret");
        assert!(!flight.pending());
        let c = reg.lookup(h.pid, h.secret).unwrap();
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
        let (reg, h, flight) = handle();
        // nothing listens on port 1
        let c = reg.lookup(h.pid, h.secret).unwrap();
        assert!(send_cancel(c, Duration::from_secs(5)).await.is_err());
        assert!(flight.failed() && !flight.pending());
    }
}
