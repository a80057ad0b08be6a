//! The environment the operator's webhook sets in wrapped containers and the entrypoint (and, for
//! the API's address and token, the collector) reads: each name once, so a rename cannot leave one
//! side behind.

/// The metadata API's base URL.
pub const METADATA_API_URL: &str = "RELAY_METADATA_API_URL";
/// The file holding the bearer token (a projected ServiceAccount token, re-read as it rotates).
pub const METADATA_API_TOKEN_FILE: &str = "RELAY_METADATA_API_TOKEN_FILE";
/// The stream the command's stdout goes to: `<container>.stdout`, as the collector names it.
pub const STDOUT_STREAM: &str = "RELAY_STDOUT_STREAM";
/// The stream the command's stderr goes to: `<container>.stderr`.
pub const STDERR_STREAM: &str = "RELAY_STDERR_STREAM";
/// The pod's UID from the downward API, part of a Knative pod's stream names.
pub const POD_UID: &str = "RELAY_POD_UID";
/// The variables whose values are redacted from the shipped output: a comma-separated list of
/// names and `PREFIX*` entries.
pub const REDACT_ENV: &str = "RELAY_REDACT_ENV";
/// `kubectl relay`: the metadata API's base URL, which `--url` also sets; without either the
/// plugin goes through the Kubernetes API server's service proxy.
pub const PLUGIN_URL: &str = "RELAY_URL";
/// `kubectl relay`: the bearer token sent to the metadata API, which `--token` also sets; without
/// either the plugin sends the kubeconfig user's token.
pub const PLUGIN_TOKEN: &str = "RELAY_TOKEN";
