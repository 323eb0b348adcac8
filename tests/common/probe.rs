//! Looking at a running pgmux from outside, for tests that must show it came back to where it
//! was: its pools through the admin console (SHOW POOLS), its open file descriptors and its
//! resident memory through /proc, and its metrics over HTTP.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::pgmux::Pgmux;
use super::util::wait_until_async;

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size of a process in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The most resident memory a process has had so far, in KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A logged-in admin console session (`dbname=pgmux`).
pub struct Console {
    pub client: Client,
}

impl Console {
    pub async fn connect(px: &Pgmux, user: &str, password: Option<&str>) -> Console {
        let (client, conn) = tokio_postgres::connect(&px.conn_str(user, "pgmux", password), NoTls)
            .await
            .unwrap_or_else(|e| panic!("admin console login as {user}: {e}"));
        tokio::spawn(conn);
        Console { client }
    }

    /// Rows of a SHOW command as column -> text maps.
    pub async fn show(&self, what: &str) -> Vec<HashMap<String, String>> {
        let msgs = self
            .client
            .simple_query(what)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        msgs.into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(
                    r.columns()
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (c.name().to_string(), r.get(i).unwrap_or("").to_string()))
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    }

    /// SHOW POOLS' row for `db`, numbers only (pool_mode dropped); None while no pool exists.
    /// A database with replicas has one row per host: this is the first.
    pub async fn pool(&self, db: &str) -> Option<HashMap<String, i64>> {
        self.pools(db).await.into_iter().next()
    }

    /// SHOW POOLS' rows for `db` (one per host for a database with replicas), numbers only.
    pub async fn pools(&self, db: &str) -> Vec<HashMap<String, i64>> {
        self.show("SHOW POOLS")
            .await
            .into_iter()
            .filter(|r| r.get("database").map(String::as_str) == Some(db))
            .map(|r| {
                r.into_iter()
                    .filter_map(|(k, v)| v.parse().ok().map(|n| (k, n)))
                    .collect()
            })
            .collect()
    }

    /// Waits until `db`'s pool is at rest (each host's, for a database with replicas, whose
    /// rows share the clients: counted once): `clients` clients connected and none waiting, no
    /// server lent, logging in or held for a cancel. Returns the (first) pool row; panics with
    /// the last rows after 30 s.
    pub async fn wait_idle(&self, db: &str, clients: i64) -> HashMap<String, i64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rows = self.pools(db).await;
            let at_rest = |r: &HashMap<String, i64>| {
                r["cl_waiting"] == 0
                    && r["sv_active"] == 0
                    && r["sv_login"] == 0
                    && r["sv_being_canceled"] == 0
            };
            let connected: i64 = rows.iter().map(|r| r["cl_active"]).sum();
            if !rows.is_empty() && connected == clients && rows.iter().all(at_rest) {
                return rows.into_iter().next().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "pool {db} not idle with {clients} clients after 30 s: {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes the idle servers of `db` and waits until the pool holds none, so fd counts
    /// taken before and after compare like with like.
    pub async fn empty_pool(&self, db: &str) {
        self.client
            .simple_query(&format!("RECONNECT {db}"))
            .await
            .expect("RECONNECT");
        wait_until_async(
            &format!("pool {db} without servers"),
            Duration::from_secs(30),
            || async {
                self.pools(db).await.iter().all(|r| {
                    r["sv_idle"] == 0
                        && r["sv_active"] == 0
                        && r["sv_login"] == 0
                        && r["sv_being_canceled"] == 0
                })
            },
        )
        .await;
    }
}

/// Waits until pgmux holds no more than `baseline` fds (sockets close asynchronously, and
/// the baseline itself may have included one still closing); panics after 30 s.
pub async fn wait_fds(pid: u32, baseline: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = fd_count(pid);
        if now <= baseline {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pgmux holds {now} fds, {baseline} before"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The body of an HTTP GET, and its status code.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {resp}"));
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

pub fn scrape(port: u16) -> String {
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Sum of the samples of `name` whose labels include all of `labels` (0 when none).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.find('{') {
                Some(i) => (&series[..i], &series[i..]),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}
