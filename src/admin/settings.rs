//! The [pgmux] settings as the console sees them: SHOW CONFIG's rows (value, default,
//! whether it can change at run time) and SET key = value, which builds a new configuration
//! and puts it in force exactly as a reload does.

use crate::app::{App, RESTART_ONLY};
use crate::config::{Config, General};
use toml::{Table, Value};

/// (key, value, default, changeable) for every [pgmux] setting, sorted by key.
pub fn rows(config: &Config) -> Vec<(String, String, String, bool)> {
    let now = table(&config.pgmux);
    let defaults = table(&General::default());
    let mut rows: Vec<_> = now
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                text(v),
                defaults.get(k).map(text).unwrap_or_default(),
                !RESTART_ONLY.contains(&k.as_str()),
            )
        })
        .collect();
    rows.sort();
    rows
}

fn table(g: &General) -> Table {
    match Value::try_from(g) {
        Ok(Value::Table(t)) => t,
        _ => Table::new(),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// SET key = value: the value is read as the setting's type (lists are comma-separated);
/// the new configuration must validate, then it replaces the running one.
pub fn set(app: &App, key: &str, value: &str) -> Result<(), String> {
    let current = app.config_arc();
    let mut t = table(&current.pgmux);
    let Some(old) = t.get(key) else {
        return Err(format!("unknown setting \"{key}\""));
    };
    if RESTART_ONLY.contains(&key) {
        return Err(format!(
            "\"{key}\" cannot be changed at run time; edit the configuration file and restart"
        ));
    }
    let new = match old {
        Value::Integer(_) => value
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("\"{key}\" needs an integer"))?,
        Value::Float(_) => value
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("\"{key}\" needs a number of seconds"))?,
        Value::Boolean(_) => match value.to_ascii_lowercase().as_str() {
            "1" | "on" | "true" | "yes" => Value::Boolean(true),
            "0" | "off" | "false" | "no" => Value::Boolean(false),
            _ => return Err(format!("\"{key}\" needs a boolean")),
        },
        Value::Array(_) => Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        _ => Value::String(value.to_string()),
    };
    t.insert(key.to_string(), new);
    let general: General = Value::Table(t)
        .try_into()
        .map_err(|e: toml::de::Error| e.to_string().trim_end().to_string())?;
    let mut config = (*current).clone();
    config.pgmux = general;
    let config = config.validated("SET").map_err(|e| e.to_string())?;
    app.apply(config);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rows_have_values_defaults_and_changeability() {
        let c = Config::parse("[pgmux]\ndefault_pool_size = 7\n", "t").unwrap();
        let rows = rows(&c);
        let row = rows.iter().find(|r| r.0 == "default_pool_size").unwrap();
        assert_eq!((row.1.as_str(), row.2.as_str(), row.3), ("7", "20", true));
        let port = rows.iter().find(|r| r.0 == "listen_port").unwrap();
        assert!(!port.3);
    }

    #[test]
    fn set_changes_live_settings_and_refuses_bad_ones() {
        let app = App::new(Config::parse("[pgmux]\n[[users]]\nname='a'\n", "t").unwrap());
        set(&app, "default_pool_size", "3").unwrap();
        assert_eq!(app.config().pgmux.default_pool_size, 3);
        set(&app, "query_wait_timeout", "2.5").unwrap();
        assert_eq!(app.config().pgmux.query_wait_timeout.0, 2.5);
        set(&app, "admin_users", "a").unwrap();
        assert_eq!(app.config().pgmux.admin_users, vec!["a".to_string()]);
        assert!(set(&app, "default_pool_size", "0").is_err());
        assert!(set(&app, "default_pool_size", "x").is_err());
        assert!(set(&app, "listen_port", "1").is_err());
        assert!(set(&app, "no_such", "1").is_err());
        assert!(set(&app, "stats_users", "nobody").is_err());
        let err = set(&app, "query_wait_timeout", "-1").unwrap_err();
        assert!(err.contains("query_wait_timeout"), "{err}");
        assert!(set(&app, "server_idle_timeout", "inf").is_err());
        assert_eq!(app.config().pgmux.query_wait_timeout.0, 2.5);
        assert_eq!(app.config().pgmux.default_pool_size, 3);
    }
}
