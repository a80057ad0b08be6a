//! The mutating admission webhook: wraps the containers of new pods in tenant namespaces with the
//! log-shipping entrypoint ([`crate::mutate`]), over HTTPS with a certificate that is reloaded
//! when the TLS upkeep ([`crate::tls`]) renews it.
//!
//! Answers come from memory: the tenants from a reflector
//! [`Store`](kube::runtime::reflector::Store), image entrypoints from an [`ImageLookup`] and the
//! key names of Secrets a container takes whole through `envFrom` (for its `RELAY_REDACT_ENV`
//! list) from a [`SecretKeyLookup`], both concurrently and bounded by deadlines well under the API
//! server's webhook timeout. Only pod `CREATE` is mutated; everything else is allowed unchanged.
//! A review that cannot be read is answered as invalid (or with a 400 when it carries no request
//! uid to answer), never with a panic. When the webhook cannot decide (the tenant cache has not
//! synced, an internal error) it answers with an HTTP error, so the webhook's `failurePolicy`
//! decides.
//!
//! One file per concern:
//! - `review.rs`: answering one admission review ([`Webhook::review`], [`Outcome`], [`Reply`]);
//! - `lookup.rs`: what a review looks up, each under its deadline: the tenants
//!   ([`tenant_reflector`]), image entrypoints ([`ImageLookup`]), Secret key names
//!   ([`SecretKeyLookup`]);
//! - `metrics.rs`: [`WebhookMetrics`];
//! - `config.rs`: [`WebhookConfig`];
//! - `server.rs`: the routes and the HTTPS server ([`router`], [`serve`]); the certificate it
//!   serves, and its reloading, are in [`crate::tls`].

mod config;
mod lookup;
mod metrics;
mod review;
mod server;

pub use config::WebhookConfig;
pub use lookup::{
    ApiSecretKeys, ImageLookup, NoImageLookup, NoSecretKeyLookup, SecretKeyLookup, SecretKeys,
    tenant_reflector,
};
pub use metrics::WebhookMetrics;
pub use review::{Outcome, Reply, Webhook};
pub use server::{ServeError, router, serve};

/// The path the API server posts reviews to (`clientConfig.service.path` in
/// `deploy/base/webhook.yaml`).
pub const MUTATE_PATH: &str = "/mutate-pods";
/// Reporting controller name of the webhook's Events.
pub const EVENT_REPORTER: &str = "relay-operator-webhook";
/// Event reason: a pod was admitted unwrapped (or refused) because its tenant's tools are not
/// ready.
pub const REASON_TOOLS_NOT_READY: &str = "ToolsNotReady";
/// Event reason: containers were left unwrapped because their image's entrypoint could not be
/// looked up.
pub const REASON_IMAGE_LOOKUP_FAILED: &str = "ImageLookupFailed";
/// Event reason: the keys of a Secret that wrapped containers take whole through `envFrom` could
/// not be read, so their values are not redacted from captured logs.
pub const REASON_SECRET_KEYS_UNKNOWN: &str = "SecretKeysUnknown";
