//! Accepting clients: the listening sockets (TCP, and the Unix socket in `unix_socket_dir`),
//! the max_client_conn count, and the stop of accepting at shutdown.

use crate::app::{App, Shutdown};
use crate::client;
use crate::endpoint::{ClientAddr, ClientSocket};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
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

/// A listening socket of either kind.
pub enum Listener {
    Tcp(TcpListener),
    /// With the port its clients are shown with, and its file, removed when dropped.
    Unix(UnixListener, u16, SocketFile),
}

impl Listener {
    async fn accept(&self) -> io::Result<(ClientSocket, ClientAddr)> {
        match self {
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                Ok((ClientSocket::Tcp(s), ClientAddr::from(a)))
            }
            Listener::Unix(l, port, _) => {
                let (s, _) = l.accept().await?;
                Ok((ClientSocket::Unix(s), ClientAddr::Unix(*port)))
            }
        }
    }
}

/// A Unix socket's file, removed when pgmux stops listening on it.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds `<dir>/.s.PGSQL.<port>` with permissions `mode`. A file left there by a process that
/// is gone is replaced; one another process still accepts on is not (PgBouncer does the same).
pub fn bind_unix(dir: &str, port: u16, mode: u32) -> io::Result<Listener> {
    let path = crate::endpoint::socket_path(dir, port);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let l = UnixListener::bind(&path)?;
    let file = SocketFile(path);
    std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(mode))?;
    Ok(Listener::Unix(l, port, file))
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.0
    }
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
pub async fn run(app: Arc<App>, listener: Listener) {
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

fn spawn_client(app: &Arc<App>, stream: ClientSocket, peer: ClientAddr) {
    let n = app.clients.fetch_add(1, Ordering::AcqRel) + 1;
    let over_limit = n > app.config().pgmux.max_client_conn as usize;
    let slot = ClientSlot(app.clone());
    tokio::spawn(client::serve(app.clone(), stream, peer, over_limit, slot));
}
