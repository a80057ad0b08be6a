//! The webhook's TLS material ([`WebhookTls`]: a CA and the serving certificate it signed, all
//! PEM) and the layout of the Secret that stores it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

/// Secret key of the CA certificate (PEM).
pub const CA_CRT_KEY: &str = "ca.crt";
/// Secret key of the CA private key (PEM).
pub const CA_KEY_KEY: &str = "ca.key";
/// Secret key of the serving certificate (PEM).
pub const TLS_CRT_KEY: &str = "tls.crt";
/// Secret key of the serving private key (PEM).
pub const TLS_KEY_KEY: &str = "tls.key";

/// The webhook's CA and serving certificate, all PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookTls {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Secret type of the stored material (`tls.crt` and `tls.key`, plus the CA).
pub(super) const SECRET_TYPE: &str = "kubernetes.io/tls";

/// The Secret `stringData` holding `tls`.
pub fn secret_data(tls: &WebhookTls) -> BTreeMap<String, String> {
    BTreeMap::from([
        (CA_CRT_KEY.to_owned(), tls.ca_cert_pem.clone()),
        (CA_KEY_KEY.to_owned(), tls.ca_key_pem.clone()),
        (TLS_CRT_KEY.to_owned(), tls.cert_pem.clone()),
        (TLS_KEY_KEY.to_owned(), tls.key_pem.clone()),
    ])
}

/// The material back from Secret data; `None` when any of the four keys is missing.
pub fn from_secret_data(data: &BTreeMap<String, String>) -> Option<WebhookTls> {
    Some(WebhookTls {
        ca_cert_pem: data.get(CA_CRT_KEY)?.clone(),
        ca_key_pem: data.get(CA_KEY_KEY)?.clone(),
        cert_pem: data.get(TLS_CRT_KEY)?.clone(),
        key_pem: data.get(TLS_KEY_KEY)?.clone(),
    })
}

/// The four PEM values of `secret`, if it has them all.
pub(super) fn stored(secret: &Secret) -> Option<WebhookTls> {
    let data: BTreeMap<String, String> = secret
        .data
        .as_ref()?
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
        .collect();
    from_secret_data(&data)
}

pub(super) fn secret_bytes(material: &WebhookTls) -> BTreeMap<String, ByteString> {
    secret_data(material)
        .into_iter()
        .map(|(k, v)| (k, ByteString(v.into_bytes())))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::tls::generate;

    #[test]
    fn secret_data_round_trip() {
        let tls = generate("svc", "ns", SystemTime::now()).expect("generate");
        let data = secret_data(&tls);
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>(),
            ["ca.crt", "ca.key", "tls.crt", "tls.key"]
        );
        assert_eq!(from_secret_data(&data), Some(tls));
        let mut partial = data.clone();
        partial.remove("tls.key");
        assert_eq!(from_secret_data(&partial), None);
    }
}
