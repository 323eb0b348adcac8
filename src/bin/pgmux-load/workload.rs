//! The transactions a connection runs: pgbench's select-only and TPC-B-like scripts, or a
//! user's SQL file with pgbench-style :aid/:bid/:tid/:delta variables; and finding the scale
//! of the pgbench tables.

use crate::cli::{QueryMode, WorkloadKind};
use rand::Rng;
use std::path::Path;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage};

/// pgbench's row counts per unit of scale.
const ACCOUNTS: i64 = 100_000;
const TELLERS: i64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot read {0}: {1}")]
    ReadSql(String, std::io::Error),
    #[error("{0} is empty")]
    EmptySql(String),
    #[error("cannot find the pgbench tables ({0}); create them with `pgbench -i` or pass --scale")]
    Scale(tokio_postgres::Error),
    #[error("pgbench_branches is empty; pass --scale")]
    NoBranches,
}

#[derive(Debug, Clone)]
pub enum Workload {
    Idle,
    Select { scale: i64, mode: QueryMode },
    Tpcb { scale: i64, mode: QueryMode },
    Sql { text: String, scale: i64 },
}

impl Workload {
    pub fn build(
        kind: WorkloadKind,
        mode: QueryMode,
        scale: Option<u32>,
        sql: Option<&Path>,
    ) -> Result<Workload, WorkloadError> {
        let scale = i64::from(scale.unwrap_or(1).max(1));
        Ok(match kind {
            WorkloadKind::Idle => Workload::Idle,
            WorkloadKind::Select => Workload::Select { scale, mode },
            WorkloadKind::Tpcb => Workload::Tpcb { scale, mode },
            WorkloadKind::Sql => {
                let path = sql.expect("validated: -w sql has --sql");
                let name = path.display().to_string();
                let text = std::fs::read_to_string(path)
                    .map_err(|e| WorkloadError::ReadSql(name.clone(), e))?;
                if text.trim().is_empty() {
                    return Err(WorkloadError::EmptySql(name));
                }
                Workload::Sql { text, scale }
            }
        })
    }

    /// Runs one transaction. On an error inside an explicit transaction it rolls back
    /// (best effort) so the next one starts clean.
    pub async fn run_one(&self, c: &Client) -> Result<(), tokio_postgres::Error> {
        match self {
            Workload::Idle => Ok(()),
            Workload::Select { scale, mode } => {
                let aid = rand::thread_rng().gen_range(1..=ACCOUNTS * scale);
                select(c, *mode, aid).await
            }
            Workload::Tpcb { scale, mode } => {
                let r = tpcb(c, *mode, *scale).await;
                if r.is_err() && !c.is_closed() {
                    let _ = c.batch_execute("ROLLBACK").await;
                }
                r
            }
            Workload::Sql { text, scale } => {
                let sql = substitute(text, &Vars::random(*scale));
                let r = c.batch_execute(&sql).await;
                // a user's file may hold BEGIN ... COMMIT: an error in it leaves the
                // transaction open and failed (ROLLBACK outside one is only a warning)
                if r.is_err() && !c.is_closed() {
                    let _ = c.batch_execute("ROLLBACK").await;
                }
                r
            }
        }
    }
}

async fn select(c: &Client, mode: QueryMode, aid: i64) -> Result<(), tokio_postgres::Error> {
    match mode {
        QueryMode::Extended => {
            let aid = aid as i32;
            c.query_typed(
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
                &[(&aid, Type::INT4)],
            )
            .await?;
        }
        QueryMode::Simple => {
            c.simple_query(&format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"
            ))
            .await?;
        }
    }
    Ok(())
}

