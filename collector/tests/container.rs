//! Real containers (containerd + runc from Debian): the collector attributes a container's
//! cgroup and captures its output; run under the entrypoint, both capture paths read back equal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

const SCRIPT: &str = "echo out-line; echo err-line >&2; i=0; \
    while [ $i -lt 300 ]; do echo line $i; i=$((i+1)); done; \
    head -c 200000 /dev/zero | tr '\\0' x; echo; echo done >&2";

#[test]
fn container_output_is_captured_and_equals_the_entrypoint_path() {
    if !can_run() {
        return;
    }
    let Some(bin) = static_entrypoint() else {
        return;
    };
    let Some(containerd) = testbed::Containerd::start_or_skip() else {
        return;
    };
    let api = Api::start(&[]);
    let cg = Cgroup::new("ctr");
    let _collector = Collector::start_with(collector_cmd(), &api, &[(&cg.path, CTX)], &[]);
    let name = cg.path.file_name().unwrap().to_string_lossy().into_owned();
    let id = std::process::id();

    // A plain container: its stdout and stderr are the shim's pipes.
    let plain = testbed::Run::new(format!("plain-{id}"), ["sh", "-c", SCRIPT])
        .cgroup(format!("/{name}/plain"))
        .host_network();
    let out = containerd.run(&plain).unwrap();
    assert_eq!(out.code, 0, "{out}");
    let (_, stdout) = complete_ebpf(&api, CTX, "plain.stdout");
    let (_, stderr) = complete_ebpf(&api, CTX, "plain.stderr");
    assert!(
        stdout == out.stdout,
        "ebpf stdout differs from the container's: {} against {} bytes, first difference at {:?}",
        stdout.len(),
        out.stdout.len(),
        stdout.iter().zip(&out.stdout).position(|(a, b)| a != b)
    );
    assert_eq!(stderr, out.stderr);

    // The same command under the entrypoint, bind-mounted as the operator mounts it.
    let secrets = tempfile::tempdir().unwrap();
    std::fs::set_permissions(secrets.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::copy(api.token_file(), secrets.path().join("token")).unwrap();
    let wrapped = testbed::Run::new(
        format!("wrapped-{id}"),
        ["/relay/lib/entrypoint", "--", "sh", "-c", SCRIPT],
    )
    .cgroup(format!("/{name}/wrapped"))
    .host_network()
    .bind(&bin, "/relay/lib/entrypoint", true)
    .bind(secrets.path(), "/var/run/relay", true)
    .env("RELAY_METADATA_API_URL", &api.url)
    .env("RELAY_METADATA_API_TOKEN_FILE", "/var/run/relay/token");
    let out = containerd.run(&wrapped).unwrap();
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.is_empty(), "the entrypoint never tees: {out}");
    let (_, ebpf_out) = complete_ebpf(&api, CTX, "wrapped.stdout");
    let (_, ebpf_err) = complete_ebpf(&api, CTX, "wrapped.stderr");
    let (_, entry_out) = api.read("stdout");
    let (_, entry_err) = api.read("stderr");
    assert!(
        ebpf_out == entry_out,
        "the two capture paths differ on stdout"
    );
    assert_eq!(ebpf_err, entry_err);
    assert!(
        entry_out == stdout,
        "and both equal the plain container's output"
    );

    // Again in a pod that shares its process namespace (`shareProcessNamespace`): the command is
    // not its namespace's pid 1, and runc's init still execs in the cgroup before it.
    let shared = testbed::Run::new(
        format!("shared-{id}"),
        ["/relay/lib/entrypoint", "--", "sh", "-c", SCRIPT],
    )
    .cgroup(format!("/{name}/shared"))
    .host_network()
    .host_pid()
    .bind(&bin, "/relay/lib/entrypoint", true)
    .bind(secrets.path(), "/var/run/relay", true)
    .env("RELAY_METADATA_API_URL", &api.url)
    .env("RELAY_METADATA_API_TOKEN_FILE", "/var/run/relay/token")
    .env("RELAY_STDOUT_STREAM", "shared.stdout")
    .env("RELAY_STDERR_STREAM", "shared.stderr");
    let out = containerd.run(&shared).unwrap();
    assert_eq!(out.code, 0, "{out}");
    let (_, ebpf_out) = complete_ebpf(&api, CTX, "shared.stdout");
    let (_, ebpf_err) = complete_ebpf(&api, CTX, "shared.stderr");
    assert!(
        ebpf_out == stdout,
        "ebpf stdout of the shared-pid container"
    );
    assert_eq!(ebpf_err, stderr);
}
