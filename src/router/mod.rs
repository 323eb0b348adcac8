//! Read/write splitting: what a statement needs (`classify`), WAL positions (`lsn`) and the
//! per-database routing settings (`config`). The background view of the hosts lives in
//! `crate::topology`; choosing a server from both is the session's job.

pub mod classify;
pub mod config;
pub mod effects;
pub mod lsn;
pub mod normalize;

pub use classify::{classify, Class, Classified, Command, Hint, Route};
pub use lsn::{Lsn, LsnError};
