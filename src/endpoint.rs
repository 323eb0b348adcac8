//! Where connections go and come from: a server is reached over TCP, or over PostgreSQL's
//! Unix-domain socket when its host is a directory (`host = "/var/run/postgresql"`, as libpq
//! and PgBouncer read it: the socket is `<dir>/.s.PGSQL.<port>`); a client comes over TCP or
//! over pgmux's own socket in `unix_socket_dir`. On one machine a socket skips the TCP stack,
//! which is most of a proxy's CPU per transaction (docs/performance.md).

use crate::tls::ServerStream;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::{TcpStream, UnixStream};

/// True when `host` names a socket directory rather than a host name or address.
pub fn is_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

/// PostgreSQL's socket file for `port` in directory `dir`.
pub fn socket_path(dir: &str, port: u16) -> PathBuf {
    Path::new(dir).join(format!(".s.PGSQL.{port}"))
}

/// A server connection's far end as SHOW SERVERS and the logs show it (PgBouncer shows a
/// Unix-socket peer as address `unix` with the port it was reached by). Copy: it is handed
/// to each client's statistics on every server attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    Unix { port: u16 },
}

impl ServerAddr {
    /// The address column: an IP address, or `unix`.
    pub fn host(&self) -> String {
        match self {
            ServerAddr::Tcp(a) => a.ip().to_string(),
            ServerAddr::Unix { .. } => "unix".into(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            ServerAddr::Tcp(a) => a.port(),
            ServerAddr::Unix { port } => *port,
        }
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Tcp(a) => a.fmt(f),
            ServerAddr::Unix { port } => write!(f, "unix:{port}"),
        }
    }
}

/// A client's address. A Unix-socket client has none: it shows as `unix` with the port
/// whose socket it came through, as PgBouncer shows it. 20 bytes where a SocketAddr takes 32:
/// every client keeps one in its registry entry and one in its log tag (an IPv6 flow and
/// scope are not shown anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    V4(Ipv4Addr, u16),
    V6(Ipv6Addr, u16),
    Unix(u16),
}

impl ClientAddr {
    /// The IP address, for host-based rules; None for a Unix-socket client.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            ClientAddr::V4(ip, _) => Some(IpAddr::V4(*ip)),
            ClientAddr::V6(ip, _) => Some(IpAddr::V6(*ip)),
            ClientAddr::Unix(_) => None,
        }
    }

    /// The address column: an IP address, or `unix`.
    pub fn host(&self) -> String {
        self.ip().map_or_else(|| "unix".into(), |ip| ip.to_string())
    }

    pub fn port(&self) -> u16 {
        match self {
            ClientAddr::V4(_, p) | ClientAddr::V6(_, p) | ClientAddr::Unix(p) => *p,
        }
    }
}

impl From<SocketAddr> for ClientAddr {
    fn from(a: SocketAddr) -> Self {
        match a {
            SocketAddr::V4(a) => ClientAddr::V4(*a.ip(), a.port()),
            SocketAddr::V6(a) => ClientAddr::V6(*a.ip(), a.port()),
        }
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip() {
            Some(ip) => SocketAddr::new(ip, self.port()).fmt(f),
            None => write!(f, "unix:{}", self.port()),
        }
    }
}

/// An accepted client socket, before encryption is settled.
pub enum ClientSocket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// How to reach a connected server again, for a cancel: the address it answered on, or its
/// socket file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dial {
    Tcp(SocketAddr),
    Unix(Arc<Path>),
}

impl Dial {
    /// A plain connection to the same server (a cancel request needs no login).
    pub async fn connect(&self) -> io::Result<TcpOrUnix> {
        Ok(match self {
            Dial::Tcp(a) => TcpOrUnix::Tcp(TcpStream::connect(a).await?),
            Dial::Unix(p) => TcpOrUnix::Unix(UnixStream::connect(p).await?),
        })
    }
}

impl fmt::Display for Dial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dial::Tcp(a) => a.fmt(f),
            Dial::Unix(p) => p.display().fmt(f),
        }
    }
}

/// A freshly opened server socket, before any TLS.
pub enum TcpOrUnix {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Opens a socket to `host` and `port`: TCP with the process's keepalive options and
/// TCP_NODELAY, or the Unix socket when `host` is a directory. Returns how to reach the same
/// server again and how to show it.
pub async fn open(host: &str, port: u16) -> io::Result<(TcpOrUnix, ServerAddr, Dial)> {
    if is_socket_dir(host) {
        let path: Arc<Path> = socket_path(host, port).into();
        let s = UnixStream::connect(&path).await?;
        return Ok((
            TcpOrUnix::Unix(s),
            ServerAddr::Unix { port },
            Dial::Unix(path),
        ));
    }
    let s = TcpStream::connect((host, port)).await?;
    s.set_nodelay(true)?;
    crate::sockopts::apply(&s);
    let addr = s.peer_addr()?;
    Ok((TcpOrUnix::Tcp(s), ServerAddr::Tcp(addr), Dial::Tcp(addr)))
}

impl TcpOrUnix {
    /// The stream without TLS; a Unix socket never gets TLS (libpq does not use it there).
    pub fn plain(self) -> ServerStream {
        match self {
            TcpOrUnix::Tcp(s) => ServerStream::Plain(s),
            TcpOrUnix::Unix(s) => ServerStream::Unix(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_sockets_and_names_are_not() {
        assert!(is_socket_dir("/var/run/postgresql"));
        assert!(!is_socket_dir("localhost"));
        assert!(!is_socket_dir("127.0.0.1"));
        assert!(!is_socket_dir("::1"));
        assert_eq!(
            socket_path("/tmp", 5432),
            PathBuf::from("/tmp/.s.PGSQL.5432")
        );
    }

    #[test]
    fn a_socket_peer_shows_as_unix_with_its_port() {
        let a = ServerAddr::Unix { port: 5433 };
        assert_eq!(
            (a.host(), a.port(), a.to_string()),
            ("unix".into(), 5433, "unix:5433".into())
        );
        let t = ServerAddr::Tcp("127.0.0.1:5432".parse().unwrap());
        assert_eq!((t.host(), t.port()), ("127.0.0.1".into(), 5432));
    }

    #[test]
    fn a_client_address_is_small_and_shows_as_before() {
        assert!(std::mem::size_of::<ClientAddr>() <= 20);
        for a in ["127.0.0.1:5432", "[::1]:6432"] {
            let s: SocketAddr = a.parse().unwrap();
            let c = ClientAddr::from(s);
            assert_eq!(
                (c.to_string(), c.ip(), c.port()),
                (a.into(), Some(s.ip()), s.port())
            );
        }
        let u = ClientAddr::Unix(6432);
        assert_eq!(
            (u.to_string(), u.host(), u.ip()),
            ("unix:6432".into(), "unix".into(), None)
        );
    }

    #[tokio::test]
    async fn a_directory_host_connects_to_its_socket_file() {
        let dir = std::env::temp_dir().join(format!("pgmux-endpoint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir_s = dir.to_str().unwrap().to_string();
        let l = tokio::net::UnixListener::bind(socket_path(&dir_s, 7)).unwrap();
        let (s, addr, dial) = open(&dir_s, 7).await.unwrap();
        assert!(matches!(s, TcpOrUnix::Unix(_)));
        assert_eq!(addr, ServerAddr::Unix { port: 7 });
        l.accept().await.unwrap();
        assert!(dial.connect().await.is_ok(), "the same socket again");
        l.accept().await.unwrap();
        drop(l);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
