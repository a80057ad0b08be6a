//! The entrypoint lookup against a real registry (Debian's distribution 2.8, images built with
//! umoci and pushed with skopeo, see `testbed::registry`), and the pull secrets of a pod read from
//! a real API server.
//!
//! The test bed is blocking (it polls with reqwest's blocking client), so each test builds its
//! fixtures first and then runs the async lookups on a runtime of its own.

use std::{
    collections::BTreeMap,
    future::Future,
    net::{Ipv4Addr, TcpListener},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use k8s_openapi::{
    ByteString,
    api::core::v1::{LocalObjectReference, Namespace, Pod, PodSpec, Secret, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::api::{Api, PostParams};
use operator::{
    mutate::ImageCommand,
    registry::{
        DOCKER_CONFIG_JSON_TYPE, Platform, PodImageLookup, PullAuth, Registry, RegistryConfig,
        RegistryError, pull_auth_for_pod,
    },
    webhook::ImageLookup,
};
use testbed::{
    kube::KubeApi,
    registry::{self as bed, Format, Image},
};

fn block_on<F: Future>(future: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(future),
        Err(e) => panic!("cannot start a tokio runtime: {e}"),
    }
}

/// A lookup client for the test bed's plain-HTTP loopback registries.
fn lookup(config: RegistryConfig) -> Registry {
    Registry::new(RegistryConfig {
        insecure_localhost: true,
        ..config
    })
}

fn local() -> Registry {
    lookup(RegistryConfig::default())
}

fn command(entrypoint: &[&str], cmd: &[&str]) -> ImageCommand {
    ImageCommand {
        entrypoint: entrypoint.iter().map(|s| (*s).to_owned()).collect(),
        cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// A `kubernetes.io/dockerconfigjson` secret with one registry entry (`auth` = base64 user:pass).
fn pull_secret(name: &str, registry: &str, user: &str, password: &str) -> Secret {
    let config = serde_json::json!({
        "auths": { registry: { "auth": BASE64.encode(format!("{user}:{password}")) } }
    });
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some(DOCKER_CONFIG_JSON_TYPE.to_owned()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_owned(),
            ByteString(config.to_string().into_bytes()),
        )])),
        ..Secret::default()
    }
}

#[test]
fn oci_and_docker_v2_manifests_give_entrypoint_and_cmd() {
    let Some(registry) = bed::Registry::start_or_skip(None) else {
        return;
    };
    let host = registry.host();
    let image = Image::new("linux", "amd64")
        .entrypoint(["/bin/app", "--flag"])
        .cmd(["serve", "--port=80"]);
    registry.push("app:oci", &image, Format::Oci).unwrap();
    registry
        .push("app:docker", &image, Format::DockerV2)
        .unwrap();
    registry
        .push(
            "plain:cmd-only",
            &Image::new("linux", "amd64").cmd(["sh", "-c", "echo hi"]),
            Format::Oci,
        )
        .unwrap();
    registry
        .push("plain:nothing", &Image::new("linux", "amd64"), Format::Oci)
        .unwrap();

    let lookup = local();
    let auth = PullAuth::anonymous();
    block_on(async {
        let expected = command(&["/bin/app", "--flag"], &["serve", "--port=80"]);
        for tag in ["oci", "docker"] {
            let image = format!("{host}/app:{tag}");
            let started = Instant::now();
            let got = lookup.image_command(&image, &auth).await;
            let first = started.elapsed();
            assert_eq!(got, Ok(expected.clone()), "{tag}");
            let started = Instant::now();
            let again = lookup.image_command(&image, &auth).await;
            eprintln!(
                "{tag}: first lookup {first:?}, cached {:?}",
                started.elapsed()
            );
            assert_eq!(again, Ok(expected.clone()), "{tag}, cached");
        }
        assert_eq!(
            lookup
                .image_command(&format!("{host}/plain:cmd-only"), &auth)
                .await,
            Ok(command(&[], &["sh", "-c", "echo hi"]))
        );
        assert_eq!(
            lookup
                .image_command(&format!("{host}/plain:nothing"), &auth)
                .await,
            Ok(ImageCommand::default())
        );
    });
}

