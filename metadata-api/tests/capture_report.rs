//! The capture report through the real binary: both capture paths written over HTTP, the report
//! read over HTTP and printed by the `capture-report` subcommand.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{process::Command, time::Instant};

use common::{Api, CTX, Server, TRIGGER, bytes, sha256};
use metadata_api::auth::Scope;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const REPORT: &str = "/api/workflows/w1/runs/r1/steps/s1/logs/capture-report";
const TRIGGER_REPORT: &str = "/api/workflows/w1/triggers/t1/logs/capture-report";

/// The entrypoint's client (write token of `context`) and the collector's (collector token).
fn writers(s: &Server, context: &str) -> (Api, Api) {
    (
        s.client(&s.token(context, Scope::Write)),
        s.client(&s.token("workflows", Scope::Collector)),
    )
}

/// Creates `name` as the collector in `context` and returns its id.
async fn ebpf_stream(c: &Api, context: &str, name: &str) -> String {
    let r = c.create(json!({"name": name, "context": context})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["source"], "ebpf");
    v["id"].as_str().unwrap().to_owned()
}

async fn report(api: &Api, path: &str) -> Value {
    let r = api.req(Method::GET, path).send().await.unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn stream<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no stream {name} in {report:#}"))
}

#[tokio::test]
async fn equal_paths_agree_with_hashes_lengths_and_receive_times() {
    let s = Server::start(&[]);
    let (w, c) = writers(&s, CTX);
    let rd = s.client(&s.token("workflows/w1", Scope::Read));
    let out = bytes(1, 300_000);
    let err = b"warning: something\n".to_vec();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for (name, data) in [("app.stdout", &out), ("app.stderr", &err)] {
        let e = w.stream(name).await;
        let b = ebpf_stream(&c, CTX, name).await;
        // Different part boundaries on each path: the comparison is by offset, not by part.
        let cut = data.len() / 3;
        w.put_at(&e, 0, &data[..cut]).await;
        w.put_at(&e, cut as u64, &data[cut..]).await;
        c.put_at(&b, 0, &data[..cut + 7]).await;
        c.put_at(&b, cut as u64 + 7, &data[cut + 7..]).await;
        w.finish(&e, data.len() as u64).await;
        c.finish(&b, data.len() as u64).await;
    }
    let r = report(&rd, REPORT).await;
    assert_eq!(r["context"], CTX);
    assert_eq!(r["agree"], true, "{r:#}");
    assert_eq!(r["streams"].as_array().unwrap().len(), 2);
    for (name, data) in [("app.stdout", &out), ("app.stderr", &err)] {
        let st = stream(&r, name);
        assert_eq!(st["comparison"], "agree", "{st:#}");
        assert_eq!(st["divergence"], Value::Null);
        assert_eq!(st["reasons"], json!([]));
        for src in ["entrypoint", "ebpf"] {
            let p = &st[src];
            assert_eq!(p["bytes_stored"], data.len() as u64);
            assert_eq!(p["final_length"], data.len() as u64);
            assert_eq!(p["complete"], true);
            assert_eq!(p["dropped_bytes"], 0);
            assert_eq!(p["sha256"], sha256(data));
            assert_eq!(p["sha256_covers"], "all_bytes");
            let first = p["first_received_ms"].as_u64().unwrap();
            let last = p["last_received_ms"].as_u64().unwrap();
            assert!(before <= first + 1000 && first <= last, "{p:#}");
        }
    }
    // The status of a stream carries the receive times too.
    let id = stream(&r, "app.stdout")["entrypoint"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let status = w.status(&id).await;
    assert_eq!(
        status["first_received_ms"],
        stream(&r, "app.stdout")["entrypoint"]["first_received_ms"]
    );
}

#[tokio::test]
async fn a_dropped_range_on_one_path_is_where_they_diverge() {
    let s = Server::start(&[]);
    let (w, c) = writers(&s, CTX);
    let data = b"line one\nline two\nline three\n";
    let e = w.stream("stdout").await;
    let b = ebpf_stream(&c, CTX, "stdout").await;
    w.put_at(&e, 0, data).await;
    w.finish(&e, data.len() as u64).await;
    // The collector lost bytes 9..18 ("line two\n") and said so.
    c.put_at(&b, 0, &data[..9]).await;
    assert_eq!(
        c.mark_for(&b, "bytes 9-17/*", "kernel-lost").await.status(),
        StatusCode::ACCEPTED
    );
    c.put_at(&b, 18, &data[18..]).await;
    c.finish(&b, data.len() as u64).await;
    let r = report(&w, REPORT).await;
    assert_eq!(r["agree"], false);
    let st = stream(&r, "stdout");
    assert_eq!(st["comparison"], "differ", "{st:#}");
    assert_eq!(
        st["ebpf"]["dropped"],
        json!([{"start": 9, "end": 18, "reason": "kernel-lost"}])
    );
    assert_eq!(st["ebpf"]["dropped_bytes"], 9);
    assert_eq!(st["ebpf"]["dropped_by_reason"], json!({"kernel-lost": 9}));
    assert_eq!(st["entrypoint"]["dropped_by_reason"], json!({}));
    assert_eq!(st["ebpf"]["bytes_stored"], data.len() as u64 - 9);
    assert_eq!(st["ebpf"]["sha256_covers"], "stored_bytes_only");
    let stored: Vec<u8> = [&data[..9], &data[18..]].concat();
    assert_eq!(st["ebpf"]["sha256"], sha256(&stored));
    let d = &st["divergence"];
    assert_eq!(d["offset"], 9);
    assert_eq!(d["entrypoint"]["kind"], "data");
    assert_eq!(d["entrypoint"]["excerpt"], "line two\\nline three\\n");
    assert_eq!(d["ebpf"]["kind"], "dropped");
    assert!(
        st["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap() == "ebpf dropped 9 bytes (kernel-lost 9)"),
        "{st:#}"
    );
}

#[tokio::test]
async fn differing_bytes_diverge_at_their_offset() {
    let s = Server::start(&[]);
    let (w, c) = writers(&s, CTX);
    let ours = bytes(7, 2_500_000);
    let mut theirs = ours.clone();
    // Past the first read chunk (1 MiB), so the divergence is found across chunks.
    let n = 1_700_001;
    theirs[n] ^= 0x5a;
    let e = w.stream("app.stdout").await;
    let b = ebpf_stream(&c, CTX, "app.stdout").await;
    w.put_at(&e, 0, &ours).await;
    c.put_at(&b, 0, &theirs).await;
    w.finish(&e, ours.len() as u64).await;
    c.finish(&b, theirs.len() as u64).await;
    let r = report(&w, REPORT).await;
    let st = stream(&r, "app.stdout");
    assert_eq!(st["comparison"], "differ");
    assert_ne!(st["entrypoint"]["sha256"], st["ebpf"]["sha256"]);
    assert_eq!(st["entrypoint"]["sha256"], sha256(&ours));
    assert_eq!(st["ebpf"]["sha256"], sha256(&theirs));
    let d = &st["divergence"];
    assert_eq!(d["offset"], n as u64);
    let escaped = |b: &[u8]| b.escape_ascii().to_string();
    assert_eq!(
        d["entrypoint"]["excerpt"],
        escaped(&ours[n..n + 32]),
        "{d:#}"
    );
    assert_eq!(d["ebpf"]["excerpt"], escaped(&theirs[n..n + 32]));
}

#[tokio::test]
async fn a_stream_only_the_collector_saw_is_reported_as_one_path() {
    let s = Server::start(&[]);
    let (w, c) = writers(&s, TRIGGER);
    let rd = s.client(&s.token("workflows/w1/triggers/t1", Scope::Read));
    let e = w.stream("app.stdout").await;
    let b = ebpf_stream(&c, TRIGGER, "app.stdout").await;
    let side = ebpf_stream(&c, TRIGGER, "sidecar.stdout").await;
    for (api, id) in [(&w, &e), (&c, &b), (&c, &side)] {
        api.put_at(id, 0, b"hi\n").await;
        api.finish(id, 3).await;
    }
    let r = report(&rd, TRIGGER_REPORT).await;
    assert_eq!(r["agree"], false);
    assert_eq!(stream(&r, "app.stdout")["comparison"], "agree");
    let st = stream(&r, "sidecar.stdout");
    assert_eq!(st["comparison"], "ebpf_only");
    assert_eq!(st["entrypoint"], Value::Null);
    assert_eq!(st["ebpf"]["sha256"], sha256(b"hi\n"));
    assert_eq!(st["divergence"], Value::Null);
    assert_eq!(
        st["reasons"],
        json!(["only the collector stored this stream"])
    );
}

#[tokio::test]
async fn the_report_says_why_the_entrypoint_path_is_empty_when_the_collector_knows() {
    let s = Server::start(&[]);
    let (w, c) = writers(&s, CTX);
    let rd = s.client(&s.token("workflows/w1/runs/r1", Scope::Read));
    let why = "a Tekton hermetic step: its command runs without a network";
    let r = c
        .create(json!({"name": "stdout", "context": CTX, "entrypoint_absent": why}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.put_at(&id, 0, b"offline build\n").await;
    c.finish(&id, 14).await;
    let st = stream(&report(&rd, REPORT).await, "stdout").clone();
    assert_eq!(st["comparison"], "ebpf_only");
    assert_eq!(
        st["reasons"],
        json!([format!("only the collector stored this stream: {why}")])
    );
    let status: Value = c
        .req(Method::GET, &format!("/logs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["entrypoint_absent"], why);

    // Only collectors say it, briefly and on one line.
    let r = w
        .create(json!({"name": "stderr", "entrypoint_absent": why}))
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    for bad in ["x".repeat(257), "two\nlines".to_owned()] {
        let r = c
            .create(json!({"name": "stderr", "context": CTX, "entrypoint_absent": bad}))
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn pending_and_incomplete_streams_and_generations() {
    let s = Server::start(&[]);
    let (w, c) = writers(&s, CTX);
    // Generation 0 complete and equal on both paths.
    let e0 = w.stream("stdout").await;
    let b0 = ebpf_stream(&c, CTX, "stdout").await;
    for (api, id) in [(&w, &e0), (&c, &b0)] {
        api.put_at(id, 0, b"run 0\n").await;
        api.finish(id, 6).await;
    }
    // Generation 1 (a restart): the entrypoint has a gap not filled yet, neither has a final
    // length.
    let e1 = w.stream("stdout.1").await;
    let b1 = ebpf_stream(&c, CTX, "stdout.1").await;
    w.put_at(&e1, 0, b"run").await;
    w.put_at(&e1, 5, b"\n").await;
    c.put_at(&b1, 0, b"run 1\n").await;
    let r = report(&w, REPORT).await;
    assert_eq!(r["agree"], false);
    let g0 = stream(&r, "stdout");
    assert_eq!(
        (g0["base"].clone(), g0["generation"].clone()),
        (json!("stdout"), json!(0))
    );
    assert_eq!(g0["comparison"], "agree");
    let g1 = stream(&r, "stdout.1");
    assert_eq!(
        (g1["base"].clone(), g1["generation"].clone()),
        (json!("stdout"), json!(1))
    );
    assert_eq!(g1["comparison"], "incomplete", "{g1:#}");
    assert_eq!(g1["entrypoint"]["pending"], json!([{"start": 3, "end": 5}]));
    assert_eq!(g1["entrypoint"]["pending_bytes"], 2);
    assert_eq!(g1["entrypoint"]["complete"], false);
    assert_eq!(g1["entrypoint"]["final_length"], Value::Null);
    assert_eq!(g1["divergence"]["offset"], 3);
    assert_eq!(g1["divergence"]["entrypoint"]["kind"], "pending");
    assert_eq!(g1["divergence"]["ebpf"]["excerpt"], " 1\\n");
    // Generations come in order after their base.
    let names: Vec<&str> = r["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["stdout", "stdout.1"]);
    // Once the gap is filled and both finish, they agree.
    w.put_at(&e1, 3, b" 1").await;
    w.finish(&e1, 6).await;
    c.finish(&b1, 6).await;
    let r = report(&w, REPORT).await;
    assert_eq!(r["agree"], true, "{r:#}");
}

#[tokio::test]
async fn only_tokens_that_may_read_the_context_get_its_report() {
    let s = Server::start(&[]);
    let (w, c) = writers(&s, CTX);
    let e = w.stream("stdout").await;
    w.put_at(&e, 0, b"secret\n").await;
    let status = |api: Api, path: &'static str| async move {
        api.req(Method::GET, path).send().await.unwrap().status()
    };
    let other_write = s.client(&s.token("workflows/w1/runs/r1/steps/s2", Scope::Write));
    let other_read = s.client(&s.token("workflows/w2", Scope::Read));
    assert_eq!(status(other_write, REPORT).await, StatusCode::NOT_FOUND);
    assert_eq!(status(other_read, REPORT).await, StatusCode::NOT_FOUND);
    assert_eq!(status(c, REPORT).await, StatusCode::NOT_FOUND);
    let none = Api {
        token: None,
        ..w.clone()
    };
    assert_eq!(status(none, REPORT).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(w.clone(), REPORT).await, StatusCode::OK);
    let rd = s.client(&s.token("workflows", Scope::Read));
    assert_eq!(status(rd, REPORT).await, StatusCode::OK);
}

#[tokio::test]
async fn per_workflow_totals_are_exported() {
    let s = Server::start(&[]);
    let (w, c) = writers(&s, CTX);
    let e = w.stream("stdout").await;
    let b = ebpf_stream(&c, CTX, "stdout").await;
    w.put_at(&e, 0, &[b'x'; 1000]).await;
    // A retry of the same bytes is not counted twice.
    w.put_at(&e, 0, &[b'x'; 1000]).await;
    c.put_at(&b, 0, &[b'x'; 400]).await;
    c.mark(&b, "bytes 400-999/*").await;
    let metrics = s.metrics().await;
    for line in [
        "relay_metadata_api_stored_bytes_total{workflow=\"w1\",source=\"entrypoint\"} 1000",
        "relay_metadata_api_stored_bytes_total{workflow=\"w1\",source=\"ebpf\"} 400",
        "relay_metadata_api_dropped_bytes_total{workflow=\"w1\",source=\"ebpf\"} 600",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
}

/// Runs `metadata-api capture-report` against the server.
fn cli(s: &Server, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_metadata-api"))
        .args(["capture-report", "--url", &s.url, "--token", token])
        .args(args)
        .env_remove("RELAY_METADATA_API_URL")
        .env_remove("RELAY_METADATA_API_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn the_cli_prints_the_report_as_a_table_and_exits_by_agreement() {
    let s = Server::start(&[]);
    let (w, c) = writers(&s, TRIGGER);
    let e = w.stream("app.stdout").await;
    let b = ebpf_stream(&c, TRIGGER, "app.stdout").await;
    for (api, id) in [(&w, &e), (&c, &b)] {
        api.put_at(id, 0, b"hello\n").await;
        api.finish(id, 6).await;
    }
    let token = s.token("workflows/w1", Scope::Read);
    let (code, out, err) = cli(&s, &token, &["--trigger", "w1/t1"]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "context workflows/w1/triggers/t1");
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "STREAM", "SOURCE", "STORED", "DROPPED", "PENDING", "FINAL", "COMPLETE", "SHA256",
            "RESULT"
        ]
    );
    let hash = &sha256(b"hello\n")[..12];
    for src in ["entrypoint", "ebpf"] {
        let row = lines
            .iter()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|c| c.len() > 1 && c[0] == "app.stdout" && c[1] == src)
            .unwrap_or_else(|| panic!("no {src} row in\n{out}"));
        assert_eq!(
            row,
            ["app.stdout", src, "6", "0", "0", "6", "yes", hash, "agree"]
        );
    }
    // Columns are aligned: every row starts its SOURCE column where the header does.
    let col = lines[1].find("SOURCE").unwrap();
    assert!(
        lines[2..4].iter().all(|l| l[col..].starts_with("e")),
        "{out}"
    );
    assert_eq!(lines.last(), Some(&"capture paths agree"));

    // A sidecar only the collector saw: exit 1, and its row says so.
    let side = ebpf_stream(&c, TRIGGER, "sidecar.stderr").await;
    c.put_at(&side, 0, b"x").await;
    let (code, out, _) = cli(&s, &token, &["--trigger", "w1/t1"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == [
                "sidecar.stderr",
                "entrypoint",
                "-",
                "-",
                "-",
                "-",
                "-",
                "(absent)",
                "ebpf_only"
            ]),
        "{out}"
    );
    assert_eq!(out.lines().last(), Some("capture paths do not agree"));

    // A divergence is printed under its stream.
    let (w2, c2) = writers(&s, CTX);
    let e = w2.stream("stdout").await;
    let b = ebpf_stream(&c2, CTX, "stdout").await;
    w2.put_at(&e, 0, b"abc\n").await;
    c2.put_at(&b, 0, b"abX\n").await;
    let (code, out, _) = cli(&s, &token, &["--step", "w1/r1/s1"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("  diverges at offset 2: entrypoint data \"c\\n\" | ebpf data \"X\\n\""),
        "{out}"
    );
    // JSON on request; bad arguments and refused tokens are told apart by the exit code.
    let (code, out, _) = cli(&s, &token, &["--step", "w1/r1/s1", "--json"]);
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["streams"][0]["divergence"]["offset"], 2);
    let (code, _, err) = cli(&s, &token, &["--step", "w1/r1"]);
    assert_eq!(code, 64, "{err}");
    let foreign = s.token("workflows/w2", Scope::Read);
    let (code, _, err) = cli(&s, &foreign, &["--step", "w1/r1/s1"]);
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("404"), "{err}");
}

/// The report's cost on two 64 MiB streams: `cargo nextest run -p metadata-api --test
/// capture_report --run-ignored only` prints the throughput.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_report_of_two_64_mib_streams() {
    let s = Server::start(&["--stream-rate", "2G", "--global-rate", "4G"]);
    let (w, c) = writers(&s, CTX);
    let len = 64 << 20;
    let data = bytes(3, len);
    let e = w.stream("stdout").await;
    let b = ebpf_stream(&c, CTX, "stdout").await;
    for (api, id) in [(&w, &e), (&c, &b)] {
        for a in (0..len).step_by(8 << 20) {
            api.put_at(id, a as u64, &data[a..a + (8 << 20)]).await;
        }
        api.finish(id, len as u64).await;
    }
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let r = report(&w, REPORT).await;
        best = best.min(t.elapsed().as_secs_f64());
        assert_eq!(r["agree"], true);
    }
    let mib = 2.0 * len as f64 / (1 << 20) as f64;
    println!(
        "capture report of 2 x 64 MiB: {best:.2} s, {:.0} MiB/s hashed and compared",
        mib / best
    );
}
