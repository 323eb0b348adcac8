//! A client's way in: the startup packet (after `tls::open` settled encryption; a late
//! SSLRequest/GSSENCRequest is declined, a CancelRequest forwarded), authentication (the
//! method from `auth_hba_file` when set, else `auth_type`), the database and pool it gets, and the welcome
//! (ParameterStatus values of a real server, pgmux's own BackendKeyData).

use crate::app::App;
use crate::auth::hba::{self, Decision};
use crate::auth::lookup::LookupPlan;
use crate::auth::{self, password::Secret, AuthError};
use crate::cancel;
use crate::cancel::CancelKey;
use crate::params::{self, Params};
use crate::pool::{Pool, PoolError};
use crate::protocol::messages;
use crate::protocol::startup::{self, Initial, StartupError, StartupPacket};
use crate::protocol::PgError;
use crate::server::ServerError;
use crate::stats::ClientHandle;
use crate::tls::{ClientStream, Peer};
use bytes::BytesMut;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Where a logged-in client goes: a pool, or the admin console (virtual database `pgmux`).
pub enum Entry {
    /// A pool's client, with pgmux's own startup settings (`-c pgmux.route=replica`), which
    /// the session's router takes (they are kept from servers).
    Pool(LoggedIn, crate::router::session::StartupRoute),
    Console(crate::admin::Console),
}

pub struct LoggedIn {
    /// The client's pool, which also names its database (and its user, unless the database
    /// logs in to servers as another: `user`).
    pub pool: Arc<Pool>,
    /// The client's user name where it is not the pool's, and the settings of its startup
    /// packet: one word in every idle session, shared by the clients that have the same
    /// (most that have any: a driver's application_name).
    rare: Option<Arc<Rare>>,
    /// Settings the client expects on every server it is lent (shared: `Pool::share_wants`).
    pub wants: Arc<Params>,
    /// Its entry in the client registry (SHOW CLIENTS, the pool's client counts, KILL) and
    /// its cancel key, from the welcome until the session ends.
    pub client: ClientHandle,
}

/// What few clients of a pool have, or what an idle session need not hold inline.
#[derive(PartialEq)]
struct Rare {
    user: Option<String>,
    /// The settings the client's startup packet gave (`options` unpacked, pgmux's own
    /// taken out): on PostgreSQL, RESET goes back to these, not to the server's defaults.
    startup: Vec<(String, String)>,
}

/// Distinct `Rare`s shared across the process's clients.
static RARE: crate::interned::Interned<Rare> = crate::interned::Interned::new(64);

impl LoggedIn {
    pub fn db(&self) -> &str {
        &self.pool.db
    }

    pub fn user(&self) -> &str {
        self.rare
            .as_ref()
            .and_then(|r| r.user.as_deref())
            .unwrap_or(&self.pool.user)
    }

    /// Database and user for the client's log lines: its pool's, unless its user is not.
    pub fn log_names(&self) -> crate::logging::Names {
        match self.rare.as_ref().and_then(|r| r.user.as_deref()) {
            None => self.pool.log_names.clone(),
            Some(u) => crate::logging::Names::new(self.db(), u),
        }
    }

    /// The client's settings, its own copy from now on (see `Pool::share_wants`), beside
    /// those of its startup packet.
    pub fn wants_mut(&mut self) -> (&mut Params, &[(String, String)]) {
        let startup = self.rare.as_ref().map_or(&[][..], |r| &r.startup[..]);
        (Arc::make_mut(&mut self.wants), startup)
    }
}

/// Why a login ended without a session; `error` (if any) goes to the client.
#[derive(Debug)]
pub struct Refusal {
    pub error: Option<PgError>,
    pub log: String,
}

impl Refusal {
    fn silent(log: impl Into<String>) -> Refusal {
        Refusal {
            error: None,
            log: log.into(),
        }
    }

    fn with(error: PgError) -> Refusal {
        Refusal {
            log: error.to_string(),
            error: Some(error),
        }
    }
}

