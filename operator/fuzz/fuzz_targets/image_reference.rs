//! Image references as tenants write them in pod specs, and the pull secrets tenants create, as
//! the webhook's image lookup reads them: `registry::normalize_reference`,
//! `PullAuth::from_secrets` and `PullAuth::credentials_for`.
//!
//! Input: one byte choosing the secret type (even: `kubernetes.io/dockerconfigjson`, odd: the
//! legacy `kubernetes.io/dockercfg`), the image reference up to a newline, then the secret's data.
//!
//! Checked, beyond not panicking:
//! - normalizing is idempotent: a normalized reference normalizes to itself;
//! - the credentials found for an image are distinct, at most one per entry of the secret, and
//!   include those of an entry keyed by exactly the image's registry (`username`/`password`);
//! - nothing is cached before a lookup.
#![no_main]

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use libfuzzer_sys::fuzz_target;
use operator::registry::{
    DOCKER_CFG_TYPE, DOCKER_CONFIG_JSON_TYPE, PullAuth, Registry, RegistryConfig,
    normalize_reference,
};
use serde_json::Value;

/// The `(username, password)` of the entry keyed `registry`, when it names them directly (no
/// `auth`) and is not empty.
fn plain_entry(auths: &serde_json::Map<String, Value>, registry: &str) -> Option<(String, String)> {
    let entry = auths.get(registry)?.as_object()?;
    if entry
        .get("auth")
        .is_some_and(|a| !a.is_null() && a.as_str() != Some(""))
    {
        return None;
    }
    let field = |name| match entry.get(name) {
        None | Some(Value::Null) => Some(String::new()),
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => None,
    };
    let (username, password) = (field("username")?, field("password")?);
    (!username.is_empty() || !password.is_empty()).then_some((username, password))
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let (image, config) = match rest.iter().position(|&b| b == b'\n') {
        Some(nl) => (&rest[..nl], &rest[nl + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(image) = std::str::from_utf8(image) else {
        return;
    };

    let reference = normalize_reference(image).ok();
    if let Some(r) = &reference {
        let whole = r.whole();
        let again = normalize_reference(&whole).unwrap_or_else(|e| {
            panic!("{image:?} normalized to {whole:?}, which does not parse: {e}")
        });
        assert_eq!(
            again.whole(),
            whole,
            "normalizing {image:?} is not idempotent"
        );
        assert!(
            !r.registry().is_empty() && !r.repository().is_empty(),
            "{whole:?}"
        );
    }

    let (type_, key) = if kind % 2 == 0 {
        (DOCKER_CONFIG_JSON_TYPE, ".dockerconfigjson")
    } else {
        (DOCKER_CFG_TYPE, ".dockercfg")
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("pull".to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some(type_.to_owned()),
        data: Some(BTreeMap::from([(
            key.to_owned(),
            ByteString(config.to_vec()),
        )])),
        ..Secret::default()
    };
    let auth = PullAuth::from_secrets(&[secret]);
    let found = auth.credentials_for(image);
    for (i, c) in found.iter().enumerate() {
        assert!(!found[..i].contains(c), "{c:?} twice");
    }
    let auths: Option<serde_json::Map<String, Value>> = serde_json::from_slice::<Value>(config)
        .ok()
        .and_then(|v| {
            if kind % 2 == 0 {
                v.get("auths").cloned()
            } else {
                Some(v)
            }
        })
        .and_then(|v| v.as_object().cloned());
    if let Some(auths) = &auths {
        assert!(found.len() <= auths.len(), "more credentials than entries");
    }
    // Where the secret was read at all (a broken one is skipped whole), an entry keyed by the
    // image's registry as written applies to it.
    if let (Some(r), Some(auths)) = (&reference, &auths)
        && !auth.is_empty()
        && let Some((username, password)) = plain_entry(auths, r.registry())
    {
        assert!(
            found
                .iter()
                .any(|c| c.username == username && c.password == password),
            "the entry for {} does not apply to {image:?}: {found:?}",
            r.registry()
        );
    }

    let registry = Registry::new(RegistryConfig::default());
    assert_eq!(registry.cached_image_command(image), None);
});
