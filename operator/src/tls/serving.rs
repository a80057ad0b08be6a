//! The server's side of the webhook's TLS: the rustls configuration, and a certificate resolver
//! that follows the material the upkeep ([`super::tls_upkeep`]) sends, so that a renewed
//! certificate is served without a restart.

use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use super::WebhookTls;
use crate::webhook::ServeError;

/// The serving certificate the TLS handshakes see, swapped when the material changes.
#[derive(Debug)]
pub(crate) struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    /// A resolver presenting `tls`'s certificate; an error when that material does not load.
    pub(crate) fn new(tls: &WebhookTls, provider: &CryptoProvider) -> Result<Self, ServeError> {
        let initial = certified_key(tls, provider)?;
        Ok(Self {
            current: RwLock::new(Arc::new(initial)),
        })
    }

    /// Takes each new material sent on `tls` until the sender is gone. Material that does not
    /// load is logged and ignored: the previous certificate stays.
    pub(crate) async fn follow(
        self: Arc<Self>,
        mut tls: watch::Receiver<WebhookTls>,
        provider: Arc<CryptoProvider>,
    ) {
        while tls.changed().await.is_ok() {
            let material = tls.borrow_and_update().clone();
            match certified_key(&material, &provider) {
                Ok(key) => {
                    if let Ok(mut current) = self.current.write() {
                        *current = Arc::new(key);
                        tracing::info!("webhook serving certificate reloaded");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "new webhook certificate rejected; keeping the old one");
                }
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|key| Arc::clone(&key))
    }
}

/// The server's rustls configuration: `cert` answers every handshake, clients present no
/// certificate, and ALPN offers HTTP/2 before HTTP/1.1.
pub(crate) fn server_config(
    provider: &Arc<CryptoProvider>,
    cert: Arc<ReloadingCert>,
) -> Result<rustls::ServerConfig, ServeError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn certified_key(tls: &WebhookTls, provider: &CryptoProvider) -> Result<CertifiedKey, ServeError> {
    let certs = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServeError::Material(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(ServeError::Material("no certificate".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())
        .map_err(|e| ServeError::Material(format!("private key: {e}")))?;
    Ok(CertifiedKey::from_der(certs, key, provider)?)
}

/// Whether `tls`'s serving certificate and key load into rustls and belong together.
pub(crate) fn material_loads(tls: &WebhookTls) -> bool {
    certified_key(tls, &rustls::crypto::aws_lc_rs::default_provider()).is_ok()
}