/// Reads the startup packet, authenticates and welcomes the client.
/// `first` is the packet that followed the encryption negotiation (`tls::open`), which also
/// tells how the client came (`conn`).
pub async fn login(
    app: &App,
    stream: &mut ClientStream,
    over_limit: bool,
    first: Initial,
    conn: &Peer,
    local: Option<std::net::SocketAddr>,
) -> Result<Entry, Refusal> {
    let packet = read_startup(app, stream, first).await?;
    if packet.minor > 0 || !packet.protocol_options.is_empty() {
        let mut out = BytesMut::new();
        messages::negotiate_protocol_version(
            &mut out,
            startup::PROTOCOL_3_0,
            &packet.protocol_options,
        );
        write(stream, &out).await?;
    }
    let user = packet
        .get("user")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            Refusal::with(PgError::fatal(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            ))
        })?
        .to_string();
    let db = packet
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_string();
    // The console is exempt, as PgBouncer exempts its admin database: an operator must be
    // able to reach PAUSE, KILL or SET max_client_conn during a flood of clients.
    if over_limit && !crate::admin::is_console_db(&db) {
        return Err(Refusal::with(PgError::fatal(
            "53300",
            "sorry, too many clients already",
        )));
    }
    let mut settings = startup_settings(app, &packet)?;
    let route = crate::router::session::take_startup(&mut settings)
        .map_err(|m| Refusal::with(PgError::fatal("22023", m)))?;

    let config = app.config_arc();
    if !conn.tls && config.security.client_requires_tls() {
        return Err(Refusal::with(PgError::fatal("28000", "SSL required")));
    }
    let decision = hba::decide(
        config.security.hba.as_deref(),
        config.pgmux.auth_type,
        conn,
        &db,
        &user,
    )
    .map_err(Refusal::with)?;
    // A user pgmux does not know cannot be looked up (auth_query) nor authenticated without
    // a database: the database is the reason given, before authentication, as PgBouncer
    // gives it.
    if config.user(&user).is_none()
        && !crate::admin::is_console_db(&db)
        && config.database(&db).is_none()
    {
        return Err(Refusal::with(PgError::fatal(
            "3D000",
            format!("database \"{db}\" does not exist"),
        )));
    }
    let plan = match config.user(&user) {
        Some(_) => None,
        None if crate::admin::is_console_db(&db) => None,
        None => config
            .database(&db)
            .and_then(|d| LookupPlan::new(&config, d)),
    };
    let (known, secret) = match config.user(&user) {
        Some(u) => (true, u.password.as_deref().map(Secret::parse)),
        None => match (&plan, &decision) {
            (Some(plan), Decision::Exchange(_)) => look_up(app, plan, &user).await?,
            _ => (false, None),
        },
    };
    let outcome = match decision {
        Decision::Exchange(method) => {
            auth::authenticate(
                stream,
                method,
                &user,
                known,
                secret.as_ref(),
                &app.verifiers,
                conn.tls_end_point.as_deref(),
            )
            .await
        }
        Decision::Certified => Ok(auth::Proven::default()),
    };
    match outcome {
        Ok(proven) => {
            // a user found by auth_query logs in to servers with what was found, unless the
            // exchange taught something better (a SCRAM verifier alone cannot log in)
            let learned = proven
                .server_secret(secret.as_ref())
                .or_else(|| plan.as_ref().and(secret.clone()));
            if let Some(s) = learned {
                app.learn_server_secret(&db, &user, s);
            }
        }
        Err(AuthError::Failed) => {
            if let Some(plan) = &plan {
                app.auth_lookups.forget(plan, &user);
            }
            app.auth_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(Refusal::with(PgError::fatal(
                "28P01",
                format!("password authentication failed for user \"{user}\""),
            )));
        }
        Err(AuthError::Protocol(m)) => return Err(Refusal::with(PgError::fatal("08P01", m))),
        Err(e) => return Err(Refusal::silent(e.to_string())),
    }
    // AuthenticationOk, a dozen ParameterStatus, BackendKeyData, ReadyForQuery
    let mut out = BytesMut::with_capacity(512);
    messages::auth_ok(&mut out);

    if crate::admin::is_console_db(&db) {
        let console = crate::admin::admit(app, &user).map_err(Refusal::with)?;
        write(stream, &out).await?;
        return Ok(Entry::Console(console));
    }
    let Some(database) = config.database(&db) else {
        write(stream, &out).await?;
        return Err(Refusal::with(PgError::fatal(
            "3D000",
            format!("database \"{db}\" does not exist"),
        )));
    };
    if app.is_disabled(&db) {
        write(stream, &out).await?;
        return Err(Refusal::with(PgError::fatal(
            "55000",
            format!("database \"{db}\" is not currently accepting connections"),
        )));
    }
    let pool = app.pool(database, &user);
    // Registered before its pool's first server is asked for: a login that waits for it (a
    // paused pool, a full one) is a waiting client of the pool, seen in SHOW POOLS and SHOW
    // CLIENTS, ended by KILL and by a safe shutdown like any other.
    let known = pool.baseline();
    let app_name = settings
        .iter()
        .rev()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.as_str())
        .or_else(|| known.as_deref().and_then(|b| b.get("application_name")))
        .unwrap_or("");
    let client = app
        .registry
        .register(pool.stats.clone(), conn.addr, local, app_name);
    let baseline = match known {
        Some(b) => Ok(b),
        None => {
            client.waiting();
            // a client that gives up while its pool's first server is being connected leaves
            // now, with its slot under max_client_conn, rather than when the server answers
            let b = tokio::select! {
                b = any_baseline(app, database, &user, &pool) => b,
                _ = super::stopped(&client, app) => Err(super::shutdown_error()),
                _ = stream.hangup(false) => {
                    return Err(Refusal::silent(
                        "the client left while a server connection was being made for it",
                    ))
                }
            };
            client.idle();
            b
        }
    };
    let baseline = match baseline {
        Ok(b) => b,
        Err(e) => {
            write(stream, &out).await?;
            return Err(Refusal::with(e));
        }
    };
    let wants = pool.share_wants(params::client_wants(&baseline, &settings));
    welcome(&mut out, &baseline, &wants, &client.info().cancel);
    // a refused client leaves the registry with its handle
    write(stream, &out).await?;
    let user = (user != pool.user).then_some(user);
    let rare = (user.is_some() || !settings.is_empty()).then(|| {
        RARE.share(Rare {
            user,
            startup: settings,
        })
    });
    Ok(Entry::Pool(
        LoggedIn {
            rare,
            pool,
            wants,
            client,
        },
        route,
    ))
}