/// pgbench's built-in "TPC-B (sort of)": one statement per round trip, as pgbench sends it.
async fn tpcb(c: &Client, mode: QueryMode, scale: i64) -> Result<(), tokio_postgres::Error> {
    let v = Vars::random(scale);
    let (aid, bid, tid, delta) = (v.aid as i32, v.bid as i32, v.tid as i32, v.delta as i32);
    match mode {
        QueryMode::Extended => {
            let i = Type::INT4;
            c.query_typed("BEGIN", &[]).await?;
            c.query_typed(
                "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
                &[(&delta, i.clone()), (&aid, i.clone())],
            )
            .await?;
            c.query_typed(
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
                &[(&aid, i.clone())],
            )
            .await?;
            c.query_typed(
                "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
                &[(&delta, i.clone()), (&tid, i.clone())],
            )
            .await?;
            c.query_typed(
                "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2",
                &[(&delta, i.clone()), (&bid, i.clone())],
            )
            .await?;
            c.query_typed(
                "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
                 VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
                &[
                    (&tid, i.clone()),
                    (&bid, i.clone()),
                    (&aid, i.clone()),
                    (&delta, i),
                ],
            )
            .await?;
            c.query_typed("END", &[]).await?;
        }
        QueryMode::Simple => {
            for stmt in TPCB_SCRIPT {
                c.simple_query(&substitute(stmt, &v)).await?;
            }
        }
    }
    Ok(())
}

const TPCB_SCRIPT: [&str; 7] = [
    "BEGIN",
    "UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid",
    "SELECT abalance FROM pgbench_accounts WHERE aid = :aid",
    "UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid",
    "UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
     VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP)",
    "END",
];

/// pgbench's random variables for one transaction.
struct Vars {
    aid: i64,
    bid: i64,
    tid: i64,
    delta: i64,
    scale: i64,
}

impl Vars {
    fn random(scale: i64) -> Vars {
        let mut r = rand::thread_rng();
        Vars {
            aid: r.gen_range(1..=ACCOUNTS * scale),
            bid: r.gen_range(1..=scale),
            tid: r.gen_range(1..=TELLERS * scale),
            delta: r.gen_range(-5000..=5000),
            scale,
        }
    }
}

/// Replaces `:aid`, `:bid`, `:tid`, `:delta` and `:scale` (not `::casts`, not longer names
/// such as `:aidx`).
fn substitute(sql: &str, v: &Vars) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b':' && (i == 0 || b[i - 1] != b':') && b.get(i + 1) != Some(&b':') {
            let rest = &sql[i + 1..];
            let end = rest
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .unwrap_or(rest.len());
            let value = match &rest[..end] {
                "aid" => Some(v.aid),
                "bid" => Some(v.bid),
                "tid" => Some(v.tid),
                "delta" => Some(v.delta),
                "scale" => Some(v.scale),
                _ => None,
            };
            if let Some(n) = value {
                out.push_str(&n.to_string());
                i += 1 + end;
                continue;
            }
        }
        let ch = sql[i..].chars().next().expect("inside the string");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// The pgbench scale of the target: the number of branches.
pub async fn detect_scale(c: &Client) -> Result<u32, WorkloadError> {
    let msgs = c
        .simple_query("SELECT count(*) FROM pgbench_branches")
        .await
        .map_err(WorkloadError::Scale)?;
    let n = msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|s| s.parse::<u32>().ok()),
            _ => None,
        })
        .unwrap_or(0);
    if n == 0 {
        return Err(WorkloadError::NoBranches);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitute_replaces_known_variables_only() {
        let v = Vars {
            aid: 7,
            bid: 2,
            tid: 13,
            delta: -40,
            scale: 3,
        };
        assert_eq!(
            substitute(
                "SELECT :aid::int, ':bid', :tid, :delta, :scale, :aidx, :other é",
                &v
            ),
            "SELECT 7::int, '2', 13, -40, 3, :aidx, :other é"
        );
    }

    #[test]
    fn random_vars_stay_in_pgbench_ranges() {
        for _ in 0..1000 {
            let v = Vars::random(2);
            assert!((1..=200_000).contains(&v.aid));
            assert!((1..=2).contains(&v.bid));
            assert!((1..=20).contains(&v.tid));
            assert!((-5000..=5000).contains(&v.delta));
        }
    }
}
