//! SHOW commands. Where PgBouncer has the command, the columns, their order and their types
//! are PgBouncer's (1.24), so psql habits and tools written for PgBouncer keep working;
//! columns for features pgmux does not have (cancel-request queues, prepared statements,
//! TLS, DNS) are present and zero or empty. SHOW HOSTS is pgmux's own.

use super::settings;
use super::wire::{notice, ResultSet, Type, Value};
use crate::app::App;
use crate::config::PoolMode;
use crate::stats::{
    unix_us, Averages, ClientInfo, ClientState, Totals, BINDS, CLIENT_PARSES, SERVER_PARSES,
};
use bytes::BytesMut;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use Type::{Float8, Int4, Int8, Numeric, Text};

/// How long SHOW HOSTS waits for a host to accept a TCP connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The result of `SHOW <what> [arg]`; None for a command there is no SHOW of.
pub async fn run(app: &App, what: &str, arg: Option<&str>) -> Option<BytesMut> {
    Some(match what {
        "POOLS" => pools(app),
        "STATS" => stats(app, arg, Kind::All),
        "STATS_TOTALS" => stats(app, arg, Kind::Totals),
        "STATS_AVERAGES" => stats(app, arg, Kind::Averages),
        "TOTALS" => totals(app),
        "CLIENTS" => clients(app),
        "SERVERS" => servers(app),
        "DATABASES" => databases(app),
        "USERS" => users(app),
        "CONFIG" => config(app),
        "LISTS" => lists(app),
        "VERSION" => version(),
        "STATE" => state(app),
        "HOSTS" => hosts(app).await,
        "QUERIES" => queries(app),
        "HELP" => help(),
        _ => return None,
    })
}

fn mode_name(m: PoolMode) -> &'static str {
    match m {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
    }
}

/// Longest current wait of each pool's clients, keyed by (database, user).
fn max_waits(clients: &[Arc<ClientInfo>]) -> HashMap<(&str, &str), Duration> {
    let mut m: HashMap<(&str, &str), Duration> = HashMap::new();
    for c in clients {
        if let Some(w) = c.waiting_for() {
            let e = m.entry((c.db(), c.user())).or_default();
            *e = (*e).max(w);
        }
    }
    m
}

fn pools(app: &App) -> BytesMut {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("user", Text),
        ("cl_active", Int4),
        ("cl_waiting", Int4),
        ("cl_active_cancel_req", Int4),
        ("cl_waiting_cancel_req", Int4),
        ("sv_active", Int4),
        ("sv_active_cancel", Int4),
        ("sv_being_canceled", Int4),
        ("sv_idle", Int4),
        ("sv_used", Int4),
        ("sv_tested", Int4),
        ("sv_login", Int4),
        ("maxwait", Int4),
        ("maxwait_us", Int4),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
    ]);
    let clients = app.registry.snapshot();
    let waits = max_waits(&clients);
    let mut seen = std::collections::HashSet::new();
    for p in app.all_pools() {
        let s = &p.stats;
        let c = p.counts();
        // The per-host pools of a database with replicas share their clients (one PoolStats):
        // counted on the first row only, so the rows add up as PgBouncer's do.
        let first = seen.insert(Arc::as_ptr(s));
        let (active, waiting, w) = if first {
            let w = waits
                .get(&(p.db.as_str(), p.user.as_str()))
                .copied()
                .unwrap_or_default();
            // PgBouncer counts idle clients as active: linked or not, they are not waiting
            let active = s.clients(ClientState::Active) + s.clients(ClientState::Idle);
            (active, s.clients(ClientState::Waiting), w)
        } else {
            (0, 0, Duration::ZERO)
        };
        rs.row(vec![
            p.db.as_str().into(),
            p.user.as_str().into(),
            active.into(),
            waiting.into(),
            0i32.into(),
            0i32.into(),
            c.active.into(),
            0i32.into(),
            c.being_canceled.into(),
            c.idle.into(),
            0i32.into(),
            0i32.into(),
            c.connecting.into(),
            w.as_secs().into(),
            w.subsec_micros().into(),
            mode_name(p.settings().mode).into(),
            Value::Null,
        ]);
    }
    rs.finish("SHOW")
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    All,
    Totals,
    Averages,
}

