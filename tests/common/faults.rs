//! A fault-injecting TCP relay for tests: listens on a loopback port, forwards every
//! connection to a real server (PostgreSQL), and on command delays, stalls, drops, resets or
//! half-closes traffic, on one connection, on every open one, or on those accepted later.
//! pgmux's `[[databases]]` point at [`FaultRelay::port`], so the faults hit exactly the path
//! between pgmux and PostgreSQL, with real components on both ends.
//!
//! The relay runs on its own small tokio runtime, so blocking tests and `#[tokio::test]`s
//! can both use it; dropping it closes every connection it holds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::util::lock;

/// What the relay does to a connection's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything as it comes.
    Pass,
    /// Hold every byte back a little, both ways.
    Latency(Duration),
    /// Stop forwarding both ways; bytes wait in the kernel's buffers and flow again when the
    /// fault is lifted (a hung server or a congested path).
    Stall,
    /// Read and throw away everything, both ways, and never answer (a path that lost its
    /// peer without a reset: a crashed host, a dropped route).
    Blackhole,
    /// Reset both sides at once (RST, not FIN).
    Reset,
    /// Forward this many more bytes from the server, then reset both sides: a reset in the
    /// middle of whatever message those bytes end in.
    ResetAfter(usize),
    /// The server's side sends FIN towards pgmux and stops sending; pgmux may still write.
    HalfClose,
}

/// One relayed connection's control.
struct Conn {
    fault: watch::Sender<Fault>,
}

struct Shared {
    target: SocketAddr,
    /// Applied to connections accepted from now on.
    new_fault: Mutex<Fault>,
    conns: Mutex<BTreeMap<u64, Conn>>,
    accepted: AtomicU64,
    next_id: AtomicU64,
    /// Resets and half-closes carried out, so a test can wait until its fault has hit.
    applied: AtomicU64,
}

