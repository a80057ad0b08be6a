//! The contract between the metadata API and everything that talks to it: stream names and
//! sources, the contexts pods map to, byte ranges (`Content-Range`, spans), why ranges were
//! dropped, content codings, the API's own headers, the `RELAY_*` environment of wrapped
//! containers, the request and response bodies and the capture report. Defined once here and used
//! by the server, the shipping client, the operator, the collector and `kubectl relay`; no I/O.
#![forbid(unsafe_code)]

pub mod coding;
pub mod env;
pub mod headers;
pub mod names;
pub mod pod_context;
pub mod range;
pub mod reason;
pub mod report;
pub mod size;
pub mod source;
pub mod wire;
