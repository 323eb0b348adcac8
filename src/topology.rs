//! What pgmux knows about a database's hosts, independently of its pools: which one is the
//! primary, which are replicas, whether each answers, how far each replica is behind.
//!
//! One task per host keeps one monitoring connection (opened with pgmux's own server login,
//! reopened after any failure) and every `check_interval` asks the host, in one simple query,
//! whether it is in recovery and where its WAL stands. Results are folded into an immutable
//! [`Snapshot`] published through a `tokio::sync::watch` channel: readers clone an `Arc` and
//! never wait on a check. A host's checks never wait on another host's, so one hung server
//! cannot stall the view of the others.
//!
//! Roles come from the servers (`pg_is_in_recovery()`), not from the config, so a promotion is
//! followed without a reload: when the primary is gone and a former replica reports that it is
//! out of recovery, it is the primary.

use crate::auth::password::Secret;
use crate::protocol::messages::{self, parse_error_fields};
use crate::router::Lsn;
use crate::server::{ServerConn, ServerError, ServerTarget};
use bytes::{Buf, BytesMut};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

mod history;
use history::LsnHistory;

/// A host's role, as the host last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    /// Not known yet: the host never answered a check.
    Unknown,
}

/// One host to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    pub host: String,
    pub port: u16,
    /// The role the config gave it, if any. Only informative: the role in a [`Snapshot`] is
    /// what the host says.
    pub configured_role: Option<Role>,
}

/// Everything the monitor needs. The login is pgmux's usual server login, so any method
/// [`ServerConn::connect`] supports works.
#[derive(Debug, Clone)]
pub struct TopologyConfig {
    pub hosts: Vec<HostConfig>,
    pub dbname: String,
    pub user: String,
    pub secret: Option<Secret>,
    /// Time between the starts of two checks of a host.
    pub check_interval: Duration,
    /// How long a host that failed a check gets no traffic.
    pub ban_time: Duration,
    /// Bound on connecting and logging in, and separately on each check query.
    pub timeout: Duration,
}

/// One host as of its last check.
#[derive(Debug, Clone, PartialEq)]
pub struct HostState {
    pub host: String,
    pub port: u16,
    pub configured_role: Option<Role>,
    /// As last reported; kept while the host is down, so a returning host is recognised.
    pub role: Role,
    /// The last check succeeded.
    pub healthy: bool,
    /// Set when a check fails (or [`Topology::ban`] is called); the host should get no traffic
    /// before then, even if a later check succeeds.
    pub banned_until: Option<Instant>,
    /// Primary: `pg_current_wal_insert_lsn()`; replica: `pg_last_wal_replay_lsn()`.
    pub lsn: Option<Lsn>,
    /// Replica: `pg_last_wal_receive_lsn()`.
    pub receive_lsn: Option<Lsn>,
    /// Primary: its current timeline, which grows with each promotion.
    pub timeline: Option<u32>,
    /// Replica: the timeline its WAL receiver streams, while one runs and the check user may
    /// see it (`pg_stat_wal_receiver` shows it to superusers and `pg_read_all_stats`).
    pub receive_timeline: Option<u32>,
    /// Replica: streams a timeline older than the primary's, so it follows another server (an
    /// old primary back after a promotion) and its data may differ; it takes no reads.
    pub diverged: bool,
    /// When the last successful check started (a replica had replayed no further then).
    pub checked_at: Option<Instant>,
    /// Replica: WAL bytes between the primary's last reported position and this replica's
    /// replay position. `None` without a healthy primary or an LSN to compare.
    pub lag_bytes: Option<u64>,
    /// Replica: how long WAL it has not replayed has existed, at least. 0 once it has replayed
    /// everything the primary had; otherwise the larger of the age of its last replayed
    /// transaction (while WAL it received waits for replay) and the time since the primary's
    /// WAL first went past its position, as the monitor saw it ([`history`]). `None` when
    /// neither is known.
    pub lag_seconds: Option<f64>,
    /// Successful checks so far.
    pub checks: u64,
    /// Failed checks so far.
    pub failures: u64,
    /// Why the last check failed, when it did.
    pub last_error: Option<String>,
    /// The last check failed because the server refused the login itself (password, role,
    /// database, TLS), not because it was down or restarting: waiting for it will not help.
    pub refused: bool,
}

impl HostState {
    /// A host not checked yet: unknown role, unhealthy.
    pub fn for_config(c: &HostConfig) -> HostState {
        HostState::new(c)
    }

