//! TCP keepalive and user timeout on client and server sockets, PgBouncer's `tcp_keepalive`,
//! `tcp_keepidle`, `tcp_keepintvl`, `tcp_keepcnt` and `tcp_user_timeout`: the kernel then
//! notices a peer that vanished without FIN or RST (a crashed host, a dropped route) and the
//! socket fails instead of waiting forever. The options are process-wide, set from the
//! configuration at start and on reload, and applied to each socket as it is opened.

use crate::config::General;
use socket2::{SockRef, TcpKeepalive};
use std::sync::RwLock;
use std::time::Duration;
use tokio::net::TcpStream;

/// The socket options of the configuration; `None` leaves the operating system's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    pub keepalive: bool,
    pub keepidle: Option<Duration>,
    pub keepintvl: Option<Duration>,
    pub keepcnt: Option<u32>,
    pub user_timeout: Option<Duration>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            keepalive: true,
            keepidle: None,
            keepintvl: None,
            keepcnt: None,
            user_timeout: None,
        }
    }
}

impl TcpOptions {
    pub fn from_config(g: &General) -> TcpOptions {
        let secs = |s: u32| (s > 0).then(|| Duration::from_secs(s.into()));
        TcpOptions {
            keepalive: g.tcp_keepalive,
            keepidle: secs(g.tcp_keepidle),
            keepintvl: secs(g.tcp_keepintvl),
            keepcnt: (g.tcp_keepcnt > 0).then_some(g.tcp_keepcnt),
            user_timeout: (g.tcp_user_timeout > 0)
                .then(|| Duration::from_millis(g.tcp_user_timeout.into())),
        }
    }

    /// Sets the options on one socket.
    pub fn apply(&self, s: &TcpStream) -> std::io::Result<()> {
        let sock = SockRef::from(s);
        if self.keepalive {
            let mut ka = TcpKeepalive::new();
            if let Some(t) = self.keepidle {
                ka = ka.with_time(t);
            }
            if let Some(t) = self.keepintvl {
                ka = ka.with_interval(t);
            }
            if let Some(n) = self.keepcnt {
                ka = ka.with_retries(n);
            }
            sock.set_tcp_keepalive(&ka)?;
        } else {
            sock.set_keepalive(false)?;
        }
        if let Some(t) = self.user_timeout {
            sock.set_tcp_user_timeout(Some(t))?;
        }
        Ok(())
    }
}

static CURRENT: RwLock<TcpOptions> = RwLock::new(TcpOptions {
    keepalive: true,
    keepidle: None,
    keepintvl: None,
    keepcnt: None,
    user_timeout: None,
});

/// The options for sockets opened from now on (start, reload).
pub fn configure(opts: TcpOptions) {
    *CURRENT.write().unwrap_or_else(|e| e.into_inner()) = opts;
}

/// Applies the current options to a new socket; a failure is only worth a log line.
pub fn apply(s: &TcpStream) {
    let opts = *CURRENT.read().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = opts.apply(s) {
        tracing::debug!("setting TCP keepalive options failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn options_reach_the_socket() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let opts = TcpOptions {
            keepalive: true,
            keepidle: Some(Duration::from_secs(7)),
            keepintvl: Some(Duration::from_secs(3)),
            keepcnt: Some(4),
            user_timeout: Some(Duration::from_millis(2500)),
        };
        opts.apply(&s).unwrap();
        let r = SockRef::from(&s);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(r.keepalive_interval().unwrap(), Duration::from_secs(3));
        assert_eq!(r.keepalive_retries().unwrap(), 4);
        assert_eq!(
            r.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(2500))
        );
        TcpOptions {
            keepalive: false,
            ..TcpOptions::default()
        }
        .apply(&s)
        .unwrap();
        assert!(!r.keepalive().unwrap());
    }
}
