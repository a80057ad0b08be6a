//! Secret values are redacted on the collector's path as on the entrypoint's: the real kernel,
//! the real collector, the real entrypoint and the real metadata API; both paths store the same
//! redacted bytes at the same offsets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

const SECRET: &str = "hunter2-Secret";
const OTHER: &str = "Secret-overlap";

/// Writes the values whole, one byte per write (so the collector sees them cut at every
/// chunk), around pauses longer than the collector's poll (so its idle flushes fall inside a
/// value), overlapping, and at the very end.
const SCRIPT: &str = r#"
echo "whole: $S1."
printf 'bytes: '
for c in $(echo "$S1" | fold -w1); do printf %s "$c"; done
echo
printf 'paused: hunter2-'; sleep 0.3; printf 'Secret and hunter2'; sleep 0.3; echo '-Secret-overlap'
echo "err: $S2" >&2
printf 'end: %s' "$S1"
"#;

const WANT: &str = "whole: ***.\nbytes: ***\npaused: *** and ***\nend: ***";

fn secrets(mut cmd: std::process::Command) -> std::process::Command {
    cmd.env("RELAY_REDACT_ENV", "S1,S2")
        .env("S1", SECRET)
        .env("S2", OTHER);
    cmd
}

#[test]
fn both_paths_store_the_same_redacted_bytes() {
    if !can_run() {
        return;
    }
    let api = Api::start(&[]);
    let cg = Cgroup::new("redact");
    let _collector = Collector::start_with(collector_cmd(), &api, &[(&cg.path, CTX)], &[]);
    // The static one `cargo xtask test` builds, else a debug build.
    let entrypoint = std::env::var_os("RELAY_ENTRYPOINT_STATIC").map_or_else(
        || workspace_bin("entrypoint", "entrypoint", "RELAY_ENTRYPOINT_BIN"),
        std::path::PathBuf::from,
    );
    let mut cmd = Cgroup::sh(&cg.path, r#"exec "$0" -- sh -c "$1""#);
    cmd.arg(&entrypoint)
        .arg(SCRIPT)
        .env("RELAY_METADATA_API_URL", &api.url)
        .env("RELAY_METADATA_API_TOKEN_FILE", api.token_file());
    let (code, out, err) = run_piped(secrets(cmd));
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert!(out.is_empty(), "the entrypoint ships, it does not tee");

    for (name, want) in [("stdout", WANT), ("stderr", "err: ***\n")] {
        let (st, ebpf) = complete_ebpf(&api, CTX, name);
        let (ep_st, ep) = api.read(name);
        assert_eq!(String::from_utf8_lossy(&ebpf), want, "ebpf {name}: {st}");
        assert_eq!(String::from_utf8_lossy(&ep), want, "entrypoint {name}");
        assert_eq!(st["final_length"], want.len() as u64, "{st}");
        assert_eq!(ep_st["final_length"], want.len() as u64, "{ep_st}");
        assert_eq!(spans(&st, "dropped"), vec![], "{name}: {st}");
    }
}

#[test]
fn a_container_without_the_entrypoint_is_redacted_too() {
    if !can_run() {
        return;
    }
    let api = Api::start(&[]);
    let cg = Cgroup::new("redact-plain");
    let _collector = Collector::start_with(collector_cmd(), &api, &[(&cg.path, CTX)], &[]);
    let (code, out, _) = run_piped(secrets(Cgroup::sh(&cg.path, SCRIPT)));
    assert_eq!(code, 0);
    assert!(
        String::from_utf8_lossy(&out).contains(SECRET),
        "the workload's own output is untouched"
    );
    let (st, ebpf) = complete_ebpf(&api, CTX, "stdout");
    assert_eq!(String::from_utf8_lossy(&ebpf), WANT, "{st}");
}