    fn new(c: &HostConfig) -> HostState {
        HostState {
            host: c.host.clone(),
            port: c.port,
            configured_role: c.configured_role,
            role: Role::Unknown,
            healthy: false,
            banned_until: None,
            lsn: None,
            receive_lsn: None,
            timeline: None,
            receive_timeline: None,
            diverged: false,
            checked_at: None,
            lag_bytes: None,
            lag_seconds: None,
            checks: 0,
            failures: 0,
            last_error: None,
            refused: false,
        }
    }

    pub fn is_banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|t| now < t)
    }

    /// Healthy and not banned: may be given traffic of its role.
    pub fn is_usable(&self, now: Instant) -> bool {
        self.healthy && !self.is_banned(now)
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// The view of all hosts at one moment. Host indexes follow [`TopologyConfig::hosts`].
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub hosts: Vec<HostState>,
    /// The host that takes writes: healthy and out of recovery. With two such hosts (an old
    /// primary restarted after a promotion), the one on the higher timeline.
    pub primary: Option<usize>,
    /// While there is no primary after there was one: when it went (a restart, a failover).
    pub primary_lost_at: Option<Instant>,
    /// Grows with each published snapshot.
    pub version: u64,
}

impl Snapshot {
    pub fn primary(&self) -> Option<&HostState> {
        self.primary.map(|i| &self.hosts[i])
    }

    /// Hosts last seen in recovery, with their indexes.
    pub fn replicas(&self) -> impl Iterator<Item = (usize, &HostState)> {
        self.hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.role == Role::Replica)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("health check timed out after {0:?}")]
    Timeout(Duration),
    #[error("health check query failed: {message} ({code})")]
    Query { code: String, message: String },
    #[error("health check answer not understood: {0}")]
    Answer(&'static str),
}

/// What one check found.
#[derive(Debug, Clone, PartialEq)]
struct Probe {
    in_recovery: bool,
    lsn: Option<Lsn>,
    receive_lsn: Option<Lsn>,
    replay_age: Option<f64>,
    timeline: Option<u32>,
    receive_timeline: Option<u32>,
    timeline_hidden: bool,
}

/// One round trip. The subquery with OFFSET 0 evaluates pg_is_in_recovery() once, so a
/// promotion between two calls cannot mix a replica's answer with a primary's; WAL functions
/// that fail on the other role are only called in their branch.
///
/// The primary's position is the WAL *insert* position, not the write position: with
/// `synchronous_commit = off` a committed transaction's record can sit in WAL buffers past the
/// write position, and read-your-writes needs a position at or after every commit that
/// completed before the check started.
const CHECK_SQL: &str = "SELECT r, \
     CASE WHEN r THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END, \
     CASE WHEN r THEN pg_last_wal_receive_lsn() END, \
     CASE WHEN r THEN extract(epoch from now() - pg_last_xact_replay_timestamp()) END, \
     CASE WHEN r THEN NULL ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END, \
     CASE WHEN r THEN (SELECT coalesce(received_tli, 0) FROM pg_stat_wal_receiver) END \
     FROM (SELECT pg_is_in_recovery() AS r OFFSET 0) s";

/// Largest message the check reads; its answer is a few dozen bytes.
const MAX_MESSAGE: usize = 64 * 1024;

/// Handle on a running monitor; clones share it. The host tasks stop once every handle (and
/// every receiver from [`subscribe`](Self::subscribe)) is dropped.
#[derive(Clone)]
pub struct Topology {
    shared: Arc<Shared>,
    rx: watch::Receiver<Arc<Snapshot>>,
}

struct Shared {
    config: TopologyConfig,
    /// The warning that replicas' timelines are hidden was logged.
    timeline_warned: std::sync::atomic::AtomicBool,
    /// The latest state; held only to fold one result in and publish, never across `.await`.
    state: Mutex<State>,
    tx: watch::Sender<Arc<Snapshot>>,
}

struct State {
    hosts: Vec<HostState>,
    primary: Option<usize>,
    primary_lost_at: Option<Instant>,
    /// Some host was primary once: a change from now on is a failover.
    had_primary: bool,
    version: u64,
    /// The current primary's WAL positions over time; cleared when the primary changes.
    history: LsnHistory,
}

