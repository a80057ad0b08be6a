//! The metadata API log service: writers create log streams and append stdout/stderr parts, readers
//! follow streams and read a trigger's or step's logs.
//!
//! `app` builds the router; `server` wires it to storage, credentials and a socket. What writers
//! link is the `client` crate; the names, ranges and codings both sides agree on are the
//! `contract` crate's, re-exported here under their old paths.
#![forbid(unsafe_code)]

pub mod auth;
pub mod conn;
pub mod error;
pub mod kube_auth;
pub mod limits;
pub mod lines;
pub mod metrics;
pub mod read;
pub mod report;
pub mod retention;
pub mod routes;
pub mod server;
pub mod store;
pub mod times;

pub use contract::{coding, headers, names, pod_context, range, reason, size, source};
pub use routes::{AppState, app};