#[test]
fn multi_arch_index_resolves_to_the_configured_platform() {
    let Some(registry) = bed::Registry::start_or_skip(None) else {
        return;
    };
    let host = registry.host();
    let digest = registry
        .push_index(
            "multi:v1",
            &[
                Image::new("linux", "amd64").entrypoint(["/amd64"]),
                Image::new("linux", "arm64")
                    .variant("v8")
                    .entrypoint(["/arm64"]),
                Image::new("linux", "arm")
                    .variant("v6")
                    .entrypoint(["/armv6"]),
                Image::new("linux", "arm")
                    .variant("v7")
                    .entrypoint(["/armv7"]),
            ],
        )
        .unwrap();
    let image = format!("{host}/multi:v1");
    let pinned = format!("{host}/multi@{digest}");
    let auth = PullAuth::anonymous();
    let on = |platform: &str| {
        lookup(RegistryConfig {
            platform: platform.parse().unwrap(),
            ..RegistryConfig::default()
        })
    };
    block_on(async {
        let amd64 = on("linux/amd64");
        assert_eq!(
            amd64.image_command(&image, &auth).await,
            Ok(command(&["/amd64"], &[]))
        );
        assert_eq!(
            amd64.image_command(&pinned, &auth).await,
            Ok(command(&["/amd64"], &[]))
        );
        // arm64 without a variant is v8; 32-bit ARM prefers its own variant, then the newest
        // older one.
        for (platform, entrypoint) in [
            ("linux/arm64", "/arm64"),
            ("linux/arm64/v8", "/arm64"),
            ("linux/arm/v7", "/armv7"),
            ("linux/arm/v8", "/armv7"),
            ("linux/arm/v6", "/armv6"),
        ] {
            assert_eq!(
                on(platform).image_command(&image, &auth).await,
                Ok(command(&[entrypoint], &[])),
                "{platform}"
            );
        }
        for platform in ["linux/arm/v5", "linux/s390x", "windows/amd64"] {
            match on(platform).image_command(&image, &auth).await {
                Err(e @ RegistryError::NoPlatform { .. }) => {
                    let message = e.to_string();
                    assert!(
                        message.contains(platform)
                            && message.contains(
                                "linux/amd64, linux/arm64/v8, linux/arm/v6, linux/arm/v7"
                            ),
                        "{message}"
                    );
                }
                other => panic!("{platform}: {other:?}"),
            }
        }
    });
    // The default platform is this machine's.
    if cfg!(target_arch = "x86_64") {
        assert_eq!(Platform::node(), Platform::new("linux", "amd64", None));
    }
}

#[test]
fn htpasswd_auth_through_a_dockerconfigjson_secret() {
    let Some(registry) = bed::Registry::start_or_skip(Some(("alice", "s3cret"))) else {
        return;
    };
    let host = registry.host();
    registry
        .push(
            "private/app:v1",
            &Image::new("linux", "amd64").entrypoint(["/private"]),
            Format::Oci,
        )
        .unwrap();
    let image = format!("{host}/private/app:v1");
    let with = |secrets: &[Secret]| PullAuth::from_secrets(secrets);
    block_on(async {
        // A fresh lookup client per case: the caches are shared by all callers.
        assert_eq!(
            local()
                .image_command(&image, &with(&[pull_secret("s", &host, "alice", "s3cret")]))
                .await,
            Ok(command(&["/private"], &[]))
        );
        // The same registry key in the URL form of `docker login`.
        assert_eq!(
            local()
                .image_command(
                    &image,
                    &with(&[pull_secret(
                        "s",
                        &format!("http://{host}/"),
                        "alice",
                        "s3cret"
                    )])
                )
                .await,
            Ok(command(&["/private"], &[]))
        );
        for (case, auth) in [
            (
                "wrong password",
                with(&[pull_secret("s", &host, "alice", "nope")]),
            ),
            ("no secret", PullAuth::anonymous()),
            (
                "secret for another registry",
                with(&[pull_secret("s", "127.0.0.1:1", "alice", "s3cret")]),
            ),
        ] {
            match local().image_command(&image, &auth).await {
                Err(e @ RegistryError::Unauthorized { .. }) => {
                    let message = e.to_string();
                    assert!(message.contains(&image), "{case}: {message}");
                }
                other => panic!("{case}: {other:?}"),
            }
        }
        // A more specific key with a wrong password is tried first, then the host's.
        let both = with(&[
            pull_secret("a", &host, "alice", "s3cret"),
            pull_secret("b", &format!("{host}/private"), "alice", "nope"),
        ]);
        assert_eq!(
            local().image_command(&image, &both).await,
            Ok(command(&["/private"], &[]))
        );
    });
}

