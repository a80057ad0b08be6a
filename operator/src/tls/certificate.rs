//! Issuing the webhook's certificates: a self-signed CA and a serving certificate it signs, their
//! renewal, and the check that says when to make new ones. Pure: no Kubernetes I/O.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;

use super::WebhookTls;

/// Common name of the CA.
pub const CA_COMMON_NAME: &str = "relay-operator-webhook-ca";
/// Validity of the CA, in days (10 years).
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Validity of the serving certificate, in days (1 year).
pub const CERT_VALIDITY_DAYS: i64 = 365;
/// A serving certificate expiring within this many days is renewed.
pub const RENEW_BEFORE_DAYS: i64 = 30;

/// Why TLS material could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("time out of range for a certificate: {0}")]
    Time(String),
}

/// The DNS names the serving certificate must carry for `service` in `namespace`.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

fn to_offset(now: SystemTime) -> Result<OffsetDateTime, TlsError> {
    let secs = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).map_err(|e| TlsError::Time(e.to_string()))?,
        Err(e) => i64::try_from(e.duration().as_secs())
            .map(|s| -s)
            .map_err(|e| TlsError::Time(e.to_string()))?,
    };
    OffsetDateTime::from_unix_timestamp(secs).map_err(|e| TlsError::Time(e.to_string()))
}

fn plus_days(t: OffsetDateTime, days: i64) -> Result<OffsetDateTime, TlsError> {
    t.checked_add(Duration::days(days))
        .ok_or_else(|| TlsError::Time(format!("{t} + {days} days overflows")))
}

/// Certificates are valid from this long before they are made, so an API server whose clock runs
/// a little behind the operator's accepts them at once.
const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

/// A CA (ECDSA P-256, 10 years) and a serving certificate it signs (ECDSA P-256, 1 year) for
/// the Service `service` in `namespace`, both valid from `now` (less [`CLOCK_SKEW`]).
pub fn generate(service: &str, namespace: &str, now: SystemTime) -> Result<WebhookTls, TlsError> {
    generate_with_ips(service, namespace, &[], now)
}

/// As [`generate`], with `ips` as IP address SANs of the serving certificate besides the DNS
/// names (a webhook registered by `url: https://127.0.0.1:PORT/...`, as in tests).
pub fn generate_with_ips(
    service: &str,
    namespace: &str,
    ips: &[IpAddr],
    now: SystemTime,
) -> Result<WebhookTls, TlsError> {
    let issued = to_offset(now)?;
    let start = to_offset(now.checked_sub(CLOCK_SKEW).unwrap_or(now))?;

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::default();
    let mut ca_dn = DistinguishedName::new();
    ca_dn.push(DnType::CommonName, CA_COMMON_NAME);
    ca_params.distinguished_name = ca_dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = start;
    ca_params.not_after = plus_days(issued, CA_VALIDITY_DAYS)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_cert_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let (cert_pem, key_pem) = serving(&issuer, service, namespace, ips, now)?;
    Ok(WebhookTls {
        ca_cert_pem,
        ca_key_pem,
        cert_pem,
        key_pem,
    })
}

/// New material in place of `old`: a new serving certificate signed by `old`'s CA while that CA
/// stays valid for the whole life of the new certificate, else (or when the CA cannot be read) a
/// new CA too ([`generate_with_ips`]). Keeping the CA keeps the webhook's `caBundle` valid
/// through the renewal: the API server trusts the new certificate before anyone patches it.
pub fn renew_with_ips(
    old: Option<&WebhookTls>,
    service: &str,
    namespace: &str,
    ips: &[IpAddr],
    now: SystemTime,
) -> Result<WebhookTls, TlsError> {
    let Some(old) = old.filter(|old| ca_lasts(&old.ca_cert_pem, now)) else {
        return generate_with_ips(service, namespace, ips, now);
    };
    let issuer = KeyPair::from_pem(&old.ca_key_pem)
        .and_then(|key| Issuer::from_ca_cert_pem(&old.ca_cert_pem, key));
    let Ok(issuer) = issuer else {
        return generate_with_ips(service, namespace, ips, now);
    };
    let (cert_pem, key_pem) = serving(&issuer, service, namespace, ips, now)?;
    Ok(WebhookTls {
        ca_cert_pem: old.ca_cert_pem.clone(),
        ca_key_pem: old.ca_key_pem.clone(),
        cert_pem,
        key_pem,
    })
}

/// Whether the CA certificate `ca_pem` is valid now and for a whole serving certificate's life
/// (plus a day) from now.
fn ca_lasts(ca_pem: &str, now: SystemTime) -> bool {
    let parsed = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes());
    let Ok((_, pem)) = parsed else { return false };
    let Ok(cert) = pem.parse_x509() else {
        return false;
    };
    let (Ok(now), validity) = (to_offset(now), cert.validity()) else {
        return false;
    };
    plus_days(now, CERT_VALIDITY_DAYS + 1).is_ok_and(|end| {
        validity.not_before.to_datetime() <= now && end < validity.not_after.to_datetime()
    })
}