/// A user's secret through auth_query: (found, secret). A failed lookup refuses the client
/// without the server's words, which may say more about the server than it should hear.
async fn look_up(
    app: &App,
    plan: &LookupPlan<'_>,
    user: &str,
) -> Result<(bool, Option<Secret>), Refusal> {
    match app.auth_lookups.secret(app, plan, user).await {
        Ok(Some(secret)) => Ok((true, Some(secret))),
        Ok(None) => Ok((false, None)),
        Err(e) => {
            tracing::warn!(auth_user = plan.auth_user, db = %plan.db.name, "{e}");
            Err(Refusal::with(PgError::fatal(
                "08006",
                "pgmux could not look up the user: auth_query failed",
            )))
        }
    }
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, b: &[u8]) -> Result<(), Refusal> {
    stream
        .write_all(b)
        .await
        .map_err(|e| Refusal::silent(format!("client write failed: {e}")))
}

/// The StartupMessage, after declining encryption requests; a CancelRequest is served here.
async fn read_startup<S>(
    app: &App,
    stream: &mut S,
    first: Initial,
) -> Result<StartupPacket, Refusal>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut next = Some(Ok(first));
    // one SSLRequest and one GSSENCRequest at most, as libpq may send both
    for _ in 0..3 {
        let initial = match next.take() {
            Some(i) => i,
            None => startup::read_initial(stream).await,
        };
        match initial {
            Ok(Initial::SslRequest) | Ok(Initial::GssEncRequest) => write(stream, b"N").await?,
            Ok(Initial::Cancel { pid, secret }) => {
                if let Some(c) = app.registry.cancel(pid, secret) {
                    let to = c.to.clone();
                    // the server is held back until this ends: bounded like a server login
                    let timeout = app
                        .config()
                        .pgmux
                        .server_connect_timeout
                        .get()
                        .unwrap_or(cancel::DEFAULT_TIMEOUT);
                    if let Err(e) = cancel::send_cancel(c, timeout).await {
                        tracing::warn!("sending cancel to {to} failed: {e}");
                    }
                }
                return Err(Refusal::silent("cancel request served"));
            }
            Ok(Initial::Startup(p)) => return Ok(p),
            Err(StartupError::Closed) => return Err(Refusal::silent("closed before startup")),
            Err(StartupError::Io(e)) => {
                return Err(Refusal::silent(format!("startup read failed: {e}")))
            }
            Err(e) => return Err(Refusal::with(PgError::fatal(e.sqlstate(), e.to_string()))),
        }
    }
    Err(Refusal::with(PgError::fatal(
        "08P01",
        "too many encryption requests",
    )))
}

