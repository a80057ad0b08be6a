//! `kubectl relay` against the real `metadata-api` binary in local mode (file storage, tokens
//! from its key file), reached with `--url`/`--token` or `RELAY_URL`/`RELAY_TOKEN`, and with the
//! token taken from a kubeconfig's user (`token`, `tokenFile`, an `exec` plugin).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{Ran, append, plugin, run, tempdir, write_lines};
use metadata_api::auth::Scope;
use serde_json::{Value, json};
use testbed::api::{Api, CTX};

/// When the first part was written: 2023-11-14T22:13:20Z.
const T0: u64 = 1_700_000_000_000;
const MINUTE: u64 = 60_000;
const LIMIT: Duration = Duration::from_secs(30);

/// The API with step `CTX` (`w1/r1/s1`): `stdout` and `stderr` from the entrypoint and the
/// collector's `app.stdout`, all complete, written a minute apart. Returns the API and a read
/// token for workflow `w1`.
fn api_with_a_step() -> (Api, String) {
    let api = Api::start(&[]);
    let write = api.token(CTX, Scope::Write);
    write_lines(
        &api.url,
        &write,
        json!({"name": "stdout"}),
        &[
            (T0, "out 1\n"),
            (T0 + 2 * MINUTE, "out 2\n"),
            (T0 + 4 * MINUTE, "out 3\n"),
        ],
        true,
    );
    write_lines(
        &api.url,
        &write,
        json!({"name": "stderr"}),
        &[(T0 + MINUTE, "err 1\n")],
        true,
    );
    write_lines(
        &api.url,
        &api.token("workflows", Scope::Collector),
        json!({"name": "app.stdout", "source": "ebpf", "context": CTX}),
        &[(T0 + 3 * MINUTE, "app 1\n")],
        true,
    );
    let read = api.token("workflows/w1", Scope::Read);
    (api, read)
}

/// `kubectl relay ARGS --url URL --token TOKEN`.
fn relay(api: &Api, token: &str, args: &[&str]) -> Ran {
    let (_home, home) = tempdir();
    let mut c = plugin(&home);
    c.args(args).args(["--url", &api.url, "--token", token]);
    run(c, LIMIT)
}

const STEP: &str = "step/w1/r1/s1";

