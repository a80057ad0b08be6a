//! The metadata API log service: writers create log streams and append stdout/stderr parts, readers
//! follow streams and read a trigger's or step's logs.
//!
//! `app` builds the router; `server` wires it to storage, credentials and a socket (feature
//! `server`). `client` is what writers link (feature `client`): the HTTP calls and a shipper that
//! batches, compresses, retries and accounts for every byte it is handed.
#![forbid(unsafe_code)]

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "client")]
pub mod client;
pub mod coding;
#[cfg(feature = "server")]
pub mod conn;
#[cfg(feature = "server")]
pub mod error;
pub mod headers;
#[cfg(feature = "kubernetes")]
pub mod kube_auth;
#[cfg(feature = "server")]
pub mod limits;
#[cfg(feature = "server")]
pub mod metrics;
pub mod names;
pub mod pod_context;
pub mod range;
#[cfg(feature = "server")]
pub mod read;
#[cfg(feature = "server")]
pub mod report;
#[cfg(feature = "server")]
pub mod retention;
#[cfg(feature = "server")]
pub mod routes;
#[cfg(feature = "server")]
pub mod server;
pub mod size;
pub mod source;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod times;

#[cfg(feature = "server")]
pub use routes::{AppState, app};