impl Topology {
    /// Starts one monitoring task per host on the current tokio runtime. The first checks run
    /// at once; until a host answers it is `Unknown` and unhealthy.
    pub fn start(config: TopologyConfig) -> Topology {
        let topo = Topology::detached(config);
        for i in 0..topo.shared.config.hosts.len() {
            tokio::spawn(monitor_host(topo.shared.clone(), i));
        }
        topo
    }

    /// A monitor that checks nothing: every host stays unknown until `ban` or a test changes
    /// it. For unit tests of what reads snapshots, outside a runtime.
    pub fn detached(config: TopologyConfig) -> Topology {
        let hosts: Vec<HostState> = config.hosts.iter().map(HostState::new).collect();
        let initial = Arc::new(Snapshot {
            hosts: hosts.clone(),
            primary: None,
            primary_lost_at: None,
            version: 0,
        });
        let (tx, rx) = watch::channel(initial);
        let shared = Arc::new(Shared {
            config,
            timeline_warned: Default::default(),
            state: Mutex::new(State {
                hosts,
                primary: None,
                primary_lost_at: None,
                had_primary: false,
                version: 0,
                history: LsnHistory::default(),
            }),
            tx,
        });
        Topology { shared, rx }
    }

    /// The latest view.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }

    /// A receiver that is told about every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }

    /// Bans a host for `ban_time` from outside the monitor, e.g. after a pool failed to
    /// connect to it.
    pub fn ban(&self, host: usize, reason: &str) {
        let mut st = lock(&self.shared.state);
        let Some(h) = st.hosts.get_mut(host) else {
            return;
        };
        h.banned_until = Some(Instant::now() + self.shared.config.ban_time);
        h.last_error = Some(reason.to_string());
        tracing::warn!(host = %h.addr(), reason, "host banned");
        publish(&mut st, &self.shared.tx);
    }
}

/// A panic while the lock was held cannot leave `State` half-updated in a way that matters
/// (each field is replaced whole), so a poisoned lock is used as is.
fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn monitor_host(shared: Arc<Shared>, index: usize) {
    let cfg = &shared.config;
    let target = ServerTarget {
        host: cfg.hosts[index].host.clone(),
        port: cfg.hosts[index].port,
        dbname: cfg.dbname.clone(),
        user: cfg.user.clone(),
        secret: cfg.secret.clone(),
    };
    let mut conn: Option<ServerConn> = None;
    let mut ticker = tokio::time::interval(cfg.check_interval);
    // A check that overran its interval is followed by the next one after a full interval,
    // not by a burst.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.tx.closed() => break,
            _ = ticker.tick() => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            _ = shared.tx.closed() => break,
            r = check(&target, cfg.timeout, &mut conn) => r,
        };
        record(&shared, index, started, result);
    }
    if let Some(c) = conn {
        c.close();
    }
}

/// One check, on the kept connection when there is one. A kept connection may have died
/// quietly (server restart, idle timeout): then one fresh connection is tried before the host
/// is declared failed.
async fn check(
    target: &ServerTarget,
    timeout: Duration,
    conn: &mut Option<ServerConn>,
) -> Result<Probe, CheckError> {
    if let Some(mut c) = conn.take() {
        if let Ok(p) = probe(&mut c, timeout).await {
            *conn = Some(c);
            return Ok(p);
        }
    }
    let mut c = ServerConn::connect(target, timeout).await?;
    let p = probe(&mut c, timeout).await?;
    *conn = Some(c);
    Ok(p)
}

async fn probe(c: &mut ServerConn, timeout: Duration) -> Result<Probe, CheckError> {
    let row = tokio::time::timeout(timeout, query_one_row(c, CHECK_SQL))
        .await
        .map_err(|_| CheckError::Timeout(timeout))??;
    parse_probe(&row)
}

