//! pgmux: a PostgreSQL connection-pooling proxy. The binary in `main.rs` wires these modules;
//! tests and benchmarks use them directly.

pub mod admin;
pub mod alloc;
pub mod app;
pub mod auth;
pub mod batch;
pub mod cancel;
pub mod client;
pub mod config;
pub mod endpoint;
pub mod fasthash;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod params;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod queries;
pub mod relay;
pub mod router;
pub mod run;
pub mod server;
pub mod sockopts;
pub mod stats;
pub mod tls;
pub mod topology;
