//! What the command writes is what readers get, byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Api, Wrap, assert_accounted, sha256};

/// Deterministic bytes with NULs and every other value.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

#[test]
fn binary_output_round_trips_byte_exact_on_both_streams() {
    let api = Api::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    // stdout: NULs, a 10 MB line without a newline, binary noise, no trailing newline.
    let mut out = vec![0u8; 1000];
    out.extend(std::iter::repeat_n(b'x', 10_000_000));
    out.extend(noise(1, 40_000_000));
    if out.last() == Some(&b'\n') {
        out.pop();
    }
    let err = noise(2, 50_000_000 - 1);
    std::fs::write(dir.path().join("out"), &out).unwrap();
    std::fs::write(dir.path().join("err"), &err).unwrap();

    let status = api
        .wrap(&[
            "--buffer-limit",
            "256M",
            "--",
            "sh",
            "-c",
            r#"cat "$1"; cat "$2" >&2"#,
            "sh",
        ])
        .arg(dir.path().join("out"))
        .arg(dir.path().join("err"))
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));

    for (name, want) in [("stdout", &out), ("stderr", &err)] {
        let (st, got) = api.read(name);
        let dropped = assert_accounted(&st, &got, want);
        assert_eq!(
            dropped, 0,
            "{name}: nothing may be dropped with a 256M buffer"
        );
        assert_eq!(sha256(&got), sha256(want), "{name}");
    }
}

#[test]
fn empty_output_still_declares_empty_streams() {
    let api = Api::start(&[]);
    let status = api.wrap(&["true"]).status().unwrap();
    assert_eq!(status.code(), Some(0));
    for name in ["stdout", "stderr"] {
        let (st, got) = api.read(name);
        assert_eq!(st["final_length"], 0, "{st}");
        assert_eq!(st["complete"], true, "{st}");
        assert!(got.is_empty());
    }
}

#[test]
fn output_never_reaches_the_wrappers_own_stdout_or_stderr() {
    let api = Api::start(&[]);
    let out = api
        .wrap(&["sh", "-c", "echo to-stdout; echo to-stderr >&2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(api.read("stdout").1, b"to-stdout\n");
    assert_eq!(api.read("stderr").1, b"to-stderr\n");
}

#[test]
fn output_reaches_the_api_while_the_command_still_runs() {
    let api = Api::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let mut child = api
        .wrap(&[
            "sh",
            "-c",
            r#"echo first line; while [ ! -e "$1" ]; do sleep 0.02; done"#,
            "sh",
        ])
        .arg(&go)
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    common::wait_for(
        std::time::Duration::from_secs(5),
        "the line to be stored",
        || api.read("stdout").1 == b"first line\n",
    );
    let latency = start.elapsed();
    println!("first line readable after {latency:?}");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the command is still running"
    );
    std::fs::write(&go, "").unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
