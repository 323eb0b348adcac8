//! Protocol v3 without I/O beyond the startup packet: framing of message streams, the
//! messages pgmux writes and the bodies it reads.

pub mod messages;
pub mod scan;
pub mod startup;

pub use messages::PgError;