#[test]
fn unknown_image_or_tag_is_not_found() {
    let Some(registry) = bed::Registry::start_or_skip(None) else {
        return;
    };
    let host = registry.host();
    registry
        .push("known:v1", &Image::new("linux", "amd64"), Format::Oci)
        .unwrap();
    let lookup = local();
    let auth = PullAuth::anonymous();
    block_on(async {
        for image in [
            format!("{host}/unknown:v1"),
            format!("{host}/known:v2"),
            format!("{host}/known@sha256:{}", "0".repeat(64)),
        ] {
            match lookup.image_command(&image, &auth).await {
                Err(e @ RegistryError::NotFound { .. }) => {
                    assert!(e.to_string().contains(&image), "{e}");
                }
                other => panic!("{image}: {other:?}"),
            }
        }
        assert!(matches!(
            lookup.image_command("Not A Reference", &auth).await,
            Err(RegistryError::InvalidReference { .. })
        ));
    });
}

#[test]
fn registry_down_or_silent_is_unreachable_within_the_timeout() {
    let Some(mut registry) = bed::Registry::start_or_skip(None) else {
        return;
    };
    let host = registry.host();
    registry
        .push("app:v1", &Image::new("linux", "amd64"), Format::Oci)
        .unwrap();
    registry.stop();
    // A port that accepts connections (the kernel's backlog) but never answers.
    let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let silent_host = silent.local_addr().unwrap().to_string();

    let timeout = Duration::from_secs(2);
    let lookup = lookup(RegistryConfig {
        timeout,
        ..RegistryConfig::default()
    });
    let auth = PullAuth::anonymous();
    block_on(async {
        for (case, image) in [
            ("stopped", format!("{host}/app:v1")),
            ("silent", format!("{silent_host}/app:v1")),
        ] {
            let started = Instant::now();
            let result = lookup.image_command(&image, &auth).await;
            let took = started.elapsed();
            match result {
                Err(e @ RegistryError::Unreachable { .. }) => {
                    eprintln!("{case}: {e} (after {took:?})");
                    assert!(e.to_string().contains(&image), "{e}");
                }
                other => panic!("{case}: {other:?}"),
            }
            assert!(took < timeout + Duration::from_secs(1), "{case}: {took:?}");
            if case == "silent" {
                assert!(took >= timeout, "{case} gave up early: {took:?}");
            }
        }
    });
}

#[test]
fn digest_pinned_lookups_are_served_from_the_cache_after_the_registry_stops() {
    let Some(mut registry) = bed::Registry::start_or_skip(None) else {
        return;
    };
    let host = registry.host();
    let digest = registry
        .push(
            "cached:v1",
            &Image::new("linux", "amd64")
                .entrypoint(["/cached"])
                .cmd(["arg"]),
            Format::Oci,
        )
        .unwrap();
    let pinned = format!("{host}/cached@{digest}");
    let tag = format!("{host}/cached:v1");
    let expected = command(&["/cached"], &["arg"]);
    let auth = PullAuth::anonymous();
    // Tags re-resolved at once (no TTL), digests kept.
    let lookup = lookup(RegistryConfig {
        tag_ttl: Duration::ZERO,
        timeout: Duration::from_secs(2),
        ..RegistryConfig::default()
    });
    block_on(async {
        assert_eq!(
            lookup.image_command(&pinned, &auth).await,
            Ok(expected.clone())
        );
        assert_eq!(
            lookup.image_command(&tag, &auth).await,
            Ok(expected.clone())
        );
    });
    registry.stop();
    block_on(async {
        assert_eq!(
            lookup.image_command(&pinned, &auth).await,
            Ok(expected.clone())
        );
        // A clone shares the cache.
        assert_eq!(
            lookup.clone().image_command(&pinned, &auth).await,
            Ok(expected.clone())
        );
        assert!(matches!(
            lookup.image_command(&tag, &auth).await,
            Err(RegistryError::Unreachable { .. })
        ));
    });
}

#[test]
fn tags_are_cached_for_their_ttl() {
    let Some(mut registry) = bed::Registry::start_or_skip(None) else {
        return;
    };
    let host = registry.host();
    registry
        .push(
            "app:v1",
            &Image::new("linux", "amd64").entrypoint(["/v1"]),
            Format::Oci,
        )
        .unwrap();
    let tag = format!("{host}/app:v1");
    let auth = PullAuth::anonymous();
    let lookup = local();
    block_on(async {
        assert_eq!(
            lookup.image_command(&tag, &auth).await,
            Ok(command(&["/v1"], &[]))
        );
    });
    registry.stop();
    block_on(async {
        assert_eq!(
            lookup.image_command(&tag, &auth).await,
            Ok(command(&["/v1"], &[]))
        );
    });
}

