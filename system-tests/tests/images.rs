//! The images of `cargo xtask images` (the archives under `target/images/`, or
//! `RELAY_IMAGES_DIR`): configured as the manifests expect, named as the kind overlay names them,
//! and running on real containerd through CRI (the test bed's), as a kubelet would run them.
//!
//! `cargo xtask test` builds all four images (dev profile) before the tests; the operator and
//! collector images are checked when their archives are there (`cargo xtask images --profile
//! dev` builds them; `deployed.rs` needs them all). Archives left from an earlier build are tested as they are.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use testbed::{
    cri::{ContainerSpec, ContainerState, Cri, PodSpec},
    layout,
    oci_archive::{self, images_dir},
};

/// The unprivileged user of the server images.
const NONROOT: &str = "65532:65532";

/// How long the metadata API may take to answer once started.
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The archive of image `name`, or `None` after [`testbed::skip_or_fail`] when it was not built.
fn required_archive(name: &str) -> Option<PathBuf> {
    let archive = images_dir().join(format!("{name}.tar"));
    if archive.exists() {
        Some(archive)
    } else {
        testbed::skip_or_fail(&format!(
            "{} is missing: run `cargo xtask images --profile dev`",
            archive.display()
        ));
        None
    }
}

/// (image, entrypoint, user) as `cargo xtask images` makes them and the manifests rely on: the
/// Deployments and the tools Job give no `command`, only `args`, and the collector runs as root.
const EXPECTED: &[(&str, &str, &str)] = &[
    ("metadata-api", "/usr/local/bin/metadata-api", NONROOT),
    ("operator", "/usr/local/bin/operator", NONROOT),
    ("collector", "/usr/local/bin/collector", "0:0"),
    ("tools", "/entrypoint", "0:0"),
];

#[test]
fn images_are_configured_and_named_as_the_kind_overlay_expects() {
    if required_archive("metadata-api").is_none() || required_archive("tools").is_none() {
        return;
    }
    let kind = workspace().join("deploy/overlays/kind");
    let overlay = [
        fs::read_to_string(kind.join("kustomization.yaml")).unwrap(),
        fs::read_to_string(kind.join("operator-images.yaml")).unwrap(),
    ]
    .concat();
    let mut checked = Vec::new();
    for &(name, entrypoint, user) in EXPECTED {
        let archive = images_dir().join(format!("{name}.tar"));
        if !archive.exists() {
            eprintln!("{} not built: not checked", archive.display());
            continue;
        }
        let image = oci_archive::read(&archive).unwrap();
        let config = &image.config;
        assert_eq!(config["os"], "linux", "{name}");
        assert_eq!(config["architecture"], "amd64", "{name}");
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!([entrypoint]),
            "{name}"
        );
        assert_eq!(config["config"]["User"], user, "{name}");
        assert!(
            config["config"]["Cmd"].as_array().is_none_or(Vec::is_empty),
            "{name}: {}",
            config["config"]["Cmd"]
        );
        assert_eq!(
            image.manifest["layers"].as_array().map(Vec::len),
            Some(1),
            "{name}: one layer"
        );
        // `kind load` names the image so; the overlay must use that name (tag aside).
        let (repository, _tag) = image.name.rsplit_once(':').unwrap();
        assert_eq!(repository, format!("localhost/relay/{name}"));
        assert!(
            overlay.contains(repository),
            "deploy/overlays/kind does not use {repository}"
        );
        checked.push(name);
    }
    eprintln!("checked {checked:?}");
}

use testbed::ports::free_port;

