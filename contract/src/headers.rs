//! Header names of the API's own, shared by the server and the client.

/// On an append: when the part's first byte was written, in milliseconds since the Unix epoch
/// (the entrypoint: when it read the byte from the container's pipe; the collector: when the
/// kernel saw the write). Stored with the part and returned by reads as `written_ms`; without it
/// the receive time stands in.
pub const WRITTEN: &str = "x-relay-written";

/// The caller's bearer credentials (`Bearer TOKEN`), when `Authorization` cannot carry them: the
/// Kubernetes API server's service proxy authenticates a request with its `Authorization` and
/// then removes that header, so `kubectl relay` sends the user's token here as well. The API
/// reads it only when `Authorization` is absent.
pub const PROXIED_AUTHORIZATION: &str = "x-relay-authorization";
