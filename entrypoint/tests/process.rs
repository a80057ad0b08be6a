//! The wrapper behaves like the command: exit statuses, signals, reaping, usage, install.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    time::Duration,
};

use common::{Api, Wrap, entrypoint, wait_for};

fn code(api: &Api, args: &[&str]) -> Option<i32> {
    api.wrap(args).status().unwrap().code()
}

#[test]
fn exit_statuses_are_the_commands() {
    let api = Api::start(&[]);
    for n in [0, 1, 42] {
        assert_eq!(code(&api, &["sh", "-c", &format!("exit {n}")]), Some(n));
    }
    assert_eq!(code(&api, &["sh", "-c", "kill -9 $$"]), Some(137));
}

#[test]
fn commands_that_cannot_start_exit_like_a_shell() {
    let api = Api::start(&[]);
    let out = api.wrap(&["no-such-command-xyz"]).output().unwrap();
    assert_eq!(out.status.code(), Some(127));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-command-xyz"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("not-executable");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = api.wrap(&[script.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(126));
    assert_eq!(code(&api, &["/"]), Some(126), "a directory cannot run");
}

#[test]
fn sigterm_reaches_the_command() {
    let api = Api::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let mut child = api
        .wrap(&[
            "sh",
            "-c",
            r#"trap 'echo got-term; exit 7' TERM; touch "$1"; while :; do sleep 0.05; done"#,
            "sh",
            ready.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(10), "the trap", || ready.exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(7));
    assert_eq!(api.read("stdout").1, b"got-term\n");
}

#[test]
fn as_pid_1_it_reaps_orphans() {
    let api = Api::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    // The inner sh exits at once: its `sleep` is orphaned to PID 1 (the wrapper) and must not
    // stay a zombie after it exits.
    let script = r#"
        sh -c 'sleep 0.2 & exit 0'
        sleep 1
        zombies=$(grep -l '^[0-9]* ([^)]*) Z' /proc/[0-9]*/stat 2>/dev/null | wc -l)
        echo "ppid=$PPID zombies=$zombies" > "$1"
    "#;
    let status = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            entrypoint(),
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&report)
        .env("RELAY_METADATA_API_URL", &api.url)
        .env("RELAY_METADATA_API_TOKEN_FILE", api.token_file())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&report).unwrap().trim(),
        "ppid=1 zombies=0"
    );
}

#[test]
fn no_command_is_a_usage_error() {
    let out = Command::new(entrypoint()).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
    let out = Command::new(entrypoint()).arg("--").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(entrypoint())
        .args(["--no-such-flag", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn without_an_api_url_the_command_runs_untouched() {
    let out = Command::new(entrypoint())
        .args(["sh", "-c", "echo plain; exit 3"])
        .env_remove("RELAY_METADATA_API_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stdout, b"plain\n");
}

#[test]
fn install_copies_itself_atomically_and_idempotently() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("relay/lib");
    let run = || {
        Command::new(entrypoint())
            .arg("install")
            .arg(&lib)
            .status()
            .unwrap()
    };
    assert!(run().success());
    let target = lib.join("entrypoint");
    let md = std::fs::metadata(&target).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o555);
    assert_eq!(
        std::fs::read(&target).unwrap(),
        std::fs::read(entrypoint()).unwrap()
    );
    let ino = std::os::unix::fs::MetadataExt::ino(&md);
    assert!(run().success());
    let again = std::fs::metadata(&target).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&again),
        ino,
        "unchanged"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&lib).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left behind");
    // The installed copy runs.
    let out = Command::new(&target).arg("--version").output().unwrap();
    assert!(out.status.success());
}
