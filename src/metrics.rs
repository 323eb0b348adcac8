//! Prometheus exposition and the small HTTP listener that serves it: `/metrics` (text
//! format), `/health` (the process answers) and `/ready` (running, not shutting down, every
//! configured server host accepts connections).
//!
//! Metrics are built at scrape time from the same per-pool counters the admin console reads
//! (`stats::PoolStats`, `pool::PoolCounts`), so the two cannot disagree; nothing here is on
//! the relay's path. The HTTP side is a deliberately tiny HTTP/1.1 responder on tokio: GET
//! only, one request per connection, bounded request size, time and concurrency.

use crate::admin;
use crate::app::{App, Shutdown};
use prometheus::core::Collector;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::Encoder;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Longest request (line and headers) read.
const MAX_REQUEST: usize = 8 * 1024;
/// A request must arrive, and the response leave, within this.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait for a turn.
const MAX_CONCURRENT: usize = 16;

static PROCESS: LazyLock<prometheus::process_collector::ProcessCollector> =
    LazyLock::new(prometheus::process_collector::ProcessCollector::for_self);

/// Families under construction, by name.
#[derive(Default)]
struct Families(BTreeMap<String, MetricFamily>);

impl Families {
    fn family(&mut self, name: &str, help: &str, ty: MetricType) -> &mut MetricFamily {
        self.0.entry(name.to_string()).or_insert_with(|| {
            let mut f = MetricFamily::default();
            f.set_name(name.to_string());
            f.set_help(help.to_string());
            f.set_field_type(ty);
            f
        })
    }

    fn push(&mut self, name: &str, help: &str, ty: MetricType, labels: &[(&str, &str)], v: f64) {
        let mut m = Metric::default();
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name(k.to_string());
                    l.set_value(v.to_string());
                    l
                })
                .collect(),
        );
        match ty {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(v);
                m.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
            }
        }
        self.family(name, help, ty).mut_metric().push(m);
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.push(name, help, MetricType::GAUGE, labels, v)
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.push(name, help, MetricType::COUNTER, labels, v)
    }

    /// Adds the metrics of already-built families (histograms, process metrics).
    fn merge(&mut self, families: Vec<MetricFamily>) {
        for mut f in families {
            let metrics = f.take_metric();
            let name = f.get_name().to_string();
            let entry = self.0.entry(name).or_insert(f);
            entry.mut_metric().extend(metrics);
        }
    }
}