fn parse_probe(row: &[Option<String>]) -> Result<Probe, CheckError> {
    let [r, lsn, receive, age, timeline, receive_timeline] = row else {
        return Err(CheckError::Answer("expected 6 columns"));
    };
    let in_recovery = match r.as_deref() {
        Some("t") => true,
        Some("f") => false,
        _ => return Err(CheckError::Answer("pg_is_in_recovery() not a boolean")),
    };
    let lsn_of = |v: &Option<String>| -> Result<Option<Lsn>, CheckError> {
        v.as_deref()
            .map(|s| s.parse::<Lsn>())
            .transpose()
            .map_err(|_| CheckError::Answer("bad LSN"))
    };
    let replay_age = age
        .as_deref()
        .map(|s| s.parse::<f64>())
        .transpose()
        .map_err(|_| CheckError::Answer("bad replay age"))?;
    let timeline = timeline
        .as_deref()
        .map(|s| u32::from_str_radix(s, 16))
        .transpose()
        .map_err(|_| CheckError::Answer("bad timeline"))?;
    let receive_timeline = receive_timeline
        .as_deref()
        .map(|s| s.parse::<u32>())
        .transpose()
        .map_err(|_| CheckError::Answer("bad received timeline"))?;
    // a receiver runs but its timeline is hidden: the check user lacks pg_read_all_stats
    let timeline_hidden = receive_timeline == Some(0);
    let receive_timeline = receive_timeline.filter(|&t| t != 0);
    Ok(Probe {
        in_recovery,
        lsn: lsn_of(lsn)?,
        receive_lsn: lsn_of(receive)?,
        replay_age,
        timeline,
        receive_timeline,
        timeline_hidden,
    })
}

/// Runs a simple query and returns its first row as text (`None` for NULL). ServerConn's own
/// internal-query runner discards rows, hence this small reader.
async fn query_one_row(c: &mut ServerConn, sql: &str) -> Result<Vec<Option<String>>, CheckError> {
    let mut out = BytesMut::new();
    messages::query(&mut out, sql);
    c.stream.write_all(&out).await.map_err(ServerError::from)?;
    let mut buf = BytesMut::with_capacity(512);
    let mut row = None;
    let mut error = None;
    loop {
        let (tag, body) = read_message(c, &mut buf).await?;
        match tag {
            b'D' if row.is_none() => row = Some(parse_data_row(&body)?),
            b'E' if error.is_none() => error = Some(parse_error_fields(&body)),
            b'Z' => break,
            // RowDescription, CommandComplete, notices, ParameterStatus, notifications.
            _ => {}
        }
    }
    if let Some(e) = error {
        return Err(CheckError::Query {
            code: e.code,
            message: e.message,
        });
    }
    row.ok_or(CheckError::Answer("no row"))
}

async fn read_message(
    c: &mut ServerConn,
    buf: &mut BytesMut,
) -> Result<(u8, BytesMut), CheckError> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if !(4..=MAX_MESSAGE).contains(&len) {
                return Err(ServerError::Protocol("bad message length").into());
            }
            if buf.len() > len {
                let tag = buf[0];
                let mut msg = buf.split_to(len + 1);
                msg.advance(5);
                return Ok((tag, msg));
            }
        }
        buf.reserve(1024);
        let n = c.stream.read_buf(buf).await.map_err(ServerError::from)?;
        if n == 0 {
            return Err(ServerError::Io(std::io::ErrorKind::UnexpectedEof.into()).into());
        }
    }
}

fn parse_data_row(mut body: &[u8]) -> Result<Vec<Option<String>>, CheckError> {
    let short = CheckError::Answer("truncated DataRow");
    if body.len() < 2 {
        return Err(short);
    }
    let n = body.get_i16();
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if body.len() < 4 {
            return Err(short);
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(short);
        }
        row.push(Some(String::from_utf8_lossy(&body[..len]).into_owned()));
        body.advance(len);
    }
    Ok(row)
}

fn record(shared: &Shared, index: usize, started: Instant, result: Result<Probe, CheckError>) {
    let now = Instant::now();
    let mut st = lock(&shared.state);
    let h = &mut st.hosts[index];
    match result {
        Ok(p) => {
            if !h.healthy {
                tracing::info!(host = %h.addr(), in_recovery = p.in_recovery, "host answers checks");
            }
            h.healthy = true;
            h.role = if p.in_recovery {
                Role::Replica
            } else {
                Role::Primary
            };
            h.lsn = p.lsn;
            h.receive_lsn = p.receive_lsn;
            h.timeline = p.timeline;
            h.receive_timeline = p.receive_timeline;
            if p.timeline_hidden && !shared.timeline_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    host = %h.addr(),
                    "the host monitor's user cannot see replicas' timelines (pg_stat_wal_receiver needs pg_read_all_stats): a replica following an old primary after a promotion will not be detected"
                );
            }
            h.checked_at = Some(started);
            // Kept until derive() computes lag against the primary.
            h.lag_seconds = p.replay_age;
            h.checks += 1;
            h.last_error = None;
            h.refused = false;
        }
        Err(e) => {
            if h.healthy || h.failures == 0 {
                tracing::warn!(host = %h.addr(), error = %e, "host failed its check; banned");
            }
            h.healthy = false;
            h.failures += 1;
            h.banned_until = Some(now + shared.config.ban_time);
            h.last_error = Some(e.to_string());
            h.refused = matches!(&e, CheckError::Server(se)
                if !se.is_transient() && !matches!(se, ServerError::ConnectTimeout(_)));
        }
    }
    publish(&mut st, &shared.tx);
}

