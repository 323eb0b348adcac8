//! The TOML configuration: schema (serde, unknown keys refused), defaults that follow
//! PgBouncer's names and meanings, and validation that names what is wrong.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

pub use crate::router::config::{Consistency, HostSpec, PrimaryReads, RoutingConfig};
use crate::topology::HostConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Session,
    Transaction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AuthType {
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Seconds as PgBouncer writes them; fractions allowed, 0 disables where that makes sense.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Seconds(pub f64);

impl Seconds {
    /// None when the timeout is disabled (0).
    pub fn get(self) -> Option<Duration> {
        (self.0 > 0.0).then(|| Duration::from_secs_f64(self.0))
    }

    /// Refuses what is not a duration, naming the setting: a negative value (which every
    /// check `> 0` would silently read as "off"), NaN, infinity, and values so large that
    /// `get` or a deadline computed from it would overflow.
    fn check(self, key: &str) -> Result<(), String> {
        if !(0.0..=MAX_SECONDS).contains(&self.0) {
            return Err(format!(
                "{key} must be a number of seconds from 0 to {MAX_SECONDS}, not {}",
                self.0
            ));
        }
        Ok(())
    }
}

/// Largest duration a setting may hold (about 31 years: longer is "never" for all of them).
pub const MAX_SECONDS: f64 = 1e9;

/// The secret of a role that may log in now (a role whose VALID UNTIL has passed gets no
/// row), as PostgreSQL stores it. Reading pg_shadow takes a superuser: see docs/security.md
/// for a SECURITY DEFINER function that an unprivileged auth_user can call instead.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_catalog.pg_shadow \
     WHERE usename = $1 AND (valuntil IS NULL OR valuntil > now())";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct General {
    pub listen_addr: String,
    pub listen_port: u16,
    pub pool_mode: PoolMode,
    pub default_pool_size: u32,
    pub min_pool_size: u32,
    pub reserve_pool_size: u32,
    pub reserve_pool_timeout: Seconds,
    pub max_client_conn: u32,
    pub so_reuseport: bool,
    /// Threads serving clients: 0 one per core, 1 a single thread (PgBouncer's model).
    pub workers: u32,
    /// Run pgmux's threads under Linux's SCHED_BATCH policy (`sched`).
    pub sched_batch: bool,
    /// Directory of a Unix socket `.s.PGSQL.<listen_port>` for local clients; empty: none.
    pub unix_socket_dir: String,
    /// Its permissions, in octal as PgBouncer writes them.
    pub unix_socket_mode: String,
    pub max_db_connections: u32,
    pub auth_type: AuthType,
    pub auth_timeout: Seconds,
    pub query_wait_timeout: Seconds,
    pub server_connect_timeout: Seconds,
    /// After a failed server connection or login, how long the pool waits before opening
    /// connections for min_pool_size again.
    pub server_login_retry: Seconds,
    pub server_idle_timeout: Seconds,
    pub server_lifetime: Seconds,
    pub client_idle_timeout: Seconds,
    pub idle_transaction_timeout: Seconds,
    /// A request a server has not answered within this closes the client and the server.
    pub query_timeout: Seconds,
    /// Run on a server idle longer than server_check_delay before it is lent; empty: never.
    pub server_check_query: String,
    pub server_check_delay: Seconds,
    /// TCP keepalive on client and server sockets (see `sockopts`); 0: the OS default.
    pub tcp_keepalive: bool,
    pub tcp_keepidle: u32,
    pub tcp_keepintvl: u32,
    pub tcp_keepcnt: u32,
    /// Milliseconds sent data may stay unacknowledged before the connection fails; 0: OS.
    pub tcp_user_timeout: u32,
    pub server_reset_query: String,
    pub server_reset_query_always: bool,
    /// Transaction mode: when a server comes free, up to this many waiting clients whose
    /// request is one standalone simple query get it sent together (`batch`); 0 or 1: off.
    pub server_batch_size: u32,
    /// Batches on: for this many milliseconds after a pool ran out of servers, such
    /// requests that come together go to one idle server in one write, rather than one
    /// each (`pool::State::gathers`); 0: never.
    pub server_batch_gather_ms: u64,
    /// Transaction mode: a client's lone BEGIN is answered by pgmux and sent to a server
    /// with the client's next request (`relay::begin`), so it takes no server of its own.
    pub defer_begin: bool,
    pub shutdown_timeout: Seconds,
    pub max_message_size: u32,
    pub max_startup_parameters: u32,
    pub max_prepared_statements: u32,
    pub log_level: String,
    pub log_format: LogFormat,
    /// Log each client login (PgBouncer's names and defaults; at level info).
    pub log_connections: bool,
    /// Log each client's end and why it ended (at level info).
    pub log_disconnections: bool,
    /// Address of the HTTP listener for /metrics, /health and /ready.
    pub metrics_listen_addr: String,
    /// Its port; 0 turns the listener off.
    pub metrics_listen_port: u16,
    /// Users (from [[users]]) who get every admin console command.
    pub admin_users: Vec<String>,
    /// Users (from [[users]]) who may only run SHOW commands on the console.
    pub stats_users: Vec<String>,
    /// How often the averages of SHOW STATS are recomputed.
    pub stats_period: Seconds,
    // TLS and hba (issue 7); loaded into `Config::security`, see src/tls.rs
    pub client_tls_sslmode: crate::tls::ClientSslMode,
    pub client_tls_cert_file: String,
    pub client_tls_key_file: String,
    pub client_tls_ca_file: String,
    pub server_tls_sslmode: crate::tls::ServerSslMode,
    pub server_tls_ca_file: String,
    pub server_tls_cert_file: String,
    pub server_tls_key_file: String,
    pub auth_hba_file: String,
    /// A user of [[users]] as whom pgmux looks up the secrets of users not in the config
    /// with `auth_query` (PgBouncer's auth_user); empty turns the lookup off.
    pub auth_user: String,
    /// The lookup: `$1` is the user name; it returns (name, secret) and no row for a user
    /// who may not log in.
    pub auth_query: String,
    /// The database the lookup runs in; empty means the database the client asked for.
    pub auth_dbname: String,
    /// How long a looked-up secret is reused before it is looked up again.
    pub auth_cache_ttl: Seconds,
    /// Statements running at least this long (milliseconds) are logged; 0 turns it off.
    pub log_min_duration_ms: u64,
}

