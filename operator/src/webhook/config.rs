//! [`WebhookConfig`]: how the webhook mutates pods and what it accepts.

use std::time::Duration;

use crate::mutate::{self, Injection};

/// How the webhook mutates and what it accepts.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Metadata API base URL as pods reach it (`RELAY_METADATA_API_URL`).
    pub api_url: String,
    /// Audience of the projected ServiceAccount token (the metadata API's).
    pub audience: String,
    /// Path of the projected token in wrapped containers.
    pub token_path: String,
    /// Refuse pods of a tenant whose tools are not ready, instead of admitting them unwrapped.
    pub deny_when_not_ready: bool,
    /// Deadline for looking up all of a pod's images; keep it well under the webhook's
    /// `timeoutSeconds` (5 s in `deploy/base/webhook.yaml`).
    pub image_lookup_timeout: Duration,
    /// Deadline for reading the key names of a pod's `envFrom` Secrets, concurrently with the
    /// image lookups; a Secret not read by then lists no keys.
    pub secret_lookup_timeout: Duration,
    /// How long a review waits for the tenant cache's first sync before answering with 503.
    pub cache_sync_timeout: Duration,
    /// Largest review body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// How long a client may take for the TLS handshake.
    pub tls_handshake_timeout: Duration,
}

impl WebhookConfig {
    /// The defaults: token at [`mutate::DEFAULT_TOKEN_PATH`], admit unwrapped when tools are not
    /// ready, 3 s image lookup deadline, 2 s Secret lookup deadline, 1 s cache sync wait, 4 MiB
    /// bodies, 10 s handshakes.
    pub fn new(api_url: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            api_url: api_url.into(),
            audience: audience.into(),
            token_path: mutate::DEFAULT_TOKEN_PATH.to_owned(),
            deny_when_not_ready: false,
            image_lookup_timeout: Duration::from_secs(3),
            secret_lookup_timeout: Duration::from_secs(2),
            cache_sync_timeout: Duration::from_secs(1),
            max_body_bytes: 4 << 20,
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }

    pub(super) fn injection(&self, claim_name: &str) -> Injection {
        Injection {
            claim_name: claim_name.to_owned(),
            api_url: self.api_url.clone(),
            audience: self.audience.clone(),
            token_path: self.token_path.clone(),
        }
    }
}