/// Totals and averages over each database's pools: rates add up, mean durations are
/// weighted by how many transactions, queries or assignments each pool had.
fn per_database(app: &App) -> BTreeMap<String, (Totals, Averages)> {
    let mut m: BTreeMap<String, (Totals, Averages, [u64; 3])> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for p in app.all_pools() {
        // the per-host pools of a database with replicas share one PoolStats
        if !seen.insert(Arc::as_ptr(&p.stats)) {
            continue;
        }
        let e = m.entry(p.db.clone()).or_default();
        e.0.add(&p.stats.totals());
        let a = p.stats.averages();
        let (b, w) = (&mut e.1, &mut e.2);
        b.server_assignments += a.server_assignments;
        b.xacts += a.xacts;
        b.queries += a.queries;
        b.recv += a.recv;
        b.sent += a.sent;
        for (sum, rate) in b.prepared.iter_mut().zip(a.prepared) {
            *sum += rate;
        }
        // summed as time x rate here, divided by the summed rates below
        b.xact_time_us += a.xact_time_us * a.xacts;
        b.query_time_us += a.query_time_us * a.queries;
        b.wait_time_us += a.wait_time_us * a.server_assignments;
        w[0] += a.xacts;
        w[1] += a.queries;
        w[2] += a.server_assignments;
    }
    m.into_iter()
        .map(|(db, (t, mut a, w))| {
            a.xact_time_us = a.xact_time_us.checked_div(w[0]).unwrap_or(0);
            a.query_time_us = a.query_time_us.checked_div(w[1]).unwrap_or(0);
            a.wait_time_us = a.wait_time_us.checked_div(w[2]).unwrap_or(0);
            (db, (t, a))
        })
        .collect()
}

const TOTAL_NAMES: [&str; 11] = [
    "server_assignment_count",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
    "client_parse_count",
    "server_parse_count",
    "bind_count",
];

const STATS_TOTAL_NAMES: [&str; 11] = [
    "total_server_assignment_count",
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "total_client_parse_count",
    "total_server_parse_count",
    "total_bind_count",
];

const STATS_AVG_NAMES: [&str; 11] = [
    "avg_server_assignment_count",
    "avg_xact_count",
    "avg_query_count",
    "avg_recv",
    "avg_sent",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
    "avg_client_parse_count",
    "avg_server_parse_count",
    "avg_bind_count",
];

fn total_values(t: &Totals) -> [u64; 11] {
    [
        t.server_assignments,
        t.xacts,
        t.queries,
        t.received,
        t.sent,
        t.xact_time_us,
        t.query_time_us,
        t.wait_time_us,
        t.prepared[CLIENT_PARSES],
        t.prepared[SERVER_PARSES],
        t.prepared[BINDS],
    ]
}

fn average_values(a: &Averages) -> [u64; 11] {
    [
        a.server_assignments,
        a.xacts,
        a.queries,
        a.recv,
        a.sent,
        a.xact_time_us,
        a.query_time_us,
        a.wait_time_us,
        a.prepared[CLIENT_PARSES],
        a.prepared[SERVER_PARSES],
        a.prepared[BINDS],
    ]
}

fn stats(app: &App, db: Option<&str>, kind: Kind) -> BytesMut {
    let mut cols = vec![("database", Text)];
    match kind {
        Kind::All => {
            cols.extend(STATS_TOTAL_NAMES.iter().map(|n| (*n, Numeric)));
            cols.extend(STATS_AVG_NAMES.iter().map(|n| (*n, Numeric)));
        }
        Kind::Totals | Kind::Averages => cols.extend(TOTAL_NAMES.iter().map(|n| (*n, Numeric))),
    }
    let mut rs = ResultSet::new(&cols);
    for (name, (t, a)) in per_database(app) {
        if db.is_some_and(|d| d != name) {
            continue;
        }
        let mut row: Vec<Value> = vec![name.into()];
        if kind != Kind::Averages {
            row.extend(total_values(&t).into_iter().map(Value::from));
        }
        if kind != Kind::Totals {
            row.extend(average_values(&a).into_iter().map(Value::from));
        }
        rs.row(row);
    }
    rs.finish("SHOW")
}

fn totals(app: &App) -> BytesMut {
    let mut t = Totals::default();
    let mut a = [0u64; 11];
    for (_, (pt, pa)) in per_database(app) {
        t.add(&pt);
        for (x, y) in a.iter_mut().zip(average_values(&pa)) {
            *x += y;
        }
    }
    let mut rs = ResultSet::new(&[("name", Text), ("value", Numeric)]);
    for (n, v) in STATS_TOTAL_NAMES.iter().zip(total_values(&t)) {
        rs.row(vec![(*n).into(), v.into()]);
    }
    for (n, v) in STATS_AVG_NAMES.iter().zip(a) {
        rs.row(vec![(*n).into(), v.into()]);
    }
    rs.finish("SHOW")
}