#[test]
fn metadata_api_image_serves_on_containerd_as_its_user() {
    let Some(archive) = required_archive("metadata-api") else {
        return;
    };
    let Some(cri) = Cri::start_or_skip() else {
        return;
    };
    let image = oci_archive::import(&cri, &archive).unwrap();

    // Storage and key on a host directory the image's user (65532) owns, as the volumes of the
    // Deployment are (fsGroup); the root filesystem read-only, as the Deployment has it.
    let data = tempfile::tempdir().unwrap();
    fs::set_permissions(data.path(), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(data.path(), Some(65532), Some(65532)).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let pod = cri.run_pod(&PodSpec::new("metadata-api")).unwrap();
    let server = pod
        .create_container(
            &ContainerSpec::new("metadata-api", Vec::<String>::new())
                .image(&image)
                .args([
                    "serve",
                    "--listen",
                    &listen,
                    "--storage",
                    "file:///var/lib/relay/streams",
                    "--key-file",
                    "/var/lib/relay/key/metadata-api.key",
                ])
                .bind(data.path(), "/var/lib/relay", false)
                .read_only_rootfs(),
        )
        .unwrap();
    server.start().unwrap();

    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = Instant::now() + SERVE_TIMEOUT;
    for path in ["/healthz", "/readyz"] {
        let url = format!("http://{listen}{path}");
        loop {
            if let Ok(response) = client.get(&url).send() {
                assert_eq!(response.status().as_u16(), 200, "{url}");
                assert_eq!(response.text().unwrap(), "ok\n", "{url}");
                break;
            }
            let state = server.state().unwrap();
            assert!(
                state != ContainerState::Exited,
                "metadata-api exited: {:?}",
                server.logs().ok()
            );
            assert!(
                Instant::now() < deadline,
                "{url} did not answer within {SERVE_TIMEOUT:?} ({state:?}): {:?}",
                server.logs().ok()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // It runs as the image's user: the key it made on first start is 65532's, mode 0600.
    let key = data.path().join("key/metadata-api.key");
    let meta = fs::metadata(&key).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (65532, 65532),
        "{}",
        key.display()
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // The image has what the binary needs at run time: a CA bundle for TLS to object storage
    // and the Kubernetes API, and a user database naming its user (a static busybox from the
    // host looks, as the image has no shell).
    let inspect = pod
        .create_container(
            &ContainerSpec::new(
                "inspect",
                [
                    "/busybox",
                    "sh",
                    "-c",
                    "/busybox id && /busybox grep -c 'BEGIN CERTIFICATE' \
                     /etc/ssl/certs/ca-certificates.crt",
                ],
            )
            .image(&image)
            .bind(layout::busybox(), "/busybox", true)
            .read_only_rootfs(),
        )
        .unwrap();
    inspect.start().unwrap();
    assert_eq!(inspect.wait(Duration::from_secs(30)).unwrap(), 0);
    let out = inspect.logs().unwrap().stdout_text();
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("uid=65532(nonroot) gid=65532(nonroot) groups=65532(nonroot)"),
        "{out}"
    );
    let certificates: usize = lines.next().unwrap().parse().unwrap();
    assert!(certificates > 10, "{certificates} CA certificates");
    pod.stop_and_remove().unwrap();
}

#[test]
fn tools_image_installs_the_entrypoint_as_the_tools_job_runs_it() {
    let Some(archive) = required_archive("tools") else {
        return;
    };
    let Some(cri) = Cri::start_or_skip() else {
        return;
    };
    let image = oci_archive::import(&cri, &archive).unwrap();
    // The tools Job: the operator's default command, the claim at /relay, read-only root, the
    // image's user, a fresh volume owned by root.
    let volume = tempfile::tempdir().unwrap();
    let pod = cri.run_pod(&PodSpec::new("tools")).unwrap();
    let install = pod
        .create_container(
            &ContainerSpec::new("install", ["/entrypoint", "install", "/relay/lib"])
                .image(&image)
                .bind(volume.path(), "/relay", false)
                .read_only_rootfs(),
        )
        .unwrap();
    install.start().unwrap();
    let code = install.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(code, 0, "{:?}", install.logs().ok());
    let installed = volume.path().join("lib/entrypoint");
    let bytes = fs::read(&installed).unwrap();
    assert!(bytes.starts_with(b"\x7fELF"), "{}", installed.display());
    assert_eq!(
        fs::metadata(&installed).unwrap().permissions().mode() & 0o111,
        0o111
    );
    // What `cargo xtask build-entrypoint` built, when the test runs under `cargo xtask test`.
    if let Some(built) = std::env::var_os("RELAY_ENTRYPOINT_STATIC") {
        assert!(bytes == fs::read(&built).unwrap(), "not {built:?}");
    }
    pod.stop_and_remove().unwrap();
}