impl General {
    /// Every duration setting, by key (all checked by `Seconds::check`).
    fn durations(&self) -> [(&'static str, Seconds); 14] {
        [
            ("reserve_pool_timeout", self.reserve_pool_timeout),
            ("auth_timeout", self.auth_timeout),
            ("query_wait_timeout", self.query_wait_timeout),
            ("server_connect_timeout", self.server_connect_timeout),
            ("server_login_retry", self.server_login_retry),
            ("server_idle_timeout", self.server_idle_timeout),
            ("server_lifetime", self.server_lifetime),
            ("client_idle_timeout", self.client_idle_timeout),
            ("idle_transaction_timeout", self.idle_transaction_timeout),
            ("query_timeout", self.query_timeout),
            ("server_check_delay", self.server_check_delay),
            ("shutdown_timeout", self.shutdown_timeout),
            ("stats_period", self.stats_period),
            ("auth_cache_ttl", self.auth_cache_ttl),
        ]
    }
}

/// Most threads `workers` may ask for.
pub const MAX_WORKERS: u32 = 1024;

/// A file mode written in octal ("0777", "777" or "0o777"); None if it is not one.
pub fn parse_socket_mode(s: &str) -> Option<u32> {
    let digits = s.trim().trim_start_matches("0o");
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
}

impl Default for General {
    fn default() -> Self {
        General {
            listen_addr: "127.0.0.1".into(),
            listen_port: 6432,
            pool_mode: PoolMode::Transaction,
            default_pool_size: 20,
            min_pool_size: 0,
            reserve_pool_size: 0,
            reserve_pool_timeout: Seconds(5.0),
            max_client_conn: 10_000,
            so_reuseport: false,
            workers: 0,
            sched_batch: true,
            unix_socket_dir: String::new(),
            unix_socket_mode: "0777".into(),
            max_db_connections: 0,
            auth_type: AuthType::ScramSha256,
            auth_timeout: Seconds(60.0),
            query_wait_timeout: Seconds(120.0),
            server_connect_timeout: Seconds(15.0),
            server_login_retry: Seconds(15.0),
            server_idle_timeout: Seconds(600.0),
            server_lifetime: Seconds(3600.0),
            client_idle_timeout: Seconds(0.0),
            idle_transaction_timeout: Seconds(0.0),
            query_timeout: Seconds(0.0),
            server_check_query: "select 1".into(),
            server_check_delay: Seconds(30.0),
            tcp_keepalive: true,
            tcp_keepidle: 0,
            tcp_keepintvl: 0,
            tcp_keepcnt: 0,
            tcp_user_timeout: 0,
            server_reset_query: "DISCARD ALL".into(),
            server_reset_query_always: false,
            server_batch_size: 16,
            server_batch_gather_ms: 1000,
            defer_begin: true,
            shutdown_timeout: Seconds(30.0),
            max_message_size: 256 * 1024 * 1024,
            max_startup_parameters: 64,
            max_prepared_statements: 200,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            log_connections: true,
            log_disconnections: true,
            metrics_listen_addr: "127.0.0.1".into(),
            metrics_listen_port: 9930,
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            stats_period: Seconds(60.0),
            client_tls_sslmode: crate::tls::ClientSslMode::Disable,
            client_tls_cert_file: String::new(),
            client_tls_key_file: String::new(),
            client_tls_ca_file: String::new(),
            // as PgBouncer and libpq: TLS when the server offers it
            server_tls_sslmode: crate::tls::ServerSslMode::Prefer,
            server_tls_ca_file: String::new(),
            server_tls_cert_file: String::new(),
            server_tls_key_file: String::new(),
            auth_hba_file: String::new(),
            auth_user: String::new(),
            auth_query: DEFAULT_AUTH_QUERY.into(),
            auth_dbname: String::new(),
            auth_cache_ttl: Seconds(10.0),
            log_min_duration_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Plain text, "md5..." or a SCRAM verifier.
    pub password: Option<String>,
    /// Overrides the pool size of every pool of this user.
    pub pool_size: Option<u32>,
    pub pool_mode: Option<PoolMode>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub name: String,
    /// The primary (or only) server. Optional when `hosts` lists the servers instead.
    #[serde(default)]
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    pub dbname: Option<String>,
    pub pool_size: Option<u32>,
    pub min_pool_size: Option<u32>,
    pub reserve_pool_size: Option<u32>,
    pub max_db_connections: Option<u32>,
    pub pool_mode: Option<PoolMode>,
    pub server_user: Option<String>,
    pub server_password: Option<String>,
    /// This database's auth_user, instead of the global one.
    pub auth_user: Option<String>,
    // ---- read/write splitting (issue 3): the keys of `router::config::RoutingConfig`,
    // copied because serde cannot combine `flatten` with `deny_unknown_fields`. Defaults and
    // meanings are RoutingConfig's; `Database::routing()` gives them back as one.
    #[serde(default)]
    pub read_write_split: bool,
    #[serde(default)]
    pub primary_reads: PrimaryReads,
    #[serde(default)]
    pub consistency: Consistency,
    #[serde(default = "routing_default::max_replica_lag_bytes")]
    pub max_replica_lag_bytes: u64,
    #[serde(default = "routing_default::max_replica_lag_ms")]
    pub max_replica_lag_ms: u64,
    #[serde(default)]
    pub write_functions: Vec<String>,
    #[serde(default)]
    pub replicas: Vec<HostSpec>,
    #[serde(default)]
    pub hosts: Vec<HostSpec>,
    #[serde(default = "routing_default::lag_check_interval")]
    pub lag_check_interval: Seconds,
    #[serde(default = "routing_default::ban_time")]
    pub ban_time: Seconds,
    /// Where this database's clients go: `auto` (by statement), `primary`, or `replica` (a
    /// replica-only alias such as `app_ro`).
    #[serde(default)]
    pub route: DbRoute,
}

/// A database's fixed route (`route = ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DbRoute {
    #[default]
    Auto,
    Primary,
    Replica,
}

mod routing_default {
    use crate::router::config::RoutingConfig;
    pub fn max_replica_lag_bytes() -> u64 {
        RoutingConfig::default().max_replica_lag_bytes
    }
    pub fn max_replica_lag_ms() -> u64 {
        RoutingConfig::default().max_replica_lag_ms
    }
    pub fn lag_check_interval() -> super::Seconds {
        RoutingConfig::default().lag_check_interval
    }
    pub fn ban_time() -> super::Seconds {
        RoutingConfig::default().ban_time
    }
}

impl Database {
    /// The routing keys as one `RoutingConfig`.
    pub fn routing(&self) -> RoutingConfig {
        RoutingConfig {
            read_write_split: self.read_write_split,
            primary_reads: self.primary_reads,
            consistency: self.consistency,
            max_replica_lag_bytes: self.max_replica_lag_bytes,
            max_replica_lag_ms: self.max_replica_lag_ms,
            write_functions: self.write_functions.clone(),
            replicas: self.replicas.clone(),
            hosts: self.hosts.clone(),
            lag_check_interval: self.lag_check_interval,
            ban_time: self.ban_time,
        }
    }