const SOCKET_COLUMNS: [(&str, Type); 22] = [
    ("type", Text),
    ("user", Text),
    ("database", Text),
    ("replication", Text),
    ("state", Text),
    ("addr", Text),
    ("port", Int4),
    ("local_addr", Text),
    ("local_port", Int4),
    ("connect_time", Text),
    ("request_time", Text),
    ("wait", Int4),
    ("wait_us", Int4),
    ("close_needed", Int4),
    ("ptr", Text),
    ("link", Text),
    ("remote_pid", Int4),
    ("tls", Text),
    ("application_name", Text),
    ("prepared_statements", Int4),
    ("id", Int8),
    // pgmux's own: why a transaction-mode client keeps its server ("" if it does not)
    ("pinned", Text),
];

fn clients(app: &App) -> BytesMut {
    let mut rs = ResultSet::new(&SOCKET_COLUMNS);
    for c in app.registry.snapshot() {
        let wait = c.waiting_for().unwrap_or_default();
        rs.row(vec![
            "C".into(),
            c.user().into(),
            c.db().into(),
            "none".into(),
            c.state().name().into(),
            c.addr().host().into(),
            c.addr().port().into(),
            c.local().map(|a| a.ip().to_string()).into(),
            c.local().map(|a| a.port()).into(),
            Value::Time(c.connect_time_us()),
            Value::Time(c.request_time_us()),
            wait.as_secs().into(),
            wait.subsec_micros().into(),
            0i32.into(),
            format!("c{}", c.id).into(),
            c.server_id()
                .map(|s| format!("s{s}"))
                .unwrap_or_default()
                .into(),
            0i32.into(),
            "".into(),
            (&*c.application_name).into(),
            0i32.into(),
            c.id.into(),
            c.pinned().into(),
        ]);
    }
    rs.finish("SHOW")
}

fn servers(app: &App) -> BytesMut {
    let clients = app.registry.snapshot();
    let by_server: HashMap<u64, &Arc<ClientInfo>> = clients
        .iter()
        .filter_map(|c| c.server_id().map(|s| (s, c)))
        .collect();
    let mut rs = ResultSet::new(&SOCKET_COLUMNS);
    for p in app.all_pools() {
        for s in p.servers() {
            let client = by_server.get(&s.id);
            rs.row(vec![
                "S".into(),
                p.user.as_str().into(),
                p.db.as_str().into(),
                "none".into(),
                if s.idle { "idle" } else { "active" }.into(),
                s.addr.host().into(),
                s.addr.port().into(),
                s.local.map(|a| a.ip().to_string()).into(),
                s.local.map(|a| a.port()).into(),
                Value::Time(unix_us(s.connect_time)),
                Value::Time(client.map_or(0, |c| c.request_time_us())),
                0i32.into(),
                0i32.into(),
                i32::from(s.close_needed).into(),
                format!("s{}", s.id).into(),
                client
                    .map(|c| format!("c{}", c.id))
                    .unwrap_or_default()
                    .into(),
                s.pid.into(),
                "".into(),
                client
                    .map(|c| c.application_name.to_string())
                    .unwrap_or_default()
                    .into(),
                0i32.into(),
                s.id.into(),
                client.map(|c| c.pinned()).unwrap_or_default().into(),
            ]);
        }
    }
    rs.finish("SHOW")
}

fn databases(app: &App) -> BytesMut {
    let config = app.config_arc();
    let g = &config.pgmux;
    let pools = app.all_pools();
    let mut rs = ResultSet::new(&[
        ("name", Text),
        ("host", Text),
        ("port", Int4),
        ("database", Text),
        ("force_user", Text),
        ("pool_size", Int4),
        ("min_pool_size", Int4),
        ("reserve_pool_size", Int4),
        ("server_lifetime", Int4),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
        ("max_connections", Int4),
        ("current_connections", Int4),
        ("max_client_connections", Int4),
        ("current_client_connections", Int4),
        ("paused", Int4),
        ("disabled", Int4),
    ]);
    for d in &config.databases {
        let mine = pools.iter().filter(|p| p.db == d.name);
        let mut seen = std::collections::HashSet::new();
        let (servers, clients) = mine.fold((0u64, 0u64), |(s, c), p| {
            let n = p.counts();
            // per-host pools share their PoolStats: count its clients once
            let first = seen.insert(Arc::as_ptr(&p.stats));
            (
                s + (n.idle + n.active + n.connecting + n.being_canceled) as u64,
                c + if first { p.stats.client_total() } else { 0 },
            )
        });
        rs.row(vec![
            d.name.as_str().into(),
            d.host.as_str().into(),
            d.port.into(),
            d.dbname.as_deref().unwrap_or(&d.name).into(),
            d.server_user.as_deref().into(),
            d.pool_size.unwrap_or(g.default_pool_size).into(),
            d.min_pool_size.unwrap_or(g.min_pool_size).into(),
            d.reserve_pool_size.unwrap_or(g.reserve_pool_size).into(),
            (g.server_lifetime.0 as i64).into(),
            d.pool_mode.map(mode_name).into(),
            Value::Null,
            d.max_db_connections.unwrap_or(g.max_db_connections).into(),
            servers.into(),
            0i32.into(),
            clients.into(),
            i32::from(app.is_paused(&d.name)).into(),
            i32::from(app.is_disabled(&d.name)).into(),
        ]);
    }
    rs.finish("SHOW")
}

