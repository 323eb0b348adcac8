//! Cancel keys: each client gets pgmux's own BackendKeyData, and a CancelRequest carrying it
//! is sent on to whichever server connection serves that client at that moment.

use bytes::{BufMut, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;

/// Where a client's query runs right now.
#[derive(Debug, Clone, Copy)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// A registered client's key and current target.
#[derive(Debug)]
pub struct CancelHandle {
    pub pid: i32,
    pub secret: i32,
    target: Mutex<Option<CancelTarget>>,
}

impl CancelHandle {
    pub fn set_target(&self, t: Option<CancelTarget>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    fn target(&self) -> Option<CancelTarget> {
        *self.target.lock().unwrap_or_else(|e| e.into_inner())
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

    /// The target for a key, if the key is valid and its client is running a query.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let h = self
            .by_pid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pid)
            .cloned()?;
        // constant-time compare so a guessed key learns nothing from timing
        let ok = (h.secret ^ secret) == 0;
        if ok {
            h.target()
        } else {
            None
        }
    }
}

/// Sends a CancelRequest to a server; errors are only worth a log line.
pub async fn send_cancel(t: CancelTarget) -> std::io::Result<()> {
    let mut s = tokio::net::TcpStream::connect(t.addr).await?;
    let mut b = BytesMut::with_capacity(16);
    b.put_i32(16);
    b.put_i32(80877102);
    b.put_i32(t.pid);
    b.put_i32(t.secret);
    s.write_all(&b).await?;
    s.shutdown().await
}