/// Recomputes what depends on several hosts (the primary, lag) and publishes a new snapshot.
/// Called with the state locked; `send_replace` does not wait.
fn publish(st: &mut State, tx: &watch::Sender<Arc<Snapshot>>) {
    let primary = choose_primary(&st.hosts, st.primary);
    if primary != st.primary {
        let addr = primary.map(|i| st.hosts[i].addr());
        if !st.had_primary {
            // the first finding at start is news, not a failover
            tracing::info!(primary = ?addr, "primary found");
        } else {
            tracing::warn!(primary = ?addr, "primary changed");
        }
        if primary.is_none() && st.had_primary {
            st.primary_lost_at = Some(Instant::now());
        }
        st.had_primary |= primary.is_some();
        st.history.clear();
    }
    if primary.is_some() {
        st.primary_lost_at = None;
    }
    st.primary = primary;
    // Stamped now, not when the check started: the primary had this WAL by the time its
    // answer arrived, maybe not before, and a later stamp keeps lags a lower bound.
    if let Some(lsn) = primary.and_then(|p| st.hosts[p].lsn) {
        st.history.push(Instant::now(), lsn);
    }
    st.version += 1;
    let mut hosts = st.hosts.clone();
    derive_lag(&mut hosts, primary, &st.history);
    tx.send_replace(Arc::new(Snapshot {
        hosts,
        primary,
        primary_lost_at: st.primary_lost_at,
        version: st.version,
    }));
}

/// The healthy host out of recovery; among several, the highest timeline (the latest
/// promotion), then the current primary, then the first in config order.
fn choose_primary(hosts: &[HostState], current: Option<usize>) -> Option<usize> {
    let candidates = || {
        hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.healthy && h.role == Role::Primary)
    };
    let best_timeline = candidates().map(|(_, h)| h.timeline.unwrap_or(0)).max()?;
    let on_best = |i: usize| hosts[i].timeline.unwrap_or(0) == best_timeline;
    if let Some(c) = current {
        if hosts[c].healthy && hosts[c].role == Role::Primary && on_best(c) {
            return Some(c);
        }
    }
    candidates().map(|(i, _)| i).find(|&i| on_best(i))
}

/// Fills in lag for replicas from the raw replay figures (`lag_seconds` holds the raw replay
/// age on entry) and the primary's WAL history, and marks replicas on an older timeline.
fn derive_lag(hosts: &mut [HostState], primary: Option<usize>, history: &LsnHistory) {
    let primary_lsn = primary.and_then(|p| hosts[p].lsn);
    let primary_timeline = primary.and_then(|p| hosts[p].timeline);
    for (i, h) in hosts.iter_mut().enumerate() {
        h.diverged = false;
        if h.role != Role::Replica || !h.healthy {
            let primary_now = h.role == Role::Primary && h.healthy;
            // a second host out of recovery (an old primary back after a promotion) is
            // not the primary pgmux uses, and its data may differ from it
            h.diverged = primary_now && primary != Some(i);
            let current = primary_now && !h.diverged;
            h.lag_bytes = current.then_some(0);
            h.lag_seconds = current.then_some(0.0);
            continue;
        }
        h.diverged = matches!((h.receive_timeline, primary_timeline), (Some(r), Some(p)) if r < p);
        if h.diverged {
            h.lag_bytes = None;
            h.lag_seconds = None;
            continue;
        }
        h.lag_bytes = primary_lsn.zip(h.lsn).map(|(p, r)| p.bytes_since(r));
        h.lag_seconds = match h.lsn {
            None => h.lag_seconds.map(|s| s.max(0.0)),
            Some(r) if primary_lsn.is_some_and(|p| r >= p) => Some(0.0),
            Some(r) => replica_lag_seconds(h, r, history),
        };
    }
}