    /// Several servers (replicas or a host list): a topology monitor and a pool per host.
    pub fn has_replicas(&self) -> bool {
        !self.replicas.is_empty() || !self.hosts.is_empty()
    }

    /// Every server of the database, in pool order: the `hosts`, or `host` then `replicas`.
    pub fn server_hosts(&self) -> Vec<HostConfig> {
        self.routing().monitored_hosts((&self.host, self.port))
    }
}

fn default_pg_port() -> u16 {
    5432
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub pgmux: General,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub databases: Vec<Database>,
    /// TLS configs and hba rules built from the settings above when the file is loaded.
    #[serde(skip)]
    pub security: crate::tls::Security,
}

/// Whether the TOML text (already parsed once) has a `[pgmux]` table.
fn has_general_section(text: &str) -> bool {
    toml::from_str::<toml::Table>(text).is_ok_and(|t| t.contains_key("pgmux"))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// `origin` names the source in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        // an empty or truncated file (a deploy cut short) would otherwise be a valid
        // configuration with no database and no user, and a reload would apply it
        if !has_general_section(text) {
            return Err(ConfigError::Invalid {
                path: origin.to_string(),
                message: "the [pgmux] section is missing".into(),
            });
        }
        config.validated(origin)
    }

    /// Checks a configuration built in memory (SET on the console) as a loaded one is.
    pub fn validated(mut self, origin: &str) -> Result<Config, ConfigError> {
        let invalid = |message| ConfigError::Invalid {
            path: origin.to_string(),
            message,
        };
        self.validate().map_err(invalid)?;
        self.security = crate::tls::Security::load(&self.pgmux).map_err(invalid)?;
        Ok(self)
    }