/// The settings a client asked for at startup, `options` unpacked.
fn startup_settings(app: &App, p: &StartupPacket) -> Result<Vec<(String, String)>, Refusal> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in &p.params {
        match k.as_str() {
            "user" | "database" | "fallback_application_name" => {}
            "replication" => {
                return Err(Refusal::with(PgError::fatal(
                    "0A000",
                    "replication connections are not supported by pgmux",
                )))
            }
            "options" => {
                let opts = startup::parse_options(v)
                    .map_err(|m| Refusal::with(PgError::fatal("08P01", m)))?;
                out.extend(opts);
            }
            _ => out.push((k.clone(), v.clone())),
        }
    }
    if !out.iter().any(|(k, _)| k == "application_name") {
        if let Some(v) = p.get("fallback_application_name") {
            out.push(("application_name".into(), v.into()));
        }
    }
    if out.len() > app.config().pgmux.max_startup_parameters as usize {
        return Err(Refusal::with(PgError::fatal(
            "08P01",
            "too many startup parameters",
        )));
    }
    Ok(out)
}

/// The parameters of a real server for a new client: its pool's (the primary's), else,
/// for a database with replicas whose primary cannot be reached, a replica's, so that reads
/// keep working for new clients too while the primary is down.
async fn any_baseline(
    app: &App,
    database: &crate::config::Database,
    user: &str,
    pool: &Arc<Pool>,
) -> Result<Arc<Params>, PgError> {
    let first = baseline(pool).await;
    if first.is_ok() || !database.has_replicas() {
        return first;
    }
    for other in app.host_pools(database, user) {
        if Arc::ptr_eq(&other, pool) {
            continue;
        }
        if let Ok(b) = baseline(&other).await {
            return Ok(b);
        }
    }
    first
}

/// The parameters of a real server of this pool, connecting once if none has yet.
async fn baseline(pool: &Arc<Pool>) -> Result<Arc<Params>, PgError> {
    if let Some(b) = pool.baseline() {
        return Ok(b);
    }
    let conn = pool.checkout().await.map_err(server_unavailable)?;
    conn.release();
    pool.baseline()
        .ok_or_else(|| PgError::fatal("08006", "server parameters unavailable"))
}

/// The error a client sees when its pool cannot give it a server.
pub fn server_unavailable(e: PoolError) -> PgError {
    match e {
        PoolError::Server(ServerError::Refused(f)) => PgError {
            severity: "FATAL",
            code: f.code,
            message: f.message,
        },
        PoolError::WaitTimeout => PgError::fatal("08P01", "query_wait_timeout"),
        PoolError::Closed => PgError::fatal("57P01", "pool is closed"),
        PoolError::Cancelled => PgError::error("57014", "canceling statement due to user request"),
        PoolError::Server(e) => {
            PgError::fatal("08006", format!("pgmux could not connect to server: {e}"))
        }
    }
}

fn welcome(out: &mut BytesMut, baseline: &Params, wants: &Params, cancel: &CancelKey) {
    for (k, v) in baseline.iter() {
        messages::parameter_status(out, k.as_bytes(), wants.get(k).unwrap_or(v).as_bytes());
    }
    messages::backend_key_data(out, cancel.pid, cancel.secret);
    messages::ready_for_query(out, b'I');
}
