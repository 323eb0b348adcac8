//! Shared integration-test harness for pgmux: every test file pulls it in with `mod common;`.
//! Owns throwaway PostgreSQL clusters (`cluster`), the pgmux child process (`pgmux`) and the
//! small helpers both need (`util`); this file only wires them together.
//!
//! A test binary that only uses part of the harness would otherwise drown in dead_code warnings.
#![allow(dead_code)]

mod cluster;
mod pgmux;
mod util;

// Each test binary uses a different subset of these re-exports.
#[allow(unused_imports)]
pub use cluster::{PgCluster, PgInstance};
#[allow(unused_imports)]
pub use pgmux::Pgmux;
#[allow(unused_imports)]
pub use util::{cancel_and_wait, conn_str, free_port, wait_until, wait_until_async};

// The reliability harness (issue 9): a fault-injecting relay and outside views of pgmux.
pub mod faults;
pub mod probe;
pub mod raw;