    fn validate(&self) -> Result<(), String> {
        let g = &self.pgmux;
        if g.default_pool_size == 0 {
            return Err("default_pool_size must be at least 1".into());
        }
        if g.max_message_size < 1024 {
            return Err("max_message_size must be at least 1024".into());
        }
        if g.server_reset_query.contains('\0') {
            return Err("server_reset_query must not contain NUL".into());
        }
        for (key, value) in g.durations() {
            value.check(key)?;
        }
        if g.stats_period.0 < 1.0 {
            return Err("stats_period must be at least 1 second".into());
        }
        // beyond this the runtime would fail to start its threads (a panic in tokio)
        if g.workers > MAX_WORKERS {
            return Err(format!("workers must be at most {MAX_WORKERS}"));
        }
        if parse_socket_mode(&g.unix_socket_mode).is_none() {
            return Err(format!(
                "unix_socket_mode {:?} is not an octal mode such as \"0777\"",
                g.unix_socket_mode
            ));
        }
        if !g.unix_socket_dir.is_empty() && !g.unix_socket_dir.starts_with('/') {
            return Err(format!(
                "unix_socket_dir {:?} must be an absolute path",
                g.unix_socket_dir
            ));
        }
        if !g.metrics_listen_addr.is_empty()
            && g.metrics_listen_addr.parse::<std::net::IpAddr>().is_err()
        {
            return Err(format!(
                "metrics_listen_addr {:?} is not an IP address",
                g.metrics_listen_addr
            ));
        }
        for name in g.admin_users.iter().chain(&g.stats_users) {
            if self.user(name).is_none() {
                return Err(format!(
                    "admin_users/stats_users: {name:?} is not a user in [[users]]"
                ));
            }
        }
        for db in &self.databases {
            if crate::admin::is_console_db(&db.name) {
                return Err(format!(
                    "database {:?} is reserved for the admin console",
                    db.name
                ));
            }
        }
        unique(self.users.iter().map(|u| u.name.as_str()), "user")?;
        unique(self.databases.iter().map(|d| d.name.as_str()), "database")?;
        for db in &self.databases {
            if db.name.is_empty() {
                return Err("every database needs a name".into());
            }
            if db.host.is_empty() && db.hosts.is_empty() {
                return Err(format!(
                    "database {:?} needs a host (or a hosts list)",
                    db.name
                ));
            }
            if !db.host.is_empty() && !db.hosts.is_empty() {
                return Err(format!(
                    "database {:?}: give either host/port (with replicas) or hosts, not both",
                    db.name
                ));
            }
            for (key, value) in [
                ("lag_check_interval", db.lag_check_interval),
                ("ban_time", db.ban_time),
            ] {
                value
                    .check(key)
                    .map_err(|e| format!("database {:?}: {e}", db.name))?;
            }
            let primary = (!db.host.is_empty()).then_some((db.host.as_str(), db.port));
            db.routing()
                .validate(primary)
                .map_err(|e| format!("database {:?}: {e}", db.name))?;
            if db.route == DbRoute::Replica && !db.has_replicas() {
                return Err(format!(
                    "database {:?}: route = \"replica\" needs replicas or hosts",
                    db.name
                ));
            }
            if db.pool_size == Some(0) {
                return Err(format!(
                    "database {:?}: pool_size must be at least 1",
                    db.name
                ));
            }
            if db.server_password.is_some() && db.server_user.is_none() {
                return Err(format!(
                    "database {:?}: server_password needs server_user",
                    db.name
                ));
            }
        }
        let auth_db = &self.pgmux.auth_dbname;
        if !auth_db.is_empty() && self.database(auth_db).is_none() {
            return Err(format!(
                "auth_dbname {auth_db:?} is not a [[databases]] entry"
            ));
        }
        for u in &self.users {
            if u.name.is_empty() {
                return Err("every user needs a name".into());
            }
            if u.pool_size == Some(0) {
                return Err(format!("user {:?}: pool_size must be at least 1", u.name));
            }
        }
        Ok(())
    }

