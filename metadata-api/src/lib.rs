//! The metadata API log service: writers create log streams and append stdout/stderr parts, readers
//! follow streams and read a trigger's or step's logs.
//!
//! `app` builds the router; `server` wires it to storage, credentials and a socket.
#![forbid(unsafe_code)]

pub mod auth;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod range;
pub mod read;
pub mod routes;
pub mod server;
pub mod store;

pub use routes::{AppState, app};