/// The relay; see the module docs.
pub struct FaultRelay {
    port: u16,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultRelay {
    /// Relay 127.0.0.1:<new port> to 127.0.0.1:`target_port`.
    pub fn start(target_port: u16) -> FaultRelay {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-relay")
            .enable_all()
            .build()
            .expect("fault relay runtime");
        // bound with std and handed over: block_on would panic inside an async test
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fault relay");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let port = std_listener.local_addr().expect("relay addr").port();
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(std_listener).expect("relay listener")
        };
        let shared = Arc::new(Shared {
            target: SocketAddr::from(([127, 0, 0, 1], target_port)),
            new_fault: Mutex::new(Fault::Pass),
            conns: Mutex::new(BTreeMap::new()),
            accepted: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            applied: AtomicU64::new(0),
        });
        runtime.spawn(accept_loop(listener, shared.clone()));
        FaultRelay {
            port,
            shared,
            runtime: Some(runtime),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Fault for connections accepted from now on; open ones keep theirs.
    pub fn set_new(&self, fault: Fault) {
        *lock(&self.shared.new_fault) = fault;
    }

    /// Fault for every open connection and every later one.
    pub fn set_all(&self, fault: Fault) {
        self.set_new(fault);
        for conn in lock(&self.shared.conns).values() {
            let _ = conn.fault.send(fault);
        }
    }

    /// Fault for one open connection (an id from [`conn_ids`](Self::conn_ids)).
    pub fn set_conn(&self, id: u64, fault: Fault) {
        if let Some(conn) = lock(&self.shared.conns).get(&id) {
            let _ = conn.fault.send(fault);
        }
    }

    /// Back to forwarding everything, for open and later connections.
    pub fn clear(&self) {
        self.set_all(Fault::Pass);
    }

    /// Ids of the connections open now, oldest first.
    pub fn conn_ids(&self) -> Vec<u64> {
        lock(&self.shared.conns).keys().copied().collect()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Resets and half-closes carried out since the start.
    pub fn applied(&self) -> u64 {
        self.shared.applied.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        // shutdown_background, not a plain drop: the relay may be dropped inside an async test
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = watch::channel(*lock(&shared.new_fault));
        lock(&shared.conns).insert(id, Conn { fault: tx });
        let shared = shared.clone();
        tokio::spawn(async move {
            if serve(client, &shared, rx).await {
                shared.applied.fetch_add(1, Ordering::SeqCst);
            }
            lock(&shared.conns).remove(&id);
        });
    }
}

/// Pumps one connection until either side closes or a fault ends it (then true; the sockets
/// are gone when it returns).
async fn serve(client: TcpStream, shared: &Shared, mut fault: watch::Receiver<Fault>) -> bool {
    let _ = client.set_nodelay(true);
    // copied out: a watch guard must not be held across an await
    let initial = *fault.borrow();
    let server = match initial {
        // a blackholed path never reaches the server at all
        Fault::Blackhole => None,
        _ => TcpStream::connect(shared.target).await.ok(),
    };
    let Some(server) = server else {
        if initial == Fault::Blackhole {
            return blackhole(client, fault).await;
        }
        return false;
    };
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let (mut cbuf, mut sbuf) = (vec![0u8; 16384], vec![0u8; 16384]);
    let (mut client_open, mut server_open) = (true, true);
    // bytes the server may still send under ResetAfter, counted from when it was set
    let mut budget: Option<usize> = None;
    let mut current = *fault.borrow_and_update();
    loop {
        match current {
            Fault::Reset => return reset(&cw, &sw),
            Fault::HalfClose if server_open => {
                let _ = cw.shutdown().await;
                server_open = false;
                shared.applied.fetch_add(1, Ordering::SeqCst);
            }
            Fault::ResetAfter(n) if budget.is_none() => budget = Some(n),
            _ => {}
        }
        if !client_open && !server_open {
            return false;
        }
        let flowing = !matches!(current, Fault::Stall);
        tokio::select! {
            changed = fault.changed() => {
                if changed.is_err() {
                    return false;
                }
                current = *fault.borrow_and_update();
                if !matches!(current, Fault::ResetAfter(_)) {
                    budget = None;
                }
            }
            r = cr.read(&mut cbuf), if flowing && client_open => {
                let n = r.unwrap_or(0);
                if n == 0 {
                    client_open = false;
                    let _ = sw.shutdown().await;
                    continue;
                }
                if !forward(&mut sw, &cbuf[..n], current).await {
                    return reset(&cw, &sw);
                }
            }
            r = sr.read(&mut sbuf), if flowing && server_open => {
                let n = r.unwrap_or(0);
                if n == 0 {
                    server_open = false;
                    let _ = cw.shutdown().await;
                    continue;
                }
                let mut chunk = &sbuf[..n];
                let mut exhausted = false;
                if let Some(left) = budget.as_mut() {
                    if chunk.len() >= *left {
                        chunk = &chunk[..*left];
                        exhausted = true;
                    }
                    *left -= chunk.len();
                }
                if !forward(&mut cw, chunk, current).await || exhausted {
                    let _ = cw.flush().await;
                    return reset(&cw, &sw);
                }
            }
        }
    }
}

/// Writes one chunk as the fault says; false when the peer is gone.
async fn forward(to: &mut OwnedWriteHalf, bytes: &[u8], fault: Fault) -> bool {
    match fault {
        Fault::Blackhole => true,
        Fault::Latency(d) => {
            tokio::time::sleep(d).await;
            to.write_all(bytes).await.is_ok()
        }
        _ => bytes.is_empty() || to.write_all(bytes).await.is_ok(),
    }
}

/// Close both sockets with RST: SO_LINGER 0, then the halves drop.
/// Returns true: the connection ends by a fault.
fn reset(client: &OwnedWriteHalf, server: &OwnedWriteHalf) -> bool {
    linger_zero(client.as_ref());
    linger_zero(server.as_ref());
    true
}

/// A connection accepted while the path was blackholed: swallow what arrives until the
/// fault changes to Reset or the client leaves. (Lifting the blackhole cannot reconnect it:
/// nothing it sent reached a server.)
async fn blackhole(client: TcpStream, mut fault: watch::Receiver<Fault>) -> bool {
    let (mut r, w) = client.into_split();
    let mut buf = vec![0u8; 16384];
    loop {
        tokio::select! {
            changed = fault.changed() => {
                if changed.is_err() {
                    return false;
                }
                let now = *fault.borrow();
                if now == Fault::Reset {
                    linger_zero(w.as_ref());
                    return true;
                }
            }
            n = r.read(&mut buf) => {
                if n.unwrap_or(0) == 0 {
                    return false;
                }
            }
        }
    }
}

/// SO_LINGER 0: the close that follows sends RST at once (and so never blocks).
fn linger_zero(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}