/// Every metric, in the Prometheus text format.
pub fn render(app: &App) -> String {
    let mut f = Families::default();
    let config = app.config_arc();
    let clients_by_pool = app.registry.snapshot();
    let roles = host_roles(app);
    let mut seen = std::collections::HashSet::new();
    for p in app.all_pools() {
        let (db, user) = (p.db.as_str(), p.user.as_str());
        let l = [("database", db), ("user", user)];
        let s = &p.stats;
        let c = p.counts();
        let target = p.target();
        let host = target.addr_string();
        let role = roles
            .get(&(p.db.clone(), host.clone()))
            .copied()
            .unwrap_or("primary");
        for (state, n) in [
            ("active", c.active),
            ("idle", c.idle),
            ("used", 0),
            ("tested", 0),
            ("login", c.connecting),
            ("being_canceled", c.being_canceled),
        ] {
            f.gauge(
                "pgmux_servers",
                "Server connections by state (PgBouncer's sv_*; pgmux has no used/tested states)",
                &[
                    ("database", db),
                    ("user", user),
                    ("host", &host),
                    ("role", role),
                    ("state", state),
                ],
                n as f64,
            );
        }
        let sl = [
            ("database", db),
            ("user", user),
            ("host", host.as_str()),
            ("role", role),
        ];
        f.counter(
            "pgmux_server_connects_total",
            "Server connections opened",
            &sl,
            p.connects.load(Ordering::Relaxed) as f64,
        );
        f.counter(
            "pgmux_server_connect_failures_total",
            "Server connections that failed to open or log in",
            &sl,
            p.connect_failures.load(Ordering::Relaxed) as f64,
        );
        f.counter(
            "pgmux_server_batches_total",
            "Batches: waiting clients' queries sent to a server in one write (server_batch_size)",
            &sl,
            p.batches.load(Ordering::Relaxed) as f64,
        );
        f.counter(
            "pgmux_batched_queries_total",
            "Queries sent in batches",
            &sl,
            p.batched_queries.load(Ordering::Relaxed) as f64,
        );
        // The pools of one (database, user) on several hosts share their statistics: the
        // per-pool families below come once, from the first of them.
        if !seen.insert(Arc::as_ptr(&p.stats)) {
            continue;
        }
        for state in [
            crate::stats::ClientState::Active,
            crate::stats::ClientState::Waiting,
            crate::stats::ClientState::Idle,
        ] {
            f.gauge(
                "pgmux_clients",
                "Logged-in clients by state: active (holds a server), waiting (for one), idle",
                &[("database", db), ("user", user), ("state", state.name())],
                s.clients(state) as f64,
            );
        }
        f.gauge(
            "pgmux_clients_pinned",
            "Transaction-mode clients keeping their server (LISTEN, SQL PREPARE, temporary objects, WITH HOLD cursors, session advisory locks, settings pgmux cannot follow)",
            &l,
            clients_by_pool
                .iter()
                .filter(|c| c.db() == db && c.user() == user && !c.pinned().is_empty())
                .count() as f64,
        );
        f.counter(
            "pgmux_client_pins_total",
            "Times a transaction-mode client became pinned to its server",
            &l,
            s.pins.load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
        let settings = p.settings();
        f.gauge(
            "pgmux_pool_size",
            "Configured server connections per pool",
            &l,
            settings.size as f64,
        );
        f.gauge(
            "pgmux_pool_min_size",
            "Configured min_pool_size",
            &l,
            settings.min_size as f64,
        );
        f.gauge(
            "pgmux_pool_reserve_size",
            "Configured reserve_pool_size",
            &l,
            settings.reserve_size as f64,
        );
        f.gauge(
            "pgmux_pool_paused",
            "1 while the pool is paused (PAUSE, KILL)",
            &l,
            f64::from(u8::from(p.is_paused())),
        );
        let maxwait = clients_by_pool
            .iter()
            .filter(|c| c.db() == p.db && c.user() == p.user)
            .filter_map(|c| c.waiting_for())
            .max()
            .unwrap_or_default();
        f.gauge(
            "pgmux_pool_maxwait_seconds",
            "How long the longest-waiting client of the pool has waited",
            &l,
            maxwait.as_secs_f64(),
        );
        let t = s.totals();
        let us = |v: u64| v as f64 / 1e6;
        f.counter(
            "pgmux_server_assignments_total",
            "Times a server was lent to a client",
            &l,
            t.server_assignments as f64,
        );
        f.counter(
            "pgmux_transactions_total",
            "Transactions completed (a ReadyForQuery with status idle)",
            &l,
            t.xacts as f64,
        );
        f.counter(
            "pgmux_queries_total",
            "Requests answered (one per ReadyForQuery)",
            &l,
            t.queries as f64,
        );
        f.counter(
            "pgmux_received_bytes_total",
            "Bytes received from clients",
            &l,
            t.received as f64,
        );
        f.counter(
            "pgmux_sent_bytes_total",
            "Bytes relayed from servers to clients",
            &l,
            t.sent as f64,
        );
        f.counter(
            "pgmux_transaction_time_seconds_total",
            "Time spent in transactions",
            &l,
            us(t.xact_time_us),
        );
        f.counter(
            "pgmux_query_time_seconds_total",
            "Time spent in queries",
            &l,
            us(t.query_time_us),
        );
        f.counter(
            "pgmux_client_wait_time_seconds_total",
            "Time clients spent waiting for a server",
            &l,
            us(t.wait_time_us),
        );
        for (class, n) in s.errors_by_class() {
            f.counter(
                "pgmux_server_errors_total",
                "ErrorResponses relayed from servers to clients, by SQLSTATE class",
                &[("database", db), ("user", user), ("class", &class)],
                n as f64,
            );
        }
        f.merge(s.wait_hist.collect());
        f.merge(s.query_hist.collect());
        f.merge(s.xact_hist.collect());
    }
    routing_metrics(app, &mut f);
    f.gauge(
        "pgmux_client_connections",
        "Client connections open (logging in, pooled and console)",
        &[],
        app.client_count() as f64,
    );
    f.gauge(
        "pgmux_max_client_conn",
        "Configured max_client_conn",
        &[],
        config.pgmux.max_client_conn as f64,
    );
    f.counter(
        "pgmux_client_auth_failures_total",
        "Clients refused for a wrong password or an unknown user",
        &[],
        app.auth_failures.load(Ordering::Relaxed) as f64,
    );
    f.gauge(
        "pgmux_info",
        "pgmux's version",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    f.merge(PROCESS.collect());

    let families: Vec<MetricFamily> = f.0.into_values().collect();
    let mut out = Vec::with_capacity(16 * 1024);
    if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut out) {
        warn!("encoding metrics failed: {e}");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Each routed host's role as its database's monitor last saw it, by (database, "host:port").
fn host_roles(app: &App) -> std::collections::HashMap<(String, String), &'static str> {
    let mut m = std::collections::HashMap::new();
    for r in app.routers() {
        for h in &r.topology.snapshot().hosts {
            m.insert((r.name.clone(), h.addr()), role_name(h.role));
        }
    }
    m
}

fn role_name(r: crate::topology::Role) -> &'static str {
    match r {
        crate::topology::Role::Primary => "primary",
        crate::topology::Role::Replica => "replica",
        crate::topology::Role::Unknown => "unknown",
    }
}

/// Read/write routing: decisions by target and reason, retries, refusals, and each host's
/// health, ban and replica lag from the topology monitor.
fn routing_metrics(app: &App, f: &mut Families) {
    let now = std::time::Instant::now();
    for r in app.routers() {
        let db = r.name.as_str();
        for (target, reason, n) in r.stats.snapshot() {
            let target = match target {
                crate::router::balance::Target::Primary => "primary",
                crate::router::balance::Target::Replica => "replica",
            };
            f.counter(
                "pgmux_route_decisions_total",
                "Units of work routed, by target and reason",
                &[
                    ("database", db),
                    ("target", target),
                    ("reason", reason.name()),
                ],
                n as f64,
            );
        }
        f.counter(
            "pgmux_route_retries_total",
            "Reads sent again to another host after their replica failed (checkout, or before answering)",
            &[("database", db)],
            r.stats.retries.load(Ordering::Relaxed) as f64,
        );
        f.counter(
            "pgmux_route_refused_total",
            "Units of work answered with an error because no server could take them",
            &[("database", db)],
            r.stats.refused.load(Ordering::Relaxed) as f64,
        );
        for h in &r.topology.snapshot().hosts {
            let addr = h.addr();
            let l = [
                ("database", db),
                ("host", addr.as_str()),
                ("role", role_name(h.role)),
            ];
            f.gauge(
                "pgmux_host_healthy",
                "1 when the host's last check succeeded",
                &l,
                f64::from(u8::from(h.healthy)),
            );
            f.gauge(
                "pgmux_host_banned",
                "1 while the host is banned (a failed check or connect)",
                &l,
                f64::from(u8::from(h.is_banned(now))),
            );
            if let Some(b) = h.lag_bytes {
                f.gauge(
                    "pgmux_replica_lag_bytes",
                    "WAL bytes a replica is behind the primary",
                    &l,
                    b as f64,
                );
            }
            if let Some(s) = h.lag_seconds {
                f.gauge(
                    "pgmux_replica_lag_seconds",
                    "Age of a replica's last replayed transaction while it has WAL to replay",
                    &l,
                    s,
                );
            }
        }
    }
}

/// Serves /metrics, /health and /ready until the process ends.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!("metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tokio::time::timeout(IO_TIMEOUT, answer(&app, stream)).await {
                debug!(%peer, "metrics request timed out: {e}");
            }
        });
    }
}

