//! The process's life: start listening (clients, and the metrics endpoint), keep pools in
//! shape and statistics rolling, reload the configuration on SIGHUP, and on SIGTERM (drain),
//! SIGINT or the console's SHUTDOWN (safe shutdown) stop accepting and let clients finish
//! within shutdown_timeout.

use crate::app::{App, Shutdown};
use crate::config::Config;
use crate::listener;
use crate::metrics;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// How often pools are checked for min_pool_size, idle and lifetime limits.
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid listen_addr {0:?}")]
    ListenAddr(String),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("cannot listen on a Unix socket in {0}: {1}")]
    BindUnix(String, std::io::Error),
    #[error("invalid unix_socket_mode {0:?}: an octal mode such as \"0777\"")]
    SocketMode(String),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("cannot listen for metrics: {0}")]
    Metrics(std::io::Error),
}

/// The Unix socket in unix_socket_dir, when one is configured.
fn bind_unix(g: &crate::config::General) -> Result<Option<listener::Listener>, RunError> {
    if g.unix_socket_dir.is_empty() {
        return Ok(None);
    }
    let mode = crate::config::parse_socket_mode(&g.unix_socket_mode)
        .ok_or_else(|| RunError::SocketMode(g.unix_socket_mode.clone()))?;
    listener::bind_unix(&g.unix_socket_dir, g.listen_port, mode)
        .map(Some)
        .map_err(|e| RunError::BindUnix(g.unix_socket_dir.clone(), e))
}

/// Runs pgmux; `config_path` is where SIGHUP and RELOAD read the configuration again.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), RunError> {
    let g = &config.pgmux;
    let ip: IpAddr = g
        .listen_addr
        .parse()
        .map_err(|_| RunError::ListenAddr(g.listen_addr.clone()))?;
    let addr = SocketAddr::new(ip, g.listen_port);
    let listener = listener::bind(addr, g.so_reuseport).map_err(|e| RunError::Bind(addr, e))?;
    let unix = bind_unix(g)?;
    let app = App::with_path(config, config_path);
    app.start_monitors();
    let metrics_listener = metrics::bind(&app).await.map_err(RunError::Metrics)?;
    info!("pgmux {} listening on {addr}", env!("CARGO_PKG_VERSION"));
    if let Some(listener::Listener::Unix(_, _, file)) = &unix {
        info!("listening on {}", file.path().display());
    }
    let metrics_task = metrics_listener.map(|(l, maddr)| {
        info!("metrics on http://{maddr}/metrics");
        tokio::spawn(metrics::serve(app.clone(), l))
    });

    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;
    let maintenance = tokio::spawn(maintain(app.clone()));
    let accepting = tokio::spawn(listener::run(
        app.clone(),
        listener::Listener::Tcp(listener),
    ));
    let accepting_unix = unix.map(|l| tokio::spawn(listener::run(app.clone(), l)));
    let stage = loop {
        tokio::select! {
            _ = term.recv() => break Shutdown::Drain,
            _ = int.recv() => break Shutdown::Safe,
            _ = app.shutdown_requested.notified() => break app.requested_shutdown(),
            _ = hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                if let Err(e) = app.reload() {
                    error!("reload refused, the running configuration stays: {e}");
                }
            }
        }
    };
    info!(
        "shutting down ({stage:?}): no new clients; waiting for {} client(s)",
        app.client_count()
    );
    app.begin_shutdown(stage);
    let _ = accepting.await;
    if let Some(a) = accepting_unix {
        let _ = a.await;
    }
    // As PgBouncer 1.23: a second SIGTERM or SIGINT while a shutdown is under way ends it
    // at once. The console's SHUTDOWN (or SHUTDOWN WAIT_FOR_SERVERS) during a drain escalates
    // it to a safe shutdown; WAIT_FOR_CLIENTS during one changes nothing.
    let second_signal = async {
        loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = app.shutdown_requested.notified() => {
                    app.begin_shutdown(app.requested_shutdown());
                }
            }
        }
    };
    tokio::select! {
        _ = drain(&app) => {}
        signal = second_signal => {
            warn!(
                "{signal} during the shutdown: closing {} client(s) now",
                app.client_count()
            );
            close_all(&app).await;
        }
    }
    maintenance.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    for p in app.all_pools() {
        p.close();
    }
    info!("shutdown complete");
    Ok(())
}

async fn maintain(app: Arc<App>) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_roll = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        for p in app.all_pools() {
            p.maintain();
        }
        app.sweep_retired();
        let period = app
            .config()
            .pgmux
            .stats_period
            .get()
            .unwrap_or(Duration::from_secs(60));
        let since = last_roll.elapsed();
        if since >= period {
            app.roll_stats(since);
            last_roll = tokio::time::Instant::now();
        }
    }
}

/// Waits until every client has left, or shutdown_timeout; then closes those left.
async fn drain(app: &App) {
    let Some(t) = app.config().pgmux.shutdown_timeout.get() else {
        return all_gone(app).await;
    };
    if tokio::time::timeout(t, all_gone(app)).await.is_ok() {
        return;
    }
    warn!("shutdown_timeout: closing {} client(s)", app.client_count());
    close_all(app).await;
}

/// Closes every client now (at shutdown_timeout, or on a second signal), console sessions
/// included, and waits a little for them to go.
async fn close_all(app: &App) {
    // console sessions end at a safe shutdown; so do clients waiting for a server
    app.begin_shutdown(Shutdown::Safe);
    // told why (FATAL 57P01, as KILL tells them) rather than finding their socket closed;
    // a client that does not read its socket is not waited for long
    for c in app.registry.snapshot() {
        c.kill();
    }
    let _ = tokio::time::timeout(KILL_GRACE, all_gone(app)).await;
}

async fn all_gone(app: &App) {
    loop {
        let notified = app.no_clients.notified();
        if app.client_count() == 0 {
            return;
        }
        notified.await;
    }
}

/// How long clients closed at shutdown_timeout have to be told and go.
const KILL_GRACE: Duration = Duration::from_secs(2);