fn users(app: &App) -> BytesMut {
    let config = app.config_arc();
    let pools = app.all_pools();
    let mut rs = ResultSet::new(&[
        ("name", Text),
        ("pool_size", Text),
        ("reserve_pool_size", Text),
        ("pool_mode", Text),
        ("max_user_connections", Int4),
        ("current_connections", Int4),
        ("max_user_client_connections", Int4),
        ("current_client_connections", Int4),
    ]);
    for u in &config.users {
        let mine = pools.iter().filter(|p| p.user == u.name);
        let (servers, clients) = mine.fold((0u64, 0u64), |(s, c), p| {
            let n = p.counts();
            (
                s + (n.idle + n.active + n.connecting + n.being_canceled) as u64,
                c + p.stats.client_total(),
            )
        });
        rs.row(vec![
            u.name.as_str().into(),
            u.pool_size.map(|s| s.to_string()).into(),
            Value::Null,
            u.pool_mode.map(mode_name).into(),
            0i32.into(),
            servers.into(),
            0i32.into(),
            clients.into(),
        ]);
    }
    rs.finish("SHOW")
}

fn config(app: &App) -> BytesMut {
    let mut rs = ResultSet::new(&[
        ("key", Text),
        ("value", Text),
        ("default", Text),
        ("changeable", Text),
    ]);
    for (k, v, d, c) in settings::rows(&app.config()) {
        rs.row(vec![
            k.into(),
            v.into(),
            d.into(),
            if c { "yes" } else { "no" }.into(),
        ]);
    }
    rs.finish("SHOW")
}

