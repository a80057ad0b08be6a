//! The command never suffers for the API: down, throttling, restarts. Every byte is stored or
//! accounted for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Api, Wrap, assert_accounted, sha256, wait_for};

/// A command that computes and logs ~12 MB of lines, then writes its own wall time (ns) to $1.
const WORKLOAD: &str = r#"s=$(date +%s%N)
awk 'BEGIN { for (i = 0; i < 300000; i++) { s = 0; for (j = 0; j < 20; j++) s += j * i; printf "line %d sum %d some log text here\n", i, s } }'
e=$(date +%s%N); echo $((e - s)) > "$1""#;

/// The output of `WORKLOAD`, from running it without the wrapper.
fn workload_output() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("sh")
        .args(["-c", WORKLOAD, "sh"])
        .arg(dir.path().join("t"))
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

fn elapsed_ns(file: &std::path::Path) -> u64 {
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn api_down_for_the_whole_run_costs_the_command_nothing() {
    let api = Api::unstarted(&[]);
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    let mut plain = Vec::new();
    let mut wrapped = Vec::new();
    let mut last_stderr = String::new();
    for _ in 0..5 {
        // Unwrapped, the command writes to a pipe that something reads, as a container's stdout
        // is read by its runtime: `/dev/null` would make the baseline cheaper than any real one.
        let mut reader = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let st = Command::new("sh")
            .args(["-c", WORKLOAD, "sh"])
            .arg(&t)
            .stdout(Stdio::from(reader.stdin.take().unwrap()))
            .status()
            .unwrap();
        assert!(st.success());
        assert!(reader.wait().unwrap().success());
        plain.push(elapsed_ns(&t));
        let out = api
            .wrap(&["--grace-period", "1s", "--", "sh", "-c", WORKLOAD, "sh"])
            .arg(&t)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        wrapped.push(elapsed_ns(&t));
        last_stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    let (p, w) = (
        *plain.iter().min().unwrap() as f64,
        *wrapped.iter().min().unwrap() as f64,
    );
    println!(
        "command wall time: plain {:.1} ms, wrapped with the API down {:.1} ms",
        p / 1e6,
        w / 1e6
    );
    assert!(w <= p * 1.10, "wrapped {w} ns vs plain {p} ns");
    let last = last_stderr.lines().last().unwrap_or_default();
    let total = workload_output().len();
    assert!(
        last.starts_with(&format!("entrypoint: lost {total} bytes not reported")),
        "{last_stderr}"
    );
}

#[test]
fn api_back_within_the_grace_period_gets_the_dropped_ranges() {
    let mut api = Api::unstarted(&[]);
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    let mut child = api
        .wrap(&["--grace-period", "20s", "--", "sh", "-c", WORKLOAD, "sh"])
        .arg(&t)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command is done (it wrote its time) while the wrapper still waits for the API.
    wait_for(Duration::from_secs(30), "the command", || {
        std::fs::read_to_string(&t).is_ok_and(|s| s.ends_with('\n'))
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "the wrapper waits for the API"
    );
    api.up();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let expected = workload_output();
    let (st, got) = api.read("stdout");
    let dropped = assert_accounted(&st, &got, &expected);
    // The 8 MiB buffer kept the start; the rest overflowed and is reported as dropped.
    assert!(dropped > 0, "{st}");
    assert!(got.len() >= 4 << 20, "{st}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "stdout: {dropped} of {} bytes dropped (reported to the metadata API: buffer-full \
             {dropped})",
            expected.len()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("lost"), "{stderr}");
    assert!(
        st["dropped"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["reason"] == "buffer-full"),
        "an overflow is a full buffer: {st}"
    );
}

#[test]
fn throttling_loses_and_duplicates_nothing() {
    let api = Api::start(&["--stream-rate", "2M"]);
    let data: Vec<u8> = (0..6_000_000u32).map(|i| (i % 251) as u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("data");
    std::fs::write(&f, &data).unwrap();
    let t = Instant::now();
    let status = api
        .wrap(&[
            "--buffer-limit",
            "32M",
            "--grace-period",
            "60s",
            "--",
            "cat",
        ])
        .arg(&f)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        t.elapsed() > Duration::from_secs(1),
        "6 MB at 2 MB/s must have been throttled"
    );
    let (st, got) = api.read("stdout");
    assert_eq!(assert_accounted(&st, &got, &data), 0);
    assert_eq!(sha256(&got), sha256(&data));
    let metrics = reqwest::blocking::get(format!("{}/metrics", api.url))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("relay_metadata_api_throttled_requests_total") && !l.ends_with(" 0")
        ),
        "no 429 was answered:\n{metrics}"
    );
}

#[test]
fn api_killed_and_restarted_mid_run_loses_nothing_acknowledged() {
    let mut api = Api::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("half");
    // 40 rounds of 1000 numbers, 50 ms apart; a file marks the half-way point.
    let script = r#"i=0; while [ $i -lt 40 ]; do seq $((i*1000)) $((i*1000+999)); [ $i = 20 ] && touch "$1"; sleep 0.05; i=$((i+1)); done"#;
    let mut child = api
        .wrap(&["--grace-period", "20s", "--", "sh", "-c", script, "sh"])
        .arg(&marker)
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(30), "half-way", || marker.exists());
    api.kill();
    std::thread::sleep(Duration::from_millis(300));
    api.up();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let expected: Vec<u8> = (0..40_000)
        .flat_map(|n| format!("{n}\n").into_bytes())
        .collect();
    let (st, got) = api.read("stdout");
    assert_accounted(&st, &got, &expected);
}
