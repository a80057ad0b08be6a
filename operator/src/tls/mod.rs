//! The webhook's TLS, all of it:
//! - `certificate.rs`: issuing a self-signed CA and a serving certificate it signs, renewing the
//!   latter (keeping the CA while it lasts), and the check that says when to renew
//!   ([`generate`], [`renew_with_ips`], [`needs_renewal`]). Pure: no Kubernetes I/O.
//! - `material.rs`: the material ([`WebhookTls`]) and the layout of the Secret that stores it
//!   ([`secret_data`], [`from_secret_data`]).
//! - `upkeep.rs`: keeping it current in Kubernetes: the Secret, the `caBundle` of the
//!   MutatingWebhookConfiguration, and the loop that hands new material to the server
//!   ([`tls_upkeep`]).
//! - `serving.rs`: the server's side: the rustls configuration and the certificate resolver that
//!   swaps renewed material in without a restart, for [`crate::webhook::serve`].

mod certificate;
mod material;
mod serving;
mod upkeep;

pub use certificate::{
    CA_COMMON_NAME, CA_VALIDITY_DAYS, CERT_VALIDITY_DAYS, RENEW_BEFORE_DAYS, TlsError, dns_names,
    generate, generate_with_ips, needs_renewal, needs_renewal_with_ips, renew_with_ips,
};
pub use material::{
    CA_CRT_KEY, CA_KEY_KEY, TLS_CRT_KEY, TLS_KEY_KEY, WebhookTls, from_secret_data, secret_data,
};
pub(crate) use serving::{ReloadingCert, server_config};
pub use upkeep::{TlsUpkeep, UpkeepError, ensure_ca_bundle, ensure_secret, tls_upkeep};
