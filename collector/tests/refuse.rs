//! The collector refuses clearly (one line, non-zero exit) when it cannot run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

fn refusal(mut cmd: Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    (out.status.code().unwrap_or(-1), err)
}

#[test]
fn a_directory_that_is_not_a_cgroup_v2_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_collector"));
    cmd.args(["--url", "http://127.0.0.1:9", "--cgroup"])
        .arg(format!("{}={CTX}", dir.path().display()));
    let (code, err) = refusal(cmd);
    assert_eq!(code, 69, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is not on a cgroup v2 file system"), "{err}");
}

#[test]
fn nothing_to_watch_is_a_usage_error() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_collector"));
    cmd.args(["--url", "http://127.0.0.1:9"]);
    let (code, err) = refusal(cmd);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("nothing to watch"), "{err}");
}

#[test]
fn an_unprivileged_collector_says_which_privileges_it_lacks() {
    if !can_run() {
        return;
    }
    let cg = Cgroup::new("unprivileged");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ])
    .arg(env!("CARGO_BIN_EXE_collector"))
    .args(["--url", "http://127.0.0.1:9", "--cgroup"])
    .arg(format!("{}={CTX}", cg.path.display()));
    let (code, err) = refusal(cmd);
    assert_eq!(code, 69, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("missing privileges"), "{err}");
}

#[test]
fn a_selector_typo_is_a_usage_error_at_start() {
    for (flag, selector, what) in [
        (
            "--namespace-selector",
            "relay.sh/tenant in (true)",
            "invalid namespace selector",
        ),
        ("--pod-selector", "app=web,", "invalid label selector"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_collector"));
        cmd.args([
            "--url",
            "http://127.0.0.1:9",
            "--kubernetes",
            "--node-name",
            "node-a",
            flag,
            selector,
        ])
        // Refused before any cluster is asked.
        .env("KUBECONFIG", "/nonexistent");
        let (code, err) = refusal(cmd);
        assert_eq!(code, 64, "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(what) && err.contains(selector), "{err}");
    }
}