#[test]
fn pull_auth_for_pod_reads_the_pod_and_service_account_secrets() {
    let Some(registry) = bed::Registry::start_or_skip(Some(("bob", "pw"))) else {
        return;
    };
    let Some(kube) = KubeApi::start_or_skip() else {
        return;
    };
    let host = registry.host();
    registry
        .push(
            "team/app:v1",
            &Image::new("linux", "amd64").entrypoint(["/team"]),
            Format::DockerV2,
        )
        .unwrap();
    let image = format!("{host}/team/app:v1");
    let kubeconfig = kube.kubeconfig_path();
    block_on(async {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for ns in ["from-pod", "from-sa", "from-default-sa"] {
            let namespace = Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.to_owned()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            };
            namespaces
                .create(&PostParams::default(), &namespace)
                .await
                .unwrap();
        }
        let create_secret = |ns: &str, secret: Secret| {
            let api: Api<Secret> = Api::namespaced(client.clone(), ns);
            async move { api.create(&PostParams::default(), &secret).await.unwrap() }
        };
        let create_sa = |ns: &str, name: &str, secrets: &[&str]| {
            let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
            let sa = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                image_pull_secrets: Some(secrets.iter().map(|s| reference(s)).collect()),
                ..ServiceAccount::default()
            };
            async move { api.create(&PostParams::default(), &sa).await.unwrap() }
        };
        let pod = |ns: &str, account: Option<&str>, secrets: &[&str]| Pod {
            metadata: ObjectMeta {
                name: Some("p".to_owned()),
                namespace: Some(ns.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                service_account_name: account.map(str::to_owned),
                image_pull_secrets: Some(secrets.iter().map(|s| reference(s)).collect()),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        let lookup = || local();

        // Referenced from the pod; a missing secret next to it is skipped.
        create_secret("from-pod", pull_secret("creds", &host, "bob", "pw")).await;
        let auth = pull_auth_for_pod(&client, &pod("from-pod", None, &["absent", "creds"])).await;
        assert_eq!(auth.credentials_for(&image).len(), 1);
        assert_eq!(
            lookup().image_command(&image, &auth).await,
            Ok(command(&["/team"], &[]))
        );
        // The same namespace without the reference: nothing (no `default` service account here).
        let none = pull_auth_for_pod(&client, &pod("from-pod", None, &[])).await;
        assert!(none.is_empty());
        assert!(matches!(
            lookup().image_command(&image, &none).await,
            Err(RegistryError::Unauthorized { .. })
        ));

        // Referenced from the pod's service account, with a wrong password in the pod's own
        // secret: both are read, and the right one is found.
        create_secret("from-sa", pull_secret("sa-creds", &host, "bob", "pw")).await;
        create_secret("from-sa", pull_secret("bad", &host, "bob", "wrong")).await;
        create_sa("from-sa", "builder", &["sa-creds"]).await;
        let auth = pull_auth_for_pod(&client, &pod("from-sa", Some("builder"), &["bad"])).await;
        assert_eq!(auth.credentials_for(&image).len(), 2);
        assert_eq!(
            lookup().image_command(&image, &auth).await,
            Ok(command(&["/team"], &[]))
        );

        // No serviceAccountName: the `default` service account's.
        create_secret("from-default-sa", pull_secret("d", &host, "bob", "pw")).await;
        create_sa("from-default-sa", "default", &["d"]).await;
        let auth = pull_auth_for_pod(&client, &pod("from-default-sa", None, &[])).await;
        assert_eq!(
            lookup().image_command(&image, &auth).await,
            Ok(command(&["/team"], &[]))
        );

        // The webhook's lookup reads the pull secrets only for images the caches don't know:
        // once learnt, an image resolves with an API server that does not answer.
        let registry = local();
        let pod = pod("from-sa", Some("builder"), &[]);
        let learn = PodImageLookup {
            registry: registry.clone(),
            client: client.clone(),
        };
        let got = learn.lookup(&pod, vec![image.clone()]).await;
        assert_eq!(got[&image], Ok(command(&["/team"], &[])));
        let dead = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
            .unwrap();
        let cached = PodImageLookup {
            registry,
            client: dead,
        };
        let other = format!("{host}/team/app:v2");
        let got = cached
            .lookup(&pod, vec![image.clone(), other.clone()])
            .await;
        assert_eq!(got[&image], Ok(command(&["/team"], &[])));
        // Not cached: the secrets can't be read, so the private registry refuses.
        assert!(
            got[&other]
                .as_ref()
                .is_err_and(|e| e.contains("unauthorized")),
            "{got:?}"
        );
    });
}

fn reference(name: &str) -> LocalObjectReference {
    LocalObjectReference {
        name: name.to_owned(),
    }
}
