//! Read/write splitting: what a statement needs (`classify`), WAL positions (`lsn`), the
//! per-database routing settings (`config`), a database's hosts and the choice among them
//! (`balance`), and one client's routing state and decision per unit of work (`session`).
//! The lexer behind them also serves SHOW QUERIES (`normalize`) and transaction pooling
//! (`effects`), with a per-thread memo for texts that recur (`memo`).
//! The background view of the hosts lives in `crate::topology`.

pub mod balance;
pub mod classify;
pub mod config;
pub mod effects;
pub mod lsn;
pub mod memo;
pub mod normalize;
pub mod session;

pub use classify::{classify, Class, Classified, Command, Hint, Route};
pub use lsn::{Lsn, LsnError};
