//! Why the command of an image could not be read ([`RegistryError`]), and what `oci_client`'s
//! errors mean in those terms.

use oci_client::errors::{OciDistributionError, OciErrorCode};

/// Why the original entrypoint of an image could not be read. The messages name the image and
/// the registry and fit a Kubernetes Event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The image reference does not parse.
    #[error("invalid image reference {image:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        image: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The registry could not be reached, did not answer in time, or failed (5xx, 429).
    #[error("registry {registry} is unreachable for {image}: {reason}")]
    Unreachable {
        /// `host[:port]`.
        registry: String,
        /// The normalized image reference.
        image: String,
        /// What happened (connection refused, timeout after 5s, 503, ...).
        reason: String,
    },
    /// The registry refused the credentials, or wants some and the pod's pull secrets have none.
    #[error(
        "registry {registry} refused access to {image}: unauthorized (no pull secret of the pod \
         or its ServiceAccount grants access)"
    )]
    Unauthorized {
        /// `host[:port]`.
        registry: String,
        /// The normalized image reference.
        image: String,
    },
    /// The registry has no such repository, tag or digest.
    #[error("image {image} not found in registry {registry}")]
    NotFound {
        /// `host[:port]`.
        registry: String,
        /// The normalized image reference.
        image: String,
    },
    /// A multi-platform image without an entry for the configured platform.
    #[error("image {image} has no manifest for platform {platform} (it has: {})", available.join(", "))]
    NoPlatform {
        /// The normalized image reference.
        image: String,
        /// The platform looked for.
        platform: String,
        /// The platforms the image index lists.
        available: Vec<String>,
    },
    /// The registry answered something that is not a valid manifest or image configuration
    /// (or one too large, or whose digest does not match).
    #[error("registry {registry} sent a malformed answer for {image}: {reason}")]
    Malformed {
        /// `host[:port]`.
        registry: String,
        /// The normalized image reference.
        image: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The image and registry a lookup is about, for error messages.
pub(super) struct Target {
    pub(super) image: String,
    pub(super) registry: String,
}

impl Target {
    pub(super) fn unreachable(&self, reason: impl Into<String>) -> RegistryError {
        RegistryError::Unreachable {
            registry: self.registry.clone(),
            image: self.image.clone(),
            reason: reason.into(),
        }
    }

    pub(super) fn malformed(&self, reason: impl Into<String>) -> RegistryError {
        RegistryError::Malformed {
            registry: self.registry.clone(),
            image: self.image.clone(),
            reason: reason.into(),
        }
    }

    fn not_found(&self) -> RegistryError {
        RegistryError::NotFound {
            registry: self.registry.clone(),
            image: self.image.clone(),
        }
    }

    pub(super) fn unauthorized(&self) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.registry.clone(),
            image: self.image.clone(),
        }
    }

    /// What an `oci_client` error means for the webhook.
    pub(super) fn classify(&self, e: OciDistributionError) -> RegistryError {
        use OciDistributionError as E;
        match e {
            E::RequestError(e) => self.unreachable(error_chain(&e)),
            E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => self.unauthorized(),
            E::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    self.unauthorized()
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::ManifestBlobUnknown
                            | OciErrorCode::NameInvalid
                    )
                }) {
                    self.not_found()
                } else if codes.contains(&&OciErrorCode::Toomanyrequests) {
                    self.unreachable(format!("rate limited: {envelope}"))
                } else {
                    self.malformed(envelope.to_string())
                }
            }
            E::ServerError { code, message, .. } => match code {
                401 | 403 => self.unauthorized(),
                404 => self.not_found(),
                429 | 500..=599 => self.unreachable(format!("HTTP {code}: {}", short(&message))),
                _ => self.malformed(format!("HTTP {code}: {}", short(&message))),
            },
            other => self.malformed(other.to_string()),
        }
    }

    /// An error while streaming a blob: the connection broke, or the content does not match its
    /// digest.
    pub(super) fn classify_io(&self, e: &std::io::Error) -> RegistryError {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<reqwest::Error>())
        {
            Some(e) => self.unreachable(error_chain(e)),
            None => self.malformed(format!("image configuration: {e}")),
        }
    }
}

/// An error and its sources, `: `-separated (reqwest's own message hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// At most 200 characters of a registry's message.
fn short(message: &str) -> String {
    let message = message.trim();
    match message.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &message[..i]),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn registry_errors_are_classified() {
        let target = Target {
            image: "reg.example.com/app:v1".to_owned(),
            registry: "reg.example.com".to_owned(),
        };
        let server = |code| OciDistributionError::ServerError {
            code,
            url: "https://reg.example.com/v2/app/manifests/v1".to_owned(),
            message: "nope".to_owned(),
        };
        assert!(matches!(
            target.classify(server(404)),
            RegistryError::NotFound { .. }
        ));
        assert!(matches!(
            target.classify(server(403)),
            RegistryError::Unauthorized { .. }
        ));
        assert!(matches!(
            target.classify(server(503)),
            RegistryError::Unreachable { .. }
        ));
        assert!(matches!(
            target.classify(server(400)),
            RegistryError::Malformed { .. }
        ));
        let envelope: oci_client::errors::OciEnvelope = serde_json::from_value(json!({
            "errors": [{ "code": "MANIFEST_UNKNOWN", "message": "manifest unknown" }]
        }))
        .unwrap();
        assert!(matches!(
            target.classify(OciDistributionError::RegistryError {
                envelope,
                url: String::new()
            }),
            RegistryError::NotFound { .. }
        ));
        let message = target
            .classify(OciDistributionError::UnauthorizedError { url: String::new() })
            .to_string();
        assert!(
            message.contains("reg.example.com/app:v1") && message.contains("unauthorized"),
            "{message}"
        );
    }
}
