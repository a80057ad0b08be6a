//! The registry test bed: images built with umoci and pushed with skopeo land in a real
//! distribution 2.8, in the formats the tests rely on.

use reqwest::blocking::Client;
use testbed::registry::{Format, Image, Registry};

/// GETs a manifest with an `Accept` header listing OCI and Docker types; returns the
/// `Content-Type` and the parsed body.
fn manifest(
    client: &Client,
    registry: &Registry,
    path: &str,
    creds: Option<(&str, &str)>,
) -> (u16, String, serde_json::Value) {
    let mut request = client
        .get(format!("http://{}/v2/{path}", registry.host()))
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
             application/vnd.docker.distribution.manifest.v2+json",
        );
    if let Some((user, password)) = creds {
        request = request.basic_auth(user, Some(password));
    }
    let response = match request.send() {
        Ok(response) => response,
        Err(e) => panic!("GET {path}: {e}"),
    };
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = match response.bytes() {
        Ok(body) => body,
        Err(e) => panic!("GET {path}: {e}"),
    };
    (
        status,
        content_type,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn images_are_pushed_as_oci_docker_v2_and_index() {
    let Some(registry) = Registry::start_or_skip(None) else {
        return;
    };
    let client = Client::new();
    let image = Image::new("linux", "amd64")
        .entrypoint(["/bin/app", "--flag"])
        .cmd(["serve"]);

    let digest = registry.push("app:oci", &image, Format::Oci).unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let (status, content_type, body) = manifest(&client, &registry, "app/manifests/oci", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "application/vnd.oci.image.manifest.v1+json");
    // umoci writes no mediaType into its manifests: clients must go by the Content-Type.
    assert!(body.get("mediaType").is_none(), "{body}");

    registry
        .push("app:docker", &image, Format::DockerV2)
        .unwrap();
    let (status, content_type, body) = manifest(&client, &registry, "app/manifests/docker", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        content_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );

    let index = registry
        .push_index(
            "app:multi",
            &[
                Image::new("linux", "amd64").entrypoint(["/amd64"]),
                Image::new("linux", "arm64")
                    .variant("v8")
                    .entrypoint(["/arm64"]),
            ],
        )
        .unwrap();
    let (status, content_type, body) =
        manifest(&client, &registry, &format!("app/manifests/{index}"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "application/vnd.oci.image.index.v1+json");
    let platforms: Vec<_> = body["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"].clone())
        .collect();
    assert_eq!(
        platforms,
        [
            serde_json::json!({"os": "linux", "architecture": "amd64"}),
            serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"}),
        ]
    );
}

#[test]
fn a_registry_with_auth_refuses_anonymous_pulls() {
    let Some(registry) = Registry::start_or_skip(Some(("alice", "s3cret"))) else {
        return;
    };
    let client = Client::new();
    registry
        .push("private:v1", &Image::new("linux", "amd64"), Format::Oci)
        .unwrap();
    let (status, _, _) = manifest(&client, &registry, "private/manifests/v1", None);
    assert_eq!(status, 401);
    let (status, _, _) = manifest(
        &client,
        &registry,
        "private/manifests/v1",
        Some(("alice", "s3cret")),
    );
    assert_eq!(status, 200);
}
