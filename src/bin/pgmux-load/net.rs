//! Client sockets: resolving the endpoint, TCP connect from an optional source address (bind
//! before connect, the port picked at connect time), PostgreSQL startup over that socket, and
//! the process's open-file limit.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use tokio::net::{TcpSocket, TcpStream};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Config, Connection, NoTls};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("source address {0} is not of the endpoint's address family")]
    Family(IpAddr),
    #[error("socket: {0}")]
    Socket(std::io::Error),
    #[error("bind to {0}: {1}")]
    Bind(IpAddr, std::io::Error),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("open-file limit: {0}")]
    Limit(std::io::Error),
}

/// Where and as whom every connection logs in.
pub struct Target {
    pub addr: SocketAddr,
    pub config: Config,
}

impl Target {
    pub async fn resolve(
        host: &str,
        port: u16,
        user: &str,
        password: Option<&str>,
        dbname: &str,
    ) -> Result<Target, NetError> {
        let name = format!("{host}:{port}");
        let addr = tokio::net::lookup_host(&name)
            .await
            .map_err(|e| NetError::Resolve(name.clone(), e))?
            .next()
            .ok_or_else(|| NetError::NoAddress(name.clone()))?;
        let mut config = Config::new();
        config
            .user(user)
            .dbname(dbname)
            .application_name("pgmux-load");
        if let Some(pw) = password {
            config.password(pw);
        }
        Ok(Target { addr, config })
    }

    /// TCP connect (from `source` when given) and log in.
    pub async fn connect(
        &self,
        source: Option<IpAddr>,
    ) -> Result<(Client, Connection<TcpStream, NoTlsStream>), NetError> {
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(NetError::Socket)?;
        if let Some(ip) = source {
            if ip.is_ipv4() != self.addr.is_ipv4() {
                return Err(NetError::Family(ip));
            }
            // Without this, bind() reserves a port for every destination at once; with it the
            // port is chosen at connect() by the full 4-tuple.
            if ip.is_ipv4() {
                set_bind_address_no_port(&socket).map_err(NetError::Socket)?;
            }
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| NetError::Bind(ip, e))?;
        }
        let stream = socket.connect(self.addr).await.map_err(NetError::Connect)?;
        stream.set_nodelay(true).map_err(NetError::Socket)?;
        Ok(self.config.connect_raw(stream, NoTls).await?)
    }
}

impl Target {
    /// Asks the server to cancel what `token`'s connection is running (a CancelRequest on a
    /// new connection, as libpq sends it).
    pub async fn cancel(&self, token: &tokio_postgres::CancelToken) -> Result<(), NetError> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(NetError::Connect)?;
        Ok(token.cancel_query_raw(stream, NoTls).await?)
    }
}

fn set_bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Raises the soft open-file limit to the hard one; returns the limit now in force.
pub fn raise_nofile_limit() -> Result<u64, NetError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(NetError::Limit(std::io::Error::last_os_error()));
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Ok(lim.rlim_cur)
}
