//! Per-database routing settings (read/write splitting, replicas, lag limits, failover host
//! lists) as plain serde structs. They are meant to be folded into `config::Database`; until
//! then they parse and validate on their own.
//!
//! Folding note: serde's `deny_unknown_fields` does not work together with `#[serde(flatten)]`,
//! so the fields have to be copied into `Database` rather than flattened into it.

use crate::config::Seconds;
use crate::topology::{HostConfig, Role};
use serde::Deserialize;
use std::collections::HashSet;

/// Whether the primary serves reads too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrimaryReads {
    /// Never: with no usable replica, a read fails with a clear error.
    Never,
    /// Only when no replica is usable (banned, down, lagging or behind the client's writes).
    #[default]
    Fallback,
    /// The primary takes a share of the reads like a replica of weight 1.
    Always,
}

/// What a client may read after its own writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// A client's reads after a write go only to replicas that have replayed that write.
    #[default]
    ReadYourWrites,
    /// Any replica within the lag limits.
    Eventual,
}

/// One server: a replica in `replicas`, or any host in `hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Relative share of the reads among usable replicas.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_port() -> u16 {
    5432
}

fn default_weight() -> u32 {
    1
}

/// The routing keys of a `[[databases]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub read_write_split: bool,
    pub primary_reads: PrimaryReads,
    pub consistency: Consistency,
    /// A replica further behind the primary than this takes no reads; 0 = no limit.
    pub max_replica_lag_bytes: u64,
    /// A replica whose replay is older than this takes no reads; 0 = no limit.
    pub max_replica_lag_ms: u64,
    /// Functions that write: a SELECT calling one goes to the primary.
    pub write_functions: Vec<String>,
    /// Streaming replicas of the database's `host`/`port`.
    pub replicas: Vec<HostSpec>,
    /// Instead of host/port/replicas: every server, roles found by asking them, so a promotion
    /// is followed.
    pub hosts: Vec<HostSpec>,
    /// How often each host is checked (role, WAL position, lag).
    pub lag_check_interval: Seconds,
    /// How long a host that failed a check or a connect gets no traffic.
    pub ban_time: Seconds,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            read_write_split: false,
            primary_reads: PrimaryReads::Fallback,
            consistency: Consistency::ReadYourWrites,
            max_replica_lag_bytes: 16 * 1024 * 1024,
            max_replica_lag_ms: 1000,
            write_functions: Vec::new(),
            replicas: Vec::new(),
            hosts: Vec::new(),
            lag_check_interval: Seconds(1.0),
            ban_time: Seconds(30.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingConfigError {
    #[error("use either replicas (with host/port as the primary) or hosts, not both")]
    ReplicasAndHosts,
    #[error("read_write_split needs replicas or hosts")]
    NothingToSplitTo,
    #[error("every replica or host needs a host")]
    EmptyHost,
    #[error("host {0} is listed twice")]
    DuplicateHost(String),
    #[error("host {0}: weight must be at least 1")]
    ZeroWeight(String),
    #[error("lag_check_interval must be more than 0")]
    NoCheckInterval,
    #[error("ban_time must not be negative")]
    NegativeBanTime,
    #[error("write_functions entries must not be empty")]
    EmptyWriteFunction,
}

impl RoutingConfig {
    /// Checks what serde cannot. `primary` is the database's own host and port, which the
    /// `replicas` form uses as the primary (and which must not be listed again).
    pub fn validate(&self, primary: Option<(&str, u16)>) -> Result<(), RoutingConfigError> {
        if !self.replicas.is_empty() && !self.hosts.is_empty() {
            return Err(RoutingConfigError::ReplicasAndHosts);
        }
        if self.read_write_split && self.replicas.is_empty() && self.hosts.is_empty() {
            return Err(RoutingConfigError::NothingToSplitTo);
        }
        let mut seen = HashSet::new();
        if self.hosts.is_empty() {
            if let Some((host, port)) = primary {
                seen.insert(format!("{host}:{port}"));
            }
        }
        for h in self.replicas.iter().chain(&self.hosts) {
            if h.host.is_empty() {
                return Err(RoutingConfigError::EmptyHost);
            }
            let addr = format!("{}:{}", h.host, h.port);
            if h.weight == 0 {
                return Err(RoutingConfigError::ZeroWeight(addr));
            }
            if !seen.insert(addr.clone()) {
                return Err(RoutingConfigError::DuplicateHost(addr));
            }
        }
        if self.lag_check_interval.get().is_none() {
            return Err(RoutingConfigError::NoCheckInterval);
        }
        if self.ban_time.0 < 0.0 {
            return Err(RoutingConfigError::NegativeBanTime);
        }
        if self.write_functions.iter().any(|f| f.trim().is_empty()) {
            return Err(RoutingConfigError::EmptyWriteFunction);
        }
        Ok(())
    }

    /// The hosts the topology monitor watches: with `hosts`, those (roles unknown until asked);
    /// otherwise `primary` (the database's host and port) followed by the replicas.
    pub fn monitored_hosts(&self, primary: (&str, u16)) -> Vec<HostConfig> {
        if !self.hosts.is_empty() {
            return self
                .hosts
                .iter()
                .map(|h| HostConfig {
                    host: h.host.clone(),
                    port: h.port,
                    configured_role: None,
                })
                .collect();
        }
        std::iter::once(HostConfig {
            host: primary.0.to_string(),
            port: primary.1,
            configured_role: Some(Role::Primary),
        })
        .chain(self.replicas.iter().map(|h| HostConfig {
            host: h.host.clone(),
            port: h.port,
            configured_role: Some(Role::Replica),
        }))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RoutingConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn the_issue_form_parses() {
        let c = parse(
            r#"
read_write_split = true
primary_reads = "fallback"
consistency = "read_your_writes"
max_replica_lag_bytes = 16777216
max_replica_lag_ms = 1000
write_functions = ["audit_log_insert"]
replicas = [ { host = "127.0.0.1", port = 5433 }, { host = "127.0.0.1", port = 5434, weight = 2 } ]
lag_check_interval = 0.5
ban_time = 10
"#,
        )
        .unwrap();
        assert!(c.read_write_split);
        assert_eq!(c.primary_reads, PrimaryReads::Fallback);
        assert_eq!(c.consistency, Consistency::ReadYourWrites);
        assert_eq!(c.replicas.len(), 2);
        assert_eq!(c.replicas[0].weight, 1);
        assert_eq!(c.replicas[1].weight, 2);
        assert_eq!(c.lag_check_interval, Seconds(0.5));
        assert_eq!(c.ban_time, Seconds(10.0));
        c.validate(Some(("127.0.0.1", 5432))).unwrap();
        let hosts = c.monitored_hosts(("127.0.0.1", 5432));
        assert_eq!(hosts.len(), 3);
        assert_eq!(hosts[0].configured_role, Some(Role::Primary));
        assert_eq!(hosts[2].port, 5434);
        assert_eq!(hosts[2].configured_role, Some(Role::Replica));
    }

    #[test]
    fn defaults_and_host_lists() {
        let c = parse("").unwrap();
        assert_eq!(c, RoutingConfig::default());
        c.validate(None).unwrap();
        let c = parse(
            "read_write_split = true\nconsistency = \"eventual\"\nprimary_reads = \"never\"\n\
             hosts = [ { host = \"a\" }, { host = \"b\", port = 5433 } ]\n",
        )
        .unwrap();
        assert_eq!(c.consistency, Consistency::Eventual);
        assert_eq!(c.primary_reads, PrimaryReads::Never);
        assert_eq!(c.hosts[0].port, 5432);
        c.validate(Some(("a", 5432))).unwrap();
        let hosts = c.monitored_hosts(("ignored", 1));
        assert_eq!(hosts.len(), 2);
        assert!(hosts.iter().all(|h| h.configured_role.is_none()));
    }

    #[test]
    fn unknown_keys_and_values_are_refused() {
        let err = parse("read_write_splits = true").unwrap_err().to_string();
        assert!(err.contains("read_write_splits"), "{err}");
        assert!(parse("primary_reads = \"sometimes\"").is_err());
        assert!(parse("consistency = \"strong\"").is_err());
        assert!(parse("replicas = [ { host = \"a\", prot = 1 } ]").is_err());
    }

    #[test]
    fn validation_names_the_problem() {
        let check = |text: &str| parse(text).unwrap().validate(Some(("p", 5432)));
        assert_eq!(
            check("read_write_split = true"),
            Err(RoutingConfigError::NothingToSplitTo)
        );
        assert_eq!(
            check("replicas = [{host=\"a\"}]\nhosts = [{host=\"b\"}]"),
            Err(RoutingConfigError::ReplicasAndHosts)
        );
        assert_eq!(
            check("replicas = [{host=\"p\"}]"),
            Err(RoutingConfigError::DuplicateHost("p:5432".into()))
        );
        assert_eq!(
            check("hosts = [{host=\"a\"}, {host=\"a\", port=5432}]"),
            Err(RoutingConfigError::DuplicateHost("a:5432".into()))
        );
        assert_eq!(
            check("replicas = [{host=\"a\", weight=0}]"),
            Err(RoutingConfigError::ZeroWeight("a:5432".into()))
        );
        assert_eq!(
            check("replicas = [{host=\"\"}]"),
            Err(RoutingConfigError::EmptyHost)
        );
        assert_eq!(
            check("lag_check_interval = 0"),
            Err(RoutingConfigError::NoCheckInterval)
        );
        assert_eq!(
            check("ban_time = -1"),
            Err(RoutingConfigError::NegativeBanTime)
        );
        assert_eq!(
            check("write_functions = [\" \"]"),
            Err(RoutingConfigError::EmptyWriteFunction)
        );
        // The primary may appear in a hosts list: there it is just another host.
        assert_eq!(check("hosts = [{host=\"p\"}]"), Ok(()));
    }
}
