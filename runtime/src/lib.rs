//! The binaries' runtime kit: what `metadata-api`, `collector` and `operator` (and, for exit
//! codes, `entrypoint`) each did the same way at start and stop, written once.
//!
//! - [`exit`]: exit codes, the `main` wrapper that prints an error with its causes, clap's parse
//!   errors;
//! - [`tracing`]: the log subscriber (text to stderr, `RUST_LOG` or a default filter);
//! - [`shutdown`]: a future that resolves on SIGTERM or SIGINT;
//! - [`admin`]: the `/metrics`, `/healthz` and `/readyz` server.
//!
//! Only [`exit`] is built without the `server` feature, so the static entrypoint stays small.

#[cfg(feature = "server")]
pub mod admin;
pub mod exit;
#[cfg(feature = "server")]
pub mod shutdown;
#[cfg(feature = "server")]
pub mod tracing;
