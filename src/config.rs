//! The TOML configuration: schema (serde, unknown keys refused), defaults that follow
//! PgBouncer's names and meanings, and validation that names what is wrong.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

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
}

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
    pub max_db_connections: u32,
    pub auth_type: AuthType,
    pub auth_timeout: Seconds,
    pub query_wait_timeout: Seconds,
    pub server_connect_timeout: Seconds,
    pub server_idle_timeout: Seconds,
    pub server_lifetime: Seconds,
    pub client_idle_timeout: Seconds,
    pub idle_transaction_timeout: Seconds,
    /// A request a server has not answered within this closes the client and the server.
    pub query_timeout: Seconds,
    pub server_reset_query: String,
    pub server_reset_query_always: bool,
    pub shutdown_timeout: Seconds,
    pub max_message_size: u32,
    pub max_startup_parameters: u32,
    pub max_prepared_statements: u32,
    pub log_level: String,
    pub log_format: LogFormat,
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
            max_db_connections: 0,
            auth_type: AuthType::ScramSha256,
            auth_timeout: Seconds(60.0),
            query_wait_timeout: Seconds(120.0),
            server_connect_timeout: Seconds(15.0),
            server_idle_timeout: Seconds(600.0),
            server_lifetime: Seconds(3600.0),
            client_idle_timeout: Seconds(0.0),
            idle_transaction_timeout: Seconds(0.0),
            query_timeout: Seconds(0.0),
            server_reset_query: "DISCARD ALL".into(),
            server_reset_query_always: false,
            shutdown_timeout: Seconds(30.0),
            max_message_size: 256 * 1024 * 1024,
            max_startup_parameters: 64,
            max_prepared_statements: 200,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            metrics_listen_addr: "127.0.0.1".into(),
            metrics_listen_port: 9930,
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            stats_period: Seconds(60.0),
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
        config.validate().map_err(|message| ConfigError::Invalid {
            path: origin.to_string(),
            message,
        })?;
        Ok(config)
    }

    /// Checks a configuration built in memory (SET on the console) as a loaded one is.
    pub fn validated(self, origin: &str) -> Result<Config, ConfigError> {
        self.validate().map_err(|message| ConfigError::Invalid {
            path: origin.to_string(),
            message,
        })?;
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
        if g.stats_period.0 < 1.0 {
            return Err("stats_period must be at least 1 second".into());
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
            if db.name.is_empty() || db.host.is_empty() {
                return Err("every database needs a name and a host".into());
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
        assert!(Config::parse("[pgmux]\ndefault_pool_size = 0\n", "t").is_err());
        let twice = "[[users]]\nname='a'\n[[users]]\nname='a'\n";
        assert!(Config::parse(twice, "t")
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }
}