async fn answer(app: &App, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() >= MAX_REQUEST {
            return respond(&mut stream, 431, "text/plain", "request too large\n").await;
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        return respond(&mut stream, 405, "text/plain", "only GET is served\n").await;
    }
    match path {
        "/metrics" => {
            let body = render(app);
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        "/health" => respond(&mut stream, 200, "text/plain", "ok\n").await,
        "/ready" => match readiness(app).await {
            Ok(()) => respond(&mut stream, 200, "text/plain", "ready\n").await,
            Err(why) => respond(&mut stream, 503, "text/plain", &format!("{why}\n")).await,
        },
        _ => respond(&mut stream, 404, "text/plain", "not found\n").await,
    }
}

/// Ready: running (not shutting down) and every configured server host accepts connections.
pub async fn readiness(app: &App) -> Result<(), String> {
    if app.shutdown_stage() != Shutdown::Running {
        return Err("shutting down".into());
    }
    let config = app.config_arc();
    let mut hosts: Vec<(String, u16)> = config
        .databases
        .iter()
        .map(|d| (d.host.clone(), d.port))
        .collect();
    hosts.sort();
    hosts.dedup();
    for (host, port) in hosts {
        if !admin::probe(&host, port).await {
            return Err(format!("server {host}:{port} is unreachable"));
        }
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the metrics listener, if one is configured (port 0 turns it off).
pub async fn bind(app: &App) -> std::io::Result<Option<(TcpListener, SocketAddr)>> {
    let config = app.config_arc();
    let g = &config.pgmux;
    if g.metrics_listen_port == 0 {
        return Ok(None);
    }
    let ip: std::net::IpAddr = g.metrics_listen_addr.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid metrics_listen_addr {:?}", g.metrics_listen_addr),
        )
    })?;
    let addr = SocketAddr::new(ip, g.metrics_listen_port);
    // with so_reuseport a new process shares this port too while the old one drains
    let l = crate::listener::bind(addr, g.so_reuseport)?;
    Ok(Some((l, addr)))
}