#[test]
fn logs_map_their_flags_onto_the_read_api() {
    let (api, read) = api_with_a_step();
    let logs = |extra: &[&str]| {
        let mut args = vec!["logs", STEP];
        args.extend_from_slice(extra);
        relay(&api, &read, &args).ok().to_owned()
    };
    // Every stream, merged in write order; the collector's stream where the entrypoint has none.
    assert_eq!(logs(&[]), "out 1\nerr 1\nout 2\napp 1\nout 3\n");
    assert_eq!(logs(&["--tail", "2"]), "app 1\nout 3\n");
    assert_eq!(logs(&["--since", "2023-11-14T22:16:20Z"]), "app 1\nout 3\n");
    assert_eq!(logs(&["--until", "2023-11-14T22:14:20Z"]), "out 1\nerr 1\n");
    assert_eq!(logs(&["--limit-bytes", "6"]), "out 1\n");
    assert_eq!(logs(&["--source", "ebpf"]), "app 1\n");
    assert_eq!(
        logs(&["--timestamps", "--tail", "1"]),
        "2023-11-14T22:17:20.000000000Z out 3\n"
    );
    assert_eq!(
        logs(&["--prefix"]),
        "[s1/stdout] out 1\n[s1/stderr] err 1\n[s1/stdout] out 2\n[app/stdout] app 1\n[s1/stdout] out 3\n"
    );
    // -c: the container's streams only (`stdout` without a container is the step's).
    assert_eq!(logs(&["-c", "app"]), "app 1\n");
    assert_eq!(logs(&["-c", "s1"]), "out 1\nerr 1\nout 2\nout 3\n");
    assert_eq!(
        logs(&[
            "-c",
            "s1",
            "--prefix",
            "--timestamps",
            "--since",
            "2023-11-14T22:15:20Z"
        ]),
        "2023-11-14T22:15:20.000000000Z [s1/stdout] out 2\n2023-11-14T22:17:20.000000000Z [s1/stdout] out 3\n"
    );

    // -o json: the API's NDJSON records.
    let records: Vec<Value> = logs(&["-o", "json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let data: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["stream"].as_str().unwrap(),
                r["source"].as_str().unwrap(),
                r["data"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        data,
        [
            ("stdout", "entrypoint", "out 1\n"),
            ("stderr", "entrypoint", "err 1\n"),
            ("stdout", "entrypoint", "out 2\n"),
            ("app.stdout", "ebpf", "app 1\n"),
            ("stdout", "entrypoint", "out 3\n"),
        ]
    );
    assert_eq!(records[0]["written_ms"], T0);
    let app: Vec<Value> = logs(&["-o", "json", "-c", "app"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(app.len(), 1);
    assert_eq!(app[0]["data"], "app 1\n");

    // RELAY_URL and RELAY_TOKEN instead of the flags.
    let (_home, home) = tempdir();
    let mut c = plugin(&home);
    c.args(["logs", STEP, "--tail", "1"])
        .env(contract::env::PLUGIN_URL, &api.url)
        .env(contract::env::PLUGIN_TOKEN, &read);
    assert_eq!(run(c, LIMIT).ok(), "out 3\n");
}

#[test]
fn report_and_streams_show_both_capture_paths() {
    let (api, read) = api_with_a_step();
    let report = relay(&api, &read, &["report", STEP]);
    let text = report.ok();
    assert!(
        text.starts_with("context workflows/w1/runs/r1/steps/s1\nSTREAM"),
        "{text}"
    );
    let row = |name: &str, source: &str| {
        text.lines()
            .find(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&name) && f.get(1) == Some(&source)
            })
            .unwrap_or_else(|| panic!("no row {name} {source} in {text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("stdout", "entrypoint")[2..7],
        ["18", "0", "0", "18", "yes"]
    );
    assert_eq!(row("stdout", "ebpf")[7..], ["(absent)", "entrypoint_only"]);
    assert_eq!(row("app.stdout", "ebpf")[2..7], ["6", "0", "0", "6", "yes"]);
    assert!(text.ends_with("capture paths do not agree\n"), "{text}");

    let json: Value =
        serde_json::from_str(relay(&api, &read, &["report", STEP, "-o", "json"]).ok()).unwrap();
    assert_eq!(json["context"], CTX);
    assert_eq!(json["streams"].as_array().unwrap().len(), 3);

    let streams = relay(&api, &read, &["streams", STEP]);
    assert_eq!(
        streams.ok(),
        "STREAM      SOURCE      LENGTH  STORED  DROPPED  PENDING  COMPLETE  DROPPED BY REASON
app.stdout  ebpf        6       6       0        0        yes
stderr      entrypoint  6       6       0        0        yes
stdout      entrypoint  18      18      0        0        yes
"
    );
    let rows: Value =
        serde_json::from_str(relay(&api, &read, &["streams", STEP, "-o", "json"]).ok()).unwrap();
    assert_eq!(
        rows[2],
        json!({"name": "stdout", "source": "entrypoint", "length": 18, "stored_bytes": 18,
               "dropped_bytes": 0, "dropped_by_reason": {}, "pending_bytes": 0, "complete": true})
    );
}

#[test]
fn follow_prints_lines_as_they_are_written() {
    let api = Api::start(&[]);
    let ctx = "workflows/w1/runs/r2/steps/f";
    let write = api.token(ctx, Scope::Write);
    let id = write_lines(
        &api.url,
        &write,
        json!({"name": "stdout"}),
        &[(T0, "first\n")],
        false,
    );
    let (_home, home) = tempdir();
    let mut c = plugin(&home);
    c.args(["logs", "step/w1/r2/f", "-f", "--url", &api.url])
        .args(["--token", &api.token("workflows/w1", Scope::Read)])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = c.spawn().unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let next = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        let line = rx
            .recv_timeout(deadline - Instant::now())
            .unwrap_or_else(|e| panic!("no {what:?} from the follower: {e}"));
        assert_eq!(line, what);
    };
    // Printed while the request is still open: the stream is not complete.
    next("first");
    append(&api.url, &write, &id, 6, T0 + MINUTE, "second\n");
    next("second");
    assert!(child.try_wait().unwrap().is_none(), "the follower ended");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn errors_are_one_line_with_their_exit_code() {
    let (api, read) = api_with_a_step();
    // Not found: a workflow the token does not cover looks like one that is not there.
    relay(&api, &read, &["logs", "step/w2/r1/s1"]).fails(2, "404");
    relay(&api, &read, &["report", "trigger/w2/t1"]).fails(2, "404");
    // Not authorized.
    relay(&api, "not-a-token", &["logs", STEP]).fails(3, "401");
    // A parameter the API refuses.
    relay(&api, &read, &["logs", STEP, "--since", "yesterday-ish"]).fails(5, "400");
    // Usage: a malformed target or flag value.
    relay(&api, &read, &["logs", "step/w1/r1"]).fails(1, "not a target");
    relay(&api, &read, &["logs", STEP, "--tail", "many"]).fails(1, "--tail");
    relay(&api, &read, &["logs", STEP, "-o", "yaml"]).fails(1, "yaml");
    // Nothing listening.
    let (_home, home) = tempdir();
    let mut c = plugin(&home);
    c.args(["logs", STEP, "--token", &read])
        .args(["--url", &format!("http://{}", testbed::api::free_addr())]);
    run(c, LIMIT).fails(4, "cannot reach the relay API");
    // No token and no kubeconfig to take one from.
    let mut c = plugin(&home);
    c.args(["logs", STEP, "--url", &api.url]);
    run(c, LIMIT).fails(1, "kubeconfig");
    // --help documents the exit codes.
    let mut c = plugin(&home);
    c.arg("--help");
    let help = run(c, LIMIT);
    assert!(help.ok().contains("3  not authorized"), "{help:?}");
}

/// A kubeconfig whose user is `user`; its server is never contacted (`--url` and a step target
/// need no Kubernetes API).
fn kubeconfig(dir: &std::path::Path, user: Value) -> std::path::PathBuf {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": "tenant"}}],
        "current-context": "ctx",
    });
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    path
}

#[test]
fn the_token_comes_from_the_kubeconfig_user_when_not_given() {
    let (api, read) = api_with_a_step();
    let (_dir, dir) = tempdir();
    let token_file = dir.join("token");
    std::fs::write(&token_file, &read).unwrap();
    // An exec credential plugin, as cloud providers' kubeconfigs use.
    let exec = dir.join("credential-plugin");
    std::fs::write(
        &exec,
        format!(
            "#!/bin/sh\nprintf '%s' '{}'\n",
            json!({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                   "status": {"token": read}})
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&exec)
        .status()
        .unwrap();
    for user in [
        json!({"token": read}),
        json!({"tokenFile": token_file}),
        json!({"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": exec,
                        "interactiveMode": "Never"}}),
    ] {
        let kc = kubeconfig(&dir, user.clone());
        // --kubeconfig, and KUBECONFIG.
        for by_env in [false, true] {
            let mut c = plugin(&dir);
            c.args(["logs", STEP, "--tail", "1", "--url", &api.url]);
            if by_env {
                c.env("KUBECONFIG", &kc);
            } else {
                c.arg("--kubeconfig").arg(&kc);
            }
            assert_eq!(run(c, LIMIT).ok(), "out 3\n", "{user}");
        }
    }
    // A user with no credentials at all.
    let kc = kubeconfig(&dir, json!({}));
    let mut c = plugin(&dir);
    c.args(["logs", STEP, "--url", &api.url])
        .arg("--kubeconfig")
        .arg(&kc);
    run(c, LIMIT).fails(3, "needs a bearer token");
    // A token the API refuses, from the kubeconfig.
    let kc = kubeconfig(&dir, json!({"token": "nope"}));
    let mut c = plugin(&dir);
    c.args(["logs", STEP, "--url", &api.url])
        .arg("--kubeconfig")
        .arg(&kc);
    run(c, LIMIT).fails(3, "401");
}