fn lists(app: &App) -> BytesMut {
    let config = app.config_arc();
    let pools = app.all_pools();
    let servers: u64 = pools
        .iter()
        .map(|p| {
            let c = p.counts();
            (c.idle + c.active + c.connecting + c.being_canceled) as u64
        })
        .sum();
    let logged_in = app.registry.len() as u64;
    let connected = app.client_count() as u64;
    let mut rs = ResultSet::new(&[("list", Text), ("items", Int4)]);
    for (name, n) in [
        ("databases", config.databases.len() as u64),
        ("users", config.users.len() as u64),
        ("peers", 0),
        ("pools", pools.len() as u64),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", logged_in),
        // accepted but not logged in yet (console sessions included)
        ("login_clients", connected.saturating_sub(logged_in)),
        ("free_servers", 0),
        ("used_servers", servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        rs.row(vec![name.into(), n.into()]);
    }
    rs.finish("SHOW")
}

fn version() -> BytesMut {
    let mut rs = ResultSet::new(&[("version", Text)]);
    rs.row(vec![concat!(
        "pgmux ",
        env!("CARGO_PKG_VERSION"),
        ", console compatible with PgBouncer 1.24.0"
    )
    .into()]);
    rs.finish("SHOW")
}

fn state(app: &App) -> BytesMut {
    let paused = app
        .config()
        .databases
        .iter()
        .all(|d| app.is_paused(&d.name))
        && !app.config().databases.is_empty();
    let mut rs = ResultSet::new(&[("key", Text), ("value", Text)]);
    rs.row(vec![
        "active".into(),
        if paused { "no" } else { "yes" }.into(),
    ]);
    rs.row(vec![
        "paused".into(),
        if paused { "yes" } else { "no" }.into(),
    ]);
    rs.row(vec!["suspended".into(), "no".into()]);
    rs.finish("SHOW")
}

/// Every configured server host. Hosts of databases with replicas are shown as their
/// topology monitor last saw them (role, health, lag, ban); the others are probed now.
async fn hosts(app: &App) -> BytesMut {
    let config = app.config_arc();
    let mut rs = ResultSet::new(&[
        ("host", Text),
        ("port", Int4),
        ("role", Text),
        ("health", Text),
        ("lag_bytes", Int8),
        ("lag_seconds", Int8),
        ("banned", Int4),
        ("database", Text),
        ("last_error", Text),
    ]);
    let routers = app.routers();
    let now = std::time::Instant::now();
    for d in &config.databases {
        if let Some(r) = routers.iter().find(|r| r.name == d.name) {
            for h in &r.topology.snapshot().hosts {
                let role = match h.role {
                    crate::topology::Role::Primary => "primary",
                    crate::topology::Role::Replica => "replica",
                    crate::topology::Role::Unknown => "unknown",
                };
                rs.row(vec![
                    h.host.as_str().into(),
                    h.port.into(),
                    role.into(),
                    match (h.healthy, h.diverged) {
                        (false, _) => "down",
                        (true, true) => "diverged",
                        (true, false) => "up",
                    }
                    .into(),
                    h.lag_bytes.map_or(Value::Null, |b| (b as i64).into()),
                    h.lag_seconds
                        .map_or(Value::Null, |s| (s.round() as i64).into()),
                    i32::from(h.is_banned(now)).into(),
                    d.name.as_str().into(),
                    h.last_error.as_deref().map_or(Value::Null, Into::into),
                ]);
            }
            continue;
        }
        let mut servers: Vec<(String, u16)> = if d.has_replicas() {
            d.server_hosts()
                .into_iter()
                .map(|h| (h.host, h.port))
                .collect()
        } else {
            vec![(d.host.clone(), d.port)]
        };
        servers.dedup();
        for (i, (host, port)) in servers.into_iter().enumerate() {
            let up = probe(&host, port).await;
            // not monitored yet (no client has used the database): the configured role
            let role = if i == 0 && d.hosts.is_empty() {
                "primary"
            } else if d.hosts.is_empty() {
                "replica"
            } else {
                "unknown"
            };
            // a primary that answers is, by definition, not behind itself
            let lag = |zero: Value| {
                if up && role == "primary" {
                    zero
                } else {
                    Value::Null
                }
            };
            rs.row(vec![
                host.into(),
                port.into(),
                role.into(),
                if up { "up" } else { "down" }.into(),
                lag(0i64.into()),
                lag(0i64.into()),
                0i32.into(),
                d.name.as_str().into(),
                Value::Null,
            ]);
        }
    }
    rs.finish("SHOW")
}

/// Whether `host:port` (or the socket when `host` is a directory) accepts a connection
/// within PROBE_TIMEOUT.
pub async fn probe(host: &str, port: u16) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, crate::endpoint::open(host, port)).await,
        Ok(Ok(_))
    )
}

/// pgmux's own: statements by normalized text, per pool, most total time first.
fn queries(app: &App) -> BytesMut {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("user", Text),
        ("query", Text),
        ("calls", Int8),
        ("total_time", Float8),
        ("mean_time", Float8),
        ("max_time", Float8),
        ("rows", Int8),
    ]);
    let mut all = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in app.all_pools() {
        // the per-host pools of a database with replicas share one PoolStats
        if !seen.insert(Arc::as_ptr(&p.stats)) {
            continue;
        }
        for e in p.stats.statements.snapshot() {
            all.push((p.db.clone(), p.user.clone(), e));
        }
    }
    all.sort_by(|a, b| {
        b.2.total_us
            .cmp(&a.2.total_us)
            .then(b.2.calls.cmp(&a.2.calls))
    });
    let ms = |us: u64| Value::Text(format!("{:.3}", us as f64 / 1000.0));
    for (db, user, e) in all {
        rs.row(vec![
            db.into(),
            user.into(),
            e.text.to_string().into(),
            e.calls.into(),
            ms(e.total_us),
            ms(e.total_us / e.calls.max(1)),
            ms(e.max_us),
            e.rows.into(),
        ]);
    }
    rs.finish("SHOW")
}

fn help() -> BytesMut {
    let mut out = BytesMut::new();
    notice(
        &mut out,
        "Console usage\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n\
         \tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS|LISTS|STATE|HOSTS|QUERIES\n\
         \tSET key = arg\n\tRELOAD\n\tPAUSE [<db>]\n\tRESUME [<db>]\n\tDISABLE <db>\n\tENABLE <db>\n\tKILL <db>\n\
         \tKILL_CLIENT <id>\n\tRECONNECT [<db>]\n\tWAIT_CLOSE [<db>]\n\tSHUTDOWN [WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS]",
    );
    super::wire::command_complete(&mut out, "SHOW");
    out
}
