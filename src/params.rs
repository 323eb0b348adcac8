//! Session parameters (GUCs) as pgmux tracks them: what a server reported or was told, and
//! what a client expects, so a server lent to a client is first brought to the client's
//! values with one round trip.

/// Reported parameters a client may change and pgmux keeps in step between servers.
/// Read-only ones (server_version, is_superuser, ...) are excluded: they cannot be SET.
pub const TRACKED: &[&str] = &[
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
];

/// Startup parameters that are not settings.
pub const NOT_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

pub fn is_tracked(name: &str) -> bool {
    TRACKED.iter().any(|t| t.eq_ignore_ascii_case(name))
}

/// Name/value pairs, names compared without regard to case as PostgreSQL does.
#[derive(Debug, Clone, Default)]
pub struct Params(Vec<(String, String)>, Changes);

/// How many times the pairs were touched: a server that was in step with a client's
/// settings stays so while this count holds (see `ServerConn::synced`).
#[derive(Debug, Clone, Copy, Default)]
struct Changes(u32);

impl PartialEq for Params {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}

impl Eq for Params {}

impl Params {
    /// Counts every set, remove and retain, whether or not it changed a value.
    pub fn changes(&self) -> u32 {
        self.1 .0
    }

    fn touched(&mut self) {
        self.1 .0 = self.1 .0.wrapping_add(1);
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.touched();
        match self
            .0
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some((_, v)) if v == value => {}
            Some((_, v)) => *v = value.to_string(),
            None => self.0.push((name.to_string(), value.to_string())),
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.touched();
        self.0.retain(|(k, _)| keep(k));
    }

    pub fn remove(&mut self, name: &str) {
        self.touched();
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The settings a client expects on any server it is lent: the tracked values of the pool's
/// baseline, overridden by what the client sent at startup or changed since.
pub fn client_wants(baseline: &Params, startup: &[(String, String)]) -> Params {
    let mut wants = Params::default();
    for name in TRACKED {
        if let Some(v) = baseline.get(name) {
            wants.set(name, v);
        }
    }
    for (k, v) in startup {
        wants.set(k, v);
    }
    wants
}

/// The statement that brings a server from `has` (plus the extra settings pgmux applied to
/// it earlier, `extras`) to `wants`, or None when they already agree.
///
/// ```
/// use pgmux::params::{sync_statement, Params};
/// let mut wants = Params::default();
/// wants.set("TimeZone", "UTC");
/// let has = Params::default();
/// assert_eq!(
///     sync_statement(&wants, &has, &["search_path".into()]).unwrap(),
///     "SELECT pg_catalog.set_config(E'TimeZone', E'UTC', false);RESET \"search_path\";"
/// );
/// ```
pub fn sync_statement(wants: &Params, has: &Params, extras: &[String]) -> Option<String> {
    let mut sql = String::new();
    // set_config takes a value as postgresql.conf would (lists such as search_path included),
    // which is also the form pg_settings reports
    for (name, value) in wants.iter() {
        if has.get(name) != Some(value) {
            sql.push_str(if sql.is_empty() { "SELECT " } else { ", " });
            sql.push_str("pg_catalog.set_config(");
            quote_literal(&mut sql, name);
            sql.push_str(", ");
            quote_literal(&mut sql, value);
            sql.push_str(", false)");
        }
    }
    if !sql.is_empty() {
        sql.push(';');
    }
    for name in extras {
        if wants.get(name).is_none() {
            sql.push_str("RESET ");
            quote_ident(&mut sql, name);
            sql.push(';');
        }
    }
    (!sql.is_empty()).then_some(sql)
}

/// The settings outside `TRACKED` that `sync_statement(wants, has, ..)` sets. Some of them
/// the server reports back as it applies them (`default_transaction_read_only` since
/// PostgreSQL 14), so they must be taken before the statement runs.
pub fn untracked_sets(wants: &Params, has: &Params) -> Vec<String> {
    wants
        .iter()
        .filter(|&(name, value)| !is_tracked(name) && has.get(name) != Some(value))
        .map(|(name, _)| name.to_string())
        .collect()
}

pub fn quote_ident(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
}

/// An E'' literal, whose meaning does not depend on standard_conforming_strings.
pub fn quote_literal(out: &mut String, s: &str) {
    out.push_str("E'");
    for c in s.chars() {
        if c == '\'' || c == '\\' {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Params {
        let mut ps = Params::default();
        for (k, v) in pairs {
            ps.set(k, v);
        }
        ps
    }

    #[test]
    fn wants_merge_baseline_and_startup() {
        let base = p(&[
            ("TimeZone", "UTC"),
            ("server_version", "15"),
            ("application_name", ""),
        ]);
        let w = client_wants(
            &base,
            &[
                ("timezone".into(), "Europe/Paris".into()),
                ("search_path".into(), "s".into()),
            ],
        );
        assert_eq!(w.get("TimeZone"), Some("Europe/Paris"));
        assert_eq!(w.get("server_version"), None);
        assert_eq!(w.get("search_path"), Some("s"));
        assert_eq!(w.get("application_name"), Some(""));
    }

    #[test]
    fn sync_sets_what_differs_and_resets_stale_extras() {
        let wants = p(&[("TimeZone", "UTC"), ("application_name", "it's\\x")]);
        let has = p(&[("TimeZone", "UTC"), ("application_name", "")]);
        let sql = sync_statement(&wants, &has, &["search_path".into()]).unwrap();
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(E'application_name', E'it''s\\\\x', false);RESET \"search_path\";"
        );
        assert_eq!(sync_statement(&has, &has, &[]), None);
    }
}
