//! Which statement each request runs, for SHOW QUERIES and the slow log: a simple Query runs
//! its own text; an extended-protocol batch (up to its Sync) runs the statement of its first
//! Execute, found through the Bind before it and the Parse that prepared the statement.
//! Texts are fingerprinted by the relay's `stats::Meter` as they pass (no allocation unless
//! the pool has not seen the statement).

use crate::fasthash::Keyed;
use crate::prepared::{self, ClientStatements};
use crate::stats::Meter;
use std::collections::HashMap;

/// Named statements remembered per client when the transaction-mode tracker does not keep
/// them; past this, new names are not remembered (their executions are not recorded).
const MAX_NAMED: usize = 10_000;

#[derive(Default)]
pub struct Keys {
    /// The simple Query being counted.
    query: u64,
    /// The unnamed statement (last Parse without a name).
    unnamed: u64,
    /// Named statements by client name, when no `statements::Tracker` knows them (session
    /// mode, or max_prepared_statements = 0).
    named: HashMap<Box<[u8]>, u64, Keyed>,
    /// The statement of the last Bind.
    bound: u64,
    /// The statement of the batch's first Execute.
    batch: u64,
}

impl Keys {
    pub fn query(&mut self, meter: &mut Meter, text: &str) {
        self.query = meter.statement(text);
    }

    /// [`Keys::query`] with the fingerprint of `text` already computed.
    pub fn query_fingerprinted(&mut self, meter: &mut Meter, text: &str, fp: u64) {
        self.query = meter.fingerprinted(text, fp);
    }

    /// No named statement is remembered (the others last one request or batch).
    pub fn is_empty(&self) -> bool {
        self.named.is_empty()
    }

    pub fn take_query(&mut self) -> u64 {
        std::mem::take(&mut self.query)
    }

    /// A whole Parse body. `tracked`: the tracker keeps named statements (and their text).
    pub fn parse(&mut self, meter: &mut Meter, body: &[u8], tracked: bool) {
        let Some((name, rest)) = prepared::split_parse(body) else {
            return;
        };
        if name.is_empty() {
            self.unnamed = meter.statement(prepared::query_text(rest));
        } else if !tracked && (self.named.len() < MAX_NAMED || self.named.contains_key(name)) {
            let fp = meter.statement(prepared::query_text(rest));
            self.named.insert(name.into(), fp);
        }
    }

    /// The start of a Bind body (the whole body, or what of it has arrived: only the portal
    /// and statement names at its start are read).
    pub fn bind(&mut self, meter: &mut Meter, head: &[u8], tracked: Option<&ClientStatements>) {
        self.bound = match prepared::bind_names(head) {
            Some((_, [], _)) => self.unnamed,
            Some((_, stmt, _)) => match tracked {
                Some(stmts) => stmts.get(stmt).map_or(0, |d| meter.prepared(d)),
                None => self.named.get(stmt).copied().unwrap_or(0),
            },
            None => 0,
        };
    }

    pub fn execute(&mut self) {
        if self.batch == 0 {
            self.batch = self.bound;
        }
    }

    /// The batch ends: the statement its Sync's ReadyForQuery answers for.
    pub fn sync(&mut self) -> u64 {
        std::mem::take(&mut self.batch)
    }
}
