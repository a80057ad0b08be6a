//! The static entrypoint in a real container (containerd + runc, busybox root filesystem) as a
//! tenant pod runs it: bind-mounted read-only at /relay/lib/entrypoint, non-root, read-only root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Api, static_entrypoint};

#[test]
fn ships_from_a_container_as_non_root_with_a_read_only_root() {
    let Some(bin) = static_entrypoint() else {
        return;
    };
    let Some(containerd) = testbed::Containerd::start_or_skip() else {
        return;
    };
    let api = Api::start(&[]);
    let secrets = tempfile::tempdir().unwrap();
    std::fs::set_permissions(secrets.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::copy(api.token_file(), secrets.path().join("token")).unwrap();
    std::fs::set_permissions(
        secrets.path().join("token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let run = testbed::Run::new(
        format!("entrypoint-{}", std::process::id()),
        [
            "/relay/lib/entrypoint",
            "--",
            "sh",
            "-c",
            "echo uid=$(id -u) pid=$PPID; echo to-stderr >&2; touch /x 2>/dev/null || echo read-only; exit 3",
        ],
    )
    .user(65534, 65534)
    .read_only()
    .host_network()
    .bind(&bin, "/relay/lib/entrypoint", true)
    .bind(secrets.path(), "/var/run/relay", true)
    .env("RELAY_METADATA_API_URL", &api.url)
    .env("RELAY_METADATA_API_TOKEN_FILE", "/var/run/relay/token");
    let out = containerd.run(&run).unwrap();
    assert_eq!(out.code, 3, "{out}");
    assert!(
        out.stdout.is_empty(),
        "nothing on the container's own stdout: {out}"
    );
    assert!(
        out.stderr.is_empty(),
        "nothing on the container's own stderr: {out}"
    );
    // The wrapper is the container's PID 1 and the command runs as nobody.
    assert_eq!(api.read("stdout").1, b"uid=65534 pid=1\nread-only\n");
    assert_eq!(api.read("stderr").1, b"to-stderr\n");
}