/// Time lag of a replica at replay position `r` that may be behind the primary.
fn replica_lag_seconds(h: &HostState, r: Lsn, history: &LsnHistory) -> Option<f64> {
    let seen_behind = history
        .behind_since(r)
        .zip(h.checked_at)
        .map(|(since, at)| at.saturating_duration_since(since).as_secs_f64());
    // Received WAL waiting for replay: the last replayed transaction's age counts. Everything
    // received is replayed: the age is that of a quiet primary or of a replica cut off from
    // its upstream, and only the primary's history can tell which.
    // (Nothing received by streaming, as when restoring from an archive: the age counts.)
    let replaying = h.receive_lsn.is_none_or(|received| r < received);
    let replay_age = replaying
        .then_some(h.lag_seconds)
        .flatten()
        .map(|s| s.max(0.0));
    match (seen_behind, replay_age) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (Some(a), None) => Some(a),
        (None, b) if replaying => b,
        // nothing to compare with, nothing pending: no lag known to exist
        (None, _) => Some(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(role: Role, healthy: bool, lsn: u64) -> HostState {
        let mut h = HostState::new(&HostConfig {
            host: "h".into(),
            port: 1,
            configured_role: None,
        });
        h.role = role;
        h.healthy = healthy;
        h.lsn = Some(Lsn(lsn));
        h
    }

    #[test]
    fn primary_is_the_healthy_host_out_of_recovery() {
        let mut hosts = vec![
            host(Role::Primary, false, 0),
            host(Role::Replica, true, 0),
            host(Role::Primary, true, 0),
        ];
        assert_eq!(choose_primary(&hosts, Some(0)), Some(2));
        hosts[2].healthy = false;
        assert_eq!(choose_primary(&hosts, Some(2)), None);
    }

    #[test]
    fn a_later_timeline_wins_over_the_old_primary() {
        let mut hosts = vec![host(Role::Primary, true, 0), host(Role::Primary, true, 0)];
        hosts[0].timeline = Some(1);
        hosts[1].timeline = Some(2);
        assert_eq!(choose_primary(&hosts, Some(0)), Some(1));
        // Same timeline: the current one stays (no flapping), else config order.
        hosts[0].timeline = Some(2);
        assert_eq!(choose_primary(&hosts, Some(1)), Some(1));
        assert_eq!(choose_primary(&hosts, None), Some(0));
    }

    #[test]
    fn lag_is_measured_against_the_primary_and_idle_replicas_have_none() {
        let mut hosts = vec![
            host(Role::Primary, true, 1000),
            host(Role::Replica, true, 400),
            host(Role::Replica, true, 1000),
            host(Role::Replica, false, 0),
        ];
        // Replica 1 received more than it replayed: its replay age counts.
        hosts[1].receive_lsn = Some(Lsn(900));
        hosts[1].lag_seconds = Some(7.5);
        // Replica 2 has everything; an old replay timestamp is no lag.
        hosts[2].receive_lsn = Some(Lsn(1000));
        hosts[2].lag_seconds = Some(300.0);
        let none = LsnHistory::default();
        derive_lag(&mut hosts, Some(0), &none);
        assert_eq!(hosts[0].lag_bytes, Some(0));
        assert_eq!(hosts[1].lag_bytes, Some(600));
        assert_eq!(hosts[1].lag_seconds, Some(7.5));
        assert_eq!(hosts[2].lag_bytes, Some(0));
        assert_eq!(hosts[2].lag_seconds, Some(0.0));
        assert_eq!(hosts[3].lag_bytes, None);
        assert_eq!(hosts[3].lag_seconds, None);

        // Without a primary there is nothing to measure bytes against.
        let mut hosts = vec![host(Role::Replica, true, 400)];
        hosts[0].lag_seconds = Some(2.0);
        derive_lag(&mut hosts, None, &none);
        assert_eq!(hosts[0].lag_bytes, None);
        assert_eq!(hosts[0].lag_seconds, Some(2.0));
    }

    #[test]
    fn a_replica_that_stopped_receiving_lags_from_when_the_primary_moved_past_it() {
        let t0 = Instant::now();
        let mut history = LsnHistory::default();
        history.push(t0, Lsn(300));
        history.push(t0 + Duration::from_secs(2), Lsn(1000));
        let mut hosts = vec![
            host(Role::Primary, true, 1000),
            host(Role::Replica, true, 400),
        ];
        // Replayed all it received, with an old last transaction: its own figures say nothing.
        hosts[1].receive_lsn = Some(Lsn(400));
        hosts[1].lag_seconds = Some(9.0);
        hosts[1].checked_at = Some(t0 + Duration::from_secs(7));
        derive_lag(&mut hosts, Some(0), &history);
        assert_eq!(hosts[1].lag_bytes, Some(600));
        // WAL past 400 has existed since t0+2s, and at t0+7s it was not replayed.
        assert_eq!(hosts[1].lag_seconds, Some(5.0));
        // Received WAL waiting for replay: the larger figure counts.
        hosts[1].receive_lsn = Some(Lsn(900));
        hosts[1].lag_seconds = Some(9.0);
        derive_lag(&mut hosts, Some(0), &history);
        assert_eq!(hosts[1].lag_seconds, Some(9.0));
        // Unknown replay age (nothing replayed since start) no longer means unknown lag.
        hosts[1].lag_seconds = None;
        derive_lag(&mut hosts, Some(0), &history);
        assert_eq!(hosts[1].lag_seconds, Some(5.0));
        // Without history, a replica that replayed all it received shows no time lag.
        hosts[1].receive_lsn = Some(Lsn(400));
        derive_lag(&mut hosts, Some(0), &LsnHistory::default());
        assert_eq!(hosts[1].lag_seconds, Some(0.0));
    }

    #[test]
    fn a_second_primary_that_is_not_used_has_diverged() {
        let mut hosts = vec![
            host(Role::Primary, true, 1000),
            host(Role::Primary, true, 2000),
            host(Role::Replica, true, 2000),
        ];
        derive_lag(&mut hosts, Some(1), &LsnHistory::default());
        assert!(hosts[0].diverged);
        assert_eq!((hosts[0].lag_bytes, hosts[0].lag_seconds), (None, None));
        assert!(!hosts[1].diverged);
        assert_eq!(hosts[1].lag_bytes, Some(0));
        assert!(!hosts[2].diverged);
    }

    #[test]
    fn a_replica_streaming_an_older_timeline_has_diverged() {
        let mut hosts = vec![
            host(Role::Primary, true, 1000),
            host(Role::Replica, true, 2000),
            host(Role::Replica, true, 1000),
        ];
        hosts[0].timeline = Some(2);
        hosts[1].receive_timeline = Some(1);
        hosts[2].receive_timeline = Some(2);
        derive_lag(&mut hosts, Some(0), &LsnHistory::default());
        assert!(hosts[1].diverged);
        assert_eq!((hosts[1].lag_bytes, hosts[1].lag_seconds), (None, None));
        assert!(!hosts[2].diverged);
        assert_eq!(hosts[2].lag_seconds, Some(0.0));
    }

    #[test]
    fn probe_rows_parse() {
        let s = |v: &str| Some(v.to_string());
        let p = parse_probe(&[s("f"), s("0/3000148"), None, None, s("00000002"), None]).unwrap();
        assert!(!p.in_recovery);
        assert_eq!(p.lsn, Some(Lsn(0x3000148)));
        assert_eq!(p.timeline, Some(2));
        let p = parse_probe(&[s("t"), s("0/10"), s("0/20"), s("1.25"), None, s("3")]).unwrap();
        assert!(p.in_recovery);
        assert_eq!(p.receive_timeline, Some(3));
        assert!(!p.timeline_hidden);
        // a receiver whose details the check user may not see
        let hidden = parse_probe(&[s("t"), s("0/10"), s("0/20"), None, None, s("0")]).unwrap();
        assert_eq!(hidden.receive_timeline, None);
        assert!(hidden.timeline_hidden);
        assert_eq!(p.receive_lsn, Some(Lsn(0x20)));
        assert_eq!(p.replay_age, Some(1.25));
        assert!(parse_probe(&[s("x"), None, None, None, None, None]).is_err());
        assert!(parse_probe(&[s("t")]).is_err());
        assert!(parse_probe(&[s("t"), s("zz"), None, None, None, None]).is_err());
    }

    #[test]
    fn data_rows_parse_and_truncation_is_an_error() {
        let mut body = Vec::new();
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert_eq!(
            parse_data_row(&body).unwrap(),
            vec![None, Some("abc".to_string())]
        );
        for cut in 0..body.len() {
            assert!(parse_data_row(&body[..cut]).is_err(), "cut at {cut}");
        }
    }
}
