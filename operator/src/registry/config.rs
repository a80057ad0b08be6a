//! How a registry client reaches registries and how much it caches.

use std::{num::NonZeroUsize, time::Duration};

use super::Platform;

/// How a [`Registry`](super::Registry) reaches registries and caches what it learns.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The platform picked from multi-platform images ([`Platform::node`] by default).
    pub platform: Platform,
    /// How long one lookup may take, all requests included (5 s by default: the webhook must
    /// answer within the API server's timeout).
    pub timeout: Duration,
    /// Registries (`host:port`, or `host` for the default port) reached over plain HTTP, as
    /// with Docker's `--insecure-registry`.
    pub insecure_registries: Vec<String>,
    /// Whether `localhost` and loopback addresses are reached over plain HTTP, whatever port.
    pub insecure_localhost: bool,
    /// How long a tag's digest is trusted before the registry is asked again (60 s by default).
    /// Digest-pinned references are cached until evicted.
    pub tag_ttl: Duration,
    /// How many entries each cache (tags, manifests, configurations) keeps (1024 by default);
    /// registry clients, one per registry and credentials, are kept up to 64.
    pub cache_capacity: NonZeroUsize,
    /// The largest image configuration blob accepted (1 MiB by default).
    pub max_config_size: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            platform: Platform::node(),
            timeout: Duration::from_secs(5),
            insecure_registries: Vec::new(),
            insecure_localhost: false,
            tag_ttl: Duration::from_secs(60),
            cache_capacity: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
            max_config_size: 1024 * 1024,
        }
    }
}