/// A serving certificate (ECDSA P-256, [`CERT_VALIDITY_DAYS`]) for `service` in `namespace`
/// and `ips`, signed by `issuer`; certificate and key PEM.
fn serving(
    issuer: &Issuer<'_, KeyPair>,
    service: &str,
    namespace: &str,
    ips: &[IpAddr],
    now: SystemTime,
) -> Result<(String, String), TlsError> {
    let issued = to_offset(now)?;
    let start = to_offset(now.checked_sub(CLOCK_SKEW).unwrap_or(now))?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(dns_names(service, namespace))?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{service}.{namespace}.svc"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = start;
    params.not_after = plus_days(issued, CERT_VALIDITY_DAYS)?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// True when `cert_pem` cannot be parsed, expires within [`RENEW_BEFORE_DAYS`] of `now` (or is
/// not yet valid), or lacks one of the DNS names of `service` in `namespace`.
pub fn needs_renewal(cert_pem: &str, service: &str, namespace: &str, now: SystemTime) -> bool {
    needs_renewal_with_ips(cert_pem, service, namespace, &[], now)
}

/// As [`needs_renewal`], and also true when the certificate lacks one of `ips` as an IP SAN.
pub fn needs_renewal_with_ips(
    cert_pem: &str,
    service: &str,
    namespace: &str,
    ips: &[IpAddr],
    now: SystemTime,
) -> bool {
    !still_good(cert_pem, service, namespace, ips, now).unwrap_or(false)
}

fn still_good(
    cert_pem: &str,
    service: &str,
    namespace: &str,
    ips: &[IpAddr],
    now: SystemTime,
) -> Option<bool> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let now = to_offset(now).ok()?;
    let validity = cert.validity();
    let renew_at = validity
        .not_after
        .to_datetime()
        .checked_sub(Duration::days(RENEW_BEFORE_DAYS))?;
    if now >= renew_at || now < validity.not_before.to_datetime() {
        return Some(false);
    }
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let present: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
        .collect();
    let present_ips: Vec<&[u8]> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::IPAddress(ip) => Some(*ip),
            _ => None,
        })
        .collect();
    let has_ip = |ip: &IpAddr| {
        let octets = match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        present_ips.contains(&octets.as_slice())
    };
    Some(
        dns_names(service, namespace)
            .iter()
            .all(|want| present.contains(&want.as_str()))
            && ips.iter().all(has_ip),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use std::time::Duration as StdDuration;

    const DAY: StdDuration = StdDuration::from_secs(86_400);

    fn der(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .expect("pem")
            .1
            .contents
    }

    #[test]
    fn serving_cert_verifies_against_ca_for_every_name() {
        let now = SystemTime::now();
        let tls = generate("relay-webhook", "relay-system", now).expect("generate");
        let ca_der = CertificateDer::from(der(&tls.ca_cert_pem));
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).expect("anchor");
        let leaf_der = CertificateDer::from(der(&tls.cert_pem));
        let leaf = webpki::EndEntityCert::try_from(&leaf_der).expect("leaf");
        let at = UnixTime::since_unix_epoch(
            (now + StdDuration::from_secs(60))
                .duration_since(UNIX_EPOCH)
                .expect("epoch"),
        );
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            at,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .expect("chain verifies");
        for name in dns_names("relay-webhook", "relay-system") {
            let sn = ServerName::try_from(name.as_str()).expect("name");
            leaf.verify_is_valid_for_subject_name(&sn)
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        let other = ServerName::try_from("other.relay-system.svc").expect("name");
        assert!(leaf.verify_is_valid_for_subject_name(&other).is_err());
    }

    /// Whether `tls`'s serving certificate chains to its CA at `at`.
    fn chains(tls: &WebhookTls, at: SystemTime) -> bool {
        let ca_der = CertificateDer::from(der(&tls.ca_cert_pem));
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).expect("anchor");
        let leaf_der = CertificateDer::from(der(&tls.cert_pem));
        let leaf = webpki::EndEntityCert::try_from(&leaf_der).expect("leaf");
        let at = UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).expect("epoch"));
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            at,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .is_ok()
    }

    #[test]
    fn renewal_keeps_a_ca_that_outlives_the_new_certificate() {
        let made = SystemTime::now() - 340 * DAY;
        let old = generate("svc", "ns", made).expect("generate");
        let now = SystemTime::now();
        assert!(needs_renewal(&old.cert_pem, "svc", "ns", now));
        let renewed = renew_with_ips(Some(&old), "svc", "ns", &[], now).expect("renew");
        assert_eq!(renewed.ca_cert_pem, old.ca_cert_pem);
        assert_eq!(renewed.ca_key_pem, old.ca_key_pem);
        assert_ne!(renewed.cert_pem, old.cert_pem);
        assert_ne!(renewed.key_pem, old.key_pem);
        assert!(!needs_renewal(&renewed.cert_pem, "svc", "ns", now));
        assert!(chains(&renewed, now + 300 * DAY));
    }

    #[test]
    fn renewal_makes_a_new_ca_when_the_old_one_ends_too_soon_or_is_unreadable() {
        // A CA made 9.5 years ago ends within the new certificate's year.
        let old = generate("svc", "ns", SystemTime::now() - 3470 * DAY).expect("generate");
        let now = SystemTime::now();
        let renewed = renew_with_ips(Some(&old), "svc", "ns", &[], now).expect("renew");
        assert_ne!(renewed.ca_cert_pem, old.ca_cert_pem);
        assert!(chains(&renewed, now + 300 * DAY));
        let broken = WebhookTls {
            ca_key_pem: "not a key".to_owned(),
            ..generate("svc", "ns", now).expect("generate")
        };
        let renewed = renew_with_ips(Some(&broken), "svc", "ns", &[], now).expect("renew");
        assert_ne!(renewed.ca_cert_pem, broken.ca_cert_pem);
        assert!(chains(&renewed, now));
        let first = renew_with_ips(None, "svc", "ns", &[], now).expect("renew");
        assert!(chains(&first, now));
    }

    #[test]
    fn ca_subject_and_validity() {
        let now = SystemTime::now();
        let tls = generate("w", "ns", now).expect("generate");
        let (_, pem) = x509_parser::pem::parse_x509_pem(tls.ca_cert_pem.as_bytes()).expect("pem");
        let ca = pem.parse_x509().expect("ca");
        assert!(ca.is_ca());
        assert_eq!(ca.subject().to_string(), format!("CN={CA_COMMON_NAME}"));
        let days =
            (ca.validity().not_after.timestamp() - ca.validity().not_before.timestamp()) / 86_400;
        assert_eq!(days, CA_VALIDITY_DAYS);
        let (_, pem) = x509_parser::pem::parse_x509_pem(tls.cert_pem.as_bytes()).expect("pem");
        let leaf = pem.parse_x509().expect("leaf");
        assert_eq!(leaf.issuer(), ca.subject());
        let days = (leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp())
            / 86_400;
        assert_eq!(days, CERT_VALIDITY_DAYS);
    }

    #[test]
    fn sans_present() {
        let tls = generate("svc", "ns", SystemTime::now()).expect("generate");
        let (_, pem) = x509_parser::pem::parse_x509_pem(tls.cert_pem.as_bytes()).expect("pem");
        let cert = pem.parse_x509().expect("cert");
        let san = cert
            .subject_alternative_name()
            .expect("ext")
            .expect("san present");
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => (*d).to_owned(),
                other => panic!("unexpected SAN {other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            ["svc", "svc.ns", "svc.ns.svc", "svc.ns.svc.cluster.local"]
        );
    }

    #[test]
    fn fresh_cert_needs_no_renewal() {
        let now = SystemTime::now();
        let tls = generate("svc", "ns", now).expect("generate");
        assert!(!needs_renewal(&tls.cert_pem, "svc", "ns", now));
        assert!(!needs_renewal(&tls.cert_pem, "svc", "ns", now + 300 * DAY));
    }

    #[test]
    fn garbage_needs_renewal() {
        let now = SystemTime::now();
        assert!(needs_renewal("", "svc", "ns", now));
        assert!(needs_renewal("not a certificate", "svc", "ns", now));
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(needs_renewal(garbage, "svc", "ns", now));
    }

    #[test]
    fn nearly_expired_cert_needs_renewal() {
        let now = SystemTime::now();
        let tls = generate("svc", "ns", now - 364 * DAY).expect("generate");
        assert!(needs_renewal(&tls.cert_pem, "svc", "ns", now));
        assert!(needs_renewal(&tls.cert_pem, "svc", "ns", now + 2 * DAY));
    }

    #[test]
    fn other_service_needs_renewal() {
        let now = SystemTime::now();
        let tls = generate("svc", "ns", now).expect("generate");
        assert!(needs_renewal(&tls.cert_pem, "svc", "other-ns", now));
        assert!(needs_renewal(&tls.cert_pem, "other", "ns", now));
    }

    #[test]
    fn ip_sans_verify_and_are_required() {
        let now = SystemTime::now();
        let loopback = IpAddr::from([127, 0, 0, 1]);
        let tls = generate_with_ips("svc", "ns", &[loopback], now).expect("generate");
        assert!(!needs_renewal_with_ips(
            &tls.cert_pem,
            "svc",
            "ns",
            &[loopback],
            now
        ));
        assert!(!needs_renewal(&tls.cert_pem, "svc", "ns", now));
        let other = IpAddr::from([10, 0, 0, 1]);
        assert!(needs_renewal_with_ips(
            &tls.cert_pem,
            "svc",
            "ns",
            &[other],
            now
        ));
        let without = generate("svc", "ns", now).expect("generate");
        assert!(needs_renewal_with_ips(
            &without.cert_pem,
            "svc",
            "ns",
            &[loopback],
            now
        ));

        let leaf_der = CertificateDer::from(der(&tls.cert_pem));
        let leaf = webpki::EndEntityCert::try_from(&leaf_der).expect("leaf");
        let name = ServerName::from(loopback);
        leaf.verify_is_valid_for_subject_name(&name)
            .expect("valid for 127.0.0.1");
        let name = ServerName::from(other);
        assert!(leaf.verify_is_valid_for_subject_name(&name).is_err());
    }
}
