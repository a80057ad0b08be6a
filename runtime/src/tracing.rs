//! The log subscriber every server binary installs first.

use tracing_subscriber::EnvFilter;

/// Logs as text to stderr (stdout carries the lines scripts and tests wait for), filtered by
/// `RUST_LOG`, or by `default_filter` (e.g. `"info"`) when it is unset or does not parse.
///
/// A second call keeps the first subscriber: only start-up calls this, and tests may run several
/// mains in one process.
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
