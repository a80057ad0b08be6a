//! Header names of the API's own, shared by the server and the client.

/// On an append: when the part's first byte was written, in milliseconds since the Unix epoch
/// (the entrypoint: when it read the byte from the container's pipe; the collector: when the
/// kernel saw the write). Stored with the part and returned by reads as `written_ms`; without it
/// the receive time stands in.
pub const WRITTEN: &str = "x-relay-written";
