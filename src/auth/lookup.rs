//! auth_query: the stored secret of a user who is not in the config, read on a server as
//! auth_user (PgBouncer's auth_user / auth_query / auth_dbname), and reused for
//! auth_cache_ttl so a burst of logins does not become a burst of lookups. Only secrets found
//! are cached: a role created a moment ago can log in at once, and a failed login drops its
//! entry, so a changed password is seen on the next attempt.

use super::password::Secret;
use crate::app::App;
use crate::config::{Config, Database};
use crate::pool::PoolError;
use crate::server::ServerError;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("auth_user cannot get a server connection: {0}")]
    Pool(#[from] PoolError),
    #[error("auth_query lost its server connection: {0}")]
    Server(#[from] ServerError),
    #[error("auth_query failed: {message} ({code})")]
    Query { code: String, message: String },
}

/// Where and as whom a lookup runs, from the config in force.
pub struct LookupPlan<'a> {
    pub db: &'a Database,
    pub auth_user: &'a str,
    pub query: &'a str,
    pub ttl: Duration,
}

impl<'a> LookupPlan<'a> {
    /// None when auth_query is off for `db` (no auth_user).
    pub fn new(config: &'a Config, db: &'a Database) -> Option<LookupPlan<'a>> {
        let auth_user = config.auth_user_for(db)?;
        let auth_db = &config.pgmux.auth_dbname;
        let db = if auth_db.is_empty() {
            db
        } else {
            config.database(auth_db)?
        };
        Some(LookupPlan {
            db,
            auth_user,
            query: &config.pgmux.auth_query,
            ttl: config.pgmux.auth_cache_ttl.get().unwrap_or(Duration::ZERO),
        })
    }
}

struct Cached {
    at: Instant,
    secret: Secret,
}

/// Secrets found by auth_query, keyed by (database the lookup ran in, user).
#[derive(Default)]
pub struct SecretCache {
    map: Mutex<HashMap<(String, String), Cached>>,
}

impl SecretCache {
    /// The user's secret: cached, else looked up. Ok(None) for no such role, a role that
    /// may not log in now, or one without a password.
    pub async fn secret(
        &self,
        app: &App,
        plan: &LookupPlan<'_>,
        user: &str,
    ) -> Result<Option<Secret>, LookupError> {
        let key = (plan.db.name.clone(), user.to_string());
        if let Some(s) = self.cached(&key, plan.ttl) {
            return Ok(Some(s));
        }
        let found = run_query(app, plan, user).await?;
        if let Some(secret) = &found {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, c| c.at.elapsed() < plan.ttl);
            if !plan.ttl.is_zero() {
                map.insert(
                    key,
                    Cached {
                        at: Instant::now(),
                        secret: secret.clone(),
                    },
                );
            }
        }
        Ok(found)
    }

    /// Drops a user's entry (their login failed: the password may have changed).
    pub fn forget(&self, plan: &LookupPlan<'_>, user: &str) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&(plan.db.name.clone(), user.to_string()));
    }

    fn cached(&self, key: &(String, String), ttl: Duration) -> Option<Secret> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .filter(|c| c.at.elapsed() < ttl)
            .map(|c| c.secret.clone())
    }
}

/// Runs auth_query on a connection of auth_user's pool for the lookup database.
async fn run_query(
    app: &App,
    plan: &LookupPlan<'_>,
    user: &str,
) -> Result<Option<Secret>, LookupError> {
    let pool = app.pool(plan.db, plan.auth_user);
    let mut conn = pool.checkout().await?;
    let mut rows = Vec::new();
    // an I/O error drops `conn`, which closes it rather than pooling it
    let error = conn
        .query_params_internal(plan.query, &[user], &mut rows)
        .await?;
    conn.release();
    if let Some(e) = error {
        return Err(LookupError::Query {
            code: e.code,
            message: e.message,
        });
    }
    Ok(rows.first().and_then(|row| secret_of(row)))
}

/// The secret column: the second of (name, secret), or the only one. NULL or empty means
/// no password, which no method but trust accepts.
fn secret_of(row: &[String]) -> Option<Secret> {
    let text = row.get(1).or_else(|| row.first())?;
    (!text.is_empty()).then(|| Secret::parse(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_column_is_taken_and_null_means_none() {
        let md5 = format!("md5{}", "a".repeat(32));
        assert!(matches!(
            secret_of(&["u".into(), md5.clone()]),
            Some(Secret::Md5(_))
        ));
        assert!(matches!(secret_of(&[md5]), Some(Secret::Md5(_))));
        assert!(secret_of(&["u".into(), String::new()]).is_none());
        assert!(secret_of(&[]).is_none());
    }
}
