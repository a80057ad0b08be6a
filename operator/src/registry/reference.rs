//! Image references, parsed and normalized as Docker and containerd do, and the `host[:port]`
//! split that registry names and pull secret keys share.

use oci_client::Reference;

use super::RegistryError;

/// `image` parsed and normalized as Docker and containerd do it (`busybox` is
/// `docker.io/library/busybox:latest`).
pub fn normalize_reference(image: &str) -> Result<Reference, RegistryError> {
    let reference = Reference::try_from(image).map_err(|e| RegistryError::InvalidReference {
        image: image.to_owned(),
        reason: e.to_string(),
    })?;
    // oci-spec's domain split leaves out one of Docker's rules (distribution/reference's
    // `splitDockerDomain`): a first element with upper-case letters is a registry host
    // (`Registry/team/app` is host `Registry`), as repository paths are lower-case. Without it
    // the lookup would ask Docker Hub about an image the kubelet pulls from another registry.
    let host = image
        .split_once('/')
        .map(|(first, _)| first)
        .filter(|first| {
            !first.contains(['.', ':'])
                && *first != "localhost"
                && first.bytes().any(|b| b.is_ascii_uppercase())
        });
    let Some(host) = host else {
        return Ok(reference);
    };
    let Some(repository) = reference
        .repository()
        .strip_prefix(host)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return Ok(reference);
    };
    let (host, repository) = (host.to_owned(), repository.to_owned());
    Ok(
        match (
            reference.tag().map(str::to_owned),
            reference.digest().map(str::to_owned),
        ) {
            (Some(tag), Some(digest)) => {
                Reference::with_tag_and_digest(host, repository, tag, digest)
            }
            (None, Some(digest)) => Reference::with_digest(host, repository, digest),
            (tag, None) => {
                Reference::with_tag(host, repository, tag.unwrap_or_else(|| "latest".to_owned()))
            }
        },
    )
}

/// `host` and `port` of `host[:port]` (`[v6]:port` too).
pub(super) fn split_host_port(s: &str) -> (&str, Option<&str>) {
    if let Some(rest) = s.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        return (host, after.strip_prefix(':'));
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (s, None),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::registry::PullAuth;
    use crate::registry::auth::tests::{basic, config_json, users};

    #[test]
    fn references_normalize_like_docker() {
        let r = normalize_reference("busybox").unwrap();
        assert_eq!(r.whole(), "docker.io/library/busybox:latest");
        assert_eq!(r.resolve_registry(), "index.docker.io");
        assert_eq!(
            normalize_reference("user/app:1").unwrap().whole(),
            "docker.io/user/app:1"
        );
        let r = normalize_reference("localhost:5000/team/app").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("localhost:5000", "team/app", Some("latest"))
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = normalize_reference(&format!("reg.example.com/app:v1@{digest}")).unwrap();
        assert_eq!(r.digest(), Some(digest.as_str()));
        // Found by the image_reference fuzz target: an upper-case first element is a registry
        // host, as for Docker and containerd, not a Docker Hub namespace (which would not even
        // print back to a reference that parses).
        let pinned = format!("Reg/app:v1@{digest}");
        for (image, whole) in [
            ("Registry/team/app", "Registry/team/app:latest"),
            ("qDp0/org/repo:v2", "qDp0/org/repo:v2"),
            (pinned.as_str(), pinned.as_str()),
        ] {
            let r = normalize_reference(image).unwrap();
            assert_eq!(r.whole(), whole, "{image}");
            assert_eq!(Some(r.registry()), image.split('/').next(), "{image}");
            assert_eq!(normalize_reference(&r.whole()).unwrap().whole(), whole);
        }
        let auth = PullAuth::from_secrets(&[config_json(json!({ "registry": basic("u", "p") }))]);
        assert_eq!(users(&auth, "Registry/team/app"), ["u:p"]);
        assert!(
            users(&auth, "registry/team/app").is_empty(),
            "a Docker Hub namespace"
        );
        for bad in [
            "",
            "reg.example.com/App",
            "app@sha256:short",
            "reg.example.com/app:",
        ] {
            assert!(
                matches!(
                    normalize_reference(bad),
                    Err(RegistryError::InvalidReference { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
