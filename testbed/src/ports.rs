//! Free loopback ports and addresses for tests, and waiting for a port to accept connections.

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// A loopback port nobody listens on now, or an error when none can be bound.
///
/// # Errors
///
/// When no port on 127.0.0.1 can be bound.
pub fn try_free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A loopback port nobody listens on now.
///
/// # Panics
///
/// When no port on 127.0.0.1 can be bound.
#[allow(clippy::unwrap_used)]
pub fn free_port() -> u16 {
    try_free_port().unwrap()
}

/// A loopback address (`127.0.0.1:port`) nobody listens on now.
///
/// # Panics
///
/// When no port on 127.0.0.1 can be bound.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Waits until something accepts connections on loopback `port`, failing with `what` after
/// `limit`.
///
/// # Panics
///
/// When nothing accepts within `limit`.
pub fn wait_port(port: u16, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}
