//! Accepting clients: the listening socket, the max_client_conn count, and the stop of
//! accepting at shutdown.

use crate::app::{App, Shutdown};
use crate::client;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::warn;

/// Binds the listening socket; `reuse_port` lets a new process share the port while an old
/// one drains.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Counts a client from accept to the end of its task.
struct ClientSlot(Arc<App>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if self.0.clients.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.no_clients.notify_waiters();
        }
    }
}

/// Accepts until shutdown begins, then takes in what already waits in the backlog (closing
/// the socket would reset those connections) and stops.
pub async fn run(app: Arc<App>, listener: TcpListener) {
    let mut shutdown = app.shutdown_signal();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => spawn_client(&app, stream, peer),
                Err(e) => {
                    // out of file descriptors and the like: back off instead of spinning
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() != Shutdown::Running {
                    break;
                }
            }
        }
    }
    while let Ok(Ok((stream, peer))) = tokio::time::timeout(Duration::ZERO, listener.accept()).await
    {
        spawn_client(&app, stream, peer);
    }
}

fn spawn_client(app: &Arc<App>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let n = app.clients.fetch_add(1, Ordering::AcqRel) + 1;
    let over_limit = n > app.config().pgmux.max_client_conn as usize;
    let slot = ClientSlot(app.clone());
    tokio::spawn(client::serve(app.clone(), stream, peer, over_limit, slot));
}