    /// The user whose connections look up unknown users for `db`, if auth_query is on there.
    pub fn auth_user_for<'a>(&'a self, db: &'a Database) -> Option<&'a str> {
        db.auth_user
            .as_deref()
            .or(Some(self.pgmux.auth_user.as_str()))
            .filter(|u| !u.is_empty())
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn database(&self, name: &str) -> Option<&Database> {
        self.databases.iter().find(|d| d.name == name)
    }
}

fn unique<'a>(names: impl Iterator<Item = &'a str>, what: &str) -> Result<(), String> {
    let mut seen = HashSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err(format!("{what} {n:?} is defined twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_form_parses() {
        let c = Config::parse(
            r#"
[pgmux]
listen_addr = "127.0.0.1"
listen_port = 6432
pool_mode = "transaction"
default_pool_size = 20
max_client_conn = 10000
auth_type = "scram-sha-256"

[[users]]
name = "app"
password = "secret"

[[databases]]
name = "app"
host = "127.0.0.1"
port = 5432
dbname = "app"
pool_size = 20
"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.pgmux.pool_mode, PoolMode::Transaction);
        assert_eq!(c.pgmux.auth_type, AuthType::ScramSha256);
        assert_eq!(c.databases[0].pool_size, Some(20));
        assert_eq!(
            c.pgmux.query_wait_timeout.get(),
            Some(Duration::from_secs(120))
        );
        assert_eq!(c.pgmux.client_idle_timeout.get(), None);
    }

    #[test]
    fn unknown_keys_name_key_line_and_column() {
        let err = Config::parse("[pgmux]\nlisten_port = 1\npool_sise = 3\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pool_sise"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("column 1"), "{err}");
    }

    #[test]
    fn wrong_types_and_values_are_refused() {
        assert!(Config::parse("[pgmux]\npool_mode = \"statement\"\n", "t").is_err());
        assert!(Config::parse("[pgmux]\nlisten_port = \"x\"\n", "t").is_err());
        // new settings of the fourth session: bad values are errors that name the key
        for (bad, key) in [
            ("workers = 100000", "workers"),
            ("unix_socket_mode = \"rwx\"", "unix_socket_mode"),
            ("unix_socket_mode = \"0999\"", "unix_socket_mode"),
            ("unix_socket_dir = \"relative/dir\"", "unix_socket_dir"),
        ] {
            let err = Config::parse(&format!("[pgmux]\n{bad}\n"), "t").unwrap_err();
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
        assert!(Config::parse(
            "[pgmux]\nworkers = 1024\nunix_socket_mode = \"0o700\"\n",
            "t"
        )
        .is_ok());
        assert!(Config::parse("[pgmux]\ndefault_pool_size = 0\n", "t").is_err());
        // an empty or truncated file is refused, not taken for a configuration of nothing
        for empty in ["", "\n# comment\n", "[[users]]\nname='a'\n"] {
            let err = Config::parse(empty, "t").unwrap_err().to_string();
            assert!(err.contains("[pgmux]"), "{empty:?}: {err}");
        }
        let twice = "[pgmux]\n[[users]]\nname='a'\n[[users]]\nname='a'\n";
        assert!(Config::parse(twice, "t")
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }

    #[test]
    fn durations_must_be_zero_or_more_seconds() {
        // every float in [pgmux] is a duration, and every duration is checked
        let defaults = toml::Value::try_from(General::default()).unwrap();
        let mut floats: Vec<&str> = defaults
            .as_table()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.is_float())
            .map(|(k, _)| k.as_str())
            .collect();
        floats.sort();
        let mut checked: Vec<&str> = General::default()
            .durations()
            .iter()
            .map(|(k, _)| *k)
            .collect();
        checked.sort();
        assert_eq!(floats, checked);
        for key in checked {
            for bad in ["-1.0", "-1", "-0.001", "nan", "inf", "-inf", "1e10"] {
                let err = Config::parse(&format!("[pgmux]\n{key} = {bad}\n"), "t")
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(key), "{key} = {bad}: {err}");
            }
            let floor = if key == "stats_period" { "1" } else { "0" };
            for good in [floor, "1.5", "1e9"] {
                let c = Config::parse(&format!("[pgmux]\n{key} = {good}\n"), "t");
                assert!(c.is_ok(), "{key} = {good}: {:?}", c.err());
            }
        }
        let db = "[pgmux]\n[[databases]]\nname = 'app'\nhost = 'h'\n";
        for (bad, key) in [
            ("ban_time = -1", "ban_time"),
            ("ban_time = inf", "ban_time"),
            ("lag_check_interval = nan", "lag_check_interval"),
            ("lag_check_interval = 1e300", "lag_check_interval"),
        ] {
            let err = Config::parse(&format!("{db}{bad}\n"), "t")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("\"app\""), "{bad}: {err}");
        }
    }

    #[test]
    fn routing_keys_parse_and_are_validated() {
        let base = "[pgmux]\n[[users]]\nname='a'\n[[databases]]\nname='app'\n";
        let c = Config::parse(
            &format!(
                "{base}host='p'\nread_write_split=true\nreplicas=[{{host='r1'}},{{host='r2',port=5433,weight=2}}]\n\
                 [[databases]]\nname='app_ro'\ndbname='app'\nhost='p'\nroute='replica'\nreplicas=[{{host='r1'}}]\n"
            ),
            "t",
        )
        .unwrap();
        let db = c.database("app").unwrap();
        assert!(db.read_write_split && db.has_replicas());
        assert_eq!(db.consistency, Consistency::ReadYourWrites);
        assert_eq!(db.max_replica_lag_ms, 1000);
        let hosts = db.server_hosts();
        assert_eq!(hosts.len(), 3);
        assert_eq!((hosts[2].host.as_str(), hosts[2].port), ("r2", 5433));
        assert_eq!(c.database("app_ro").unwrap().route, DbRoute::Replica);
        // hosts without host
        let c = Config::parse(&format!("{base}hosts=[{{host='a'}},{{host='b'}}]\n"), "t").unwrap();
        assert_eq!(c.database("app").unwrap().server_hosts().len(), 2);
        for (bad, needle) in [
            ("port=1\n", "needs a host"),
            ("host='p'\nhosts=[{host='a'}]\n", "not both"),
            ("host='p'\nroute='replica'\n", "needs replicas"),
            (
                "host='p'\nread_write_split=true\n",
                "read_write_split needs",
            ),
            ("host='p'\nreplicas=[{host='p'}]\n", "listed twice"),
            ("host='p'\nconsistency='strong'\n", "consistency"),
            ("host='p'\nroute='sideways'\n", "route"),
        ] {
            let err = Config::parse(&format!("{base}{bad}"), "t")
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
