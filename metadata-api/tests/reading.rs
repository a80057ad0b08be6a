//! Reading as `kubectl logs` users do: `since`, `until`, `tail`, `timestamps`, `prefix`,
//! `limit_bytes` and `markers` on a stream's bytes, a step's and a trigger's logs, once and
//! followed, on file storage and on S3 (moto).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, UNIX_EPOCH};

use common::{CTX, Emulator, Server, TRIGGER};
use futures::StreamExt;
use metadata_api::auth::Scope;
use reqwest::{Method, StatusCode};

/// When the first part was written: 2023-11-14T22:13:20Z.
const T0: u64 = 1_700_000_000_000;
const MINUTE: u64 = 60_000;

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn nanos(ms: u64) -> String {
    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Appends `body` at `at` of stream `id`, written at `written_ms`.
async fn write(w: &common::Api, id: &str, at: u64, written_ms: u64, body: &str) -> u64 {
    let end = at + body.len() as u64;
    let r = w
        .req(Method::PATCH, &format!("/logs/{id}/data"))
        .header("content-type", "application/octet-stream")
        .header("content-range", format!("bytes {at}-{}/*", end - 1))
        .header("x-relay-written", written_ms.to_string())
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    end
}

/// A step whose stdout has two lines a minute for five minutes (`out {i}a`, `out {i}b` at
/// minute i), then a 10-byte range the entrypoint dropped and one line more at minute 5; its
/// stderr has a line half a minute after each stdout part. Both finished. Returns stdout's id.
async fn step(s: &Server) -> String {
    let w = s.client(&s.token(CTX, Scope::Write));
    let out = w.stream("stdout").await;
    let err = w.stream("stderr").await;
    let (mut o, mut e) = (0, 0);
    for i in 0..5 {
        o = write(
            &w,
            &out,
            o,
            T0 + i * MINUTE,
            &format!("out {i}a\nout {i}b\n"),
        )
        .await;
        e = write(
            &w,
            &err,
            e,
            T0 + i * MINUTE + MINUTE / 2,
            &format!("err {i}\n"),
        )
        .await;
    }
    let r = w
        .mark_for(&out, &format!("bytes {o}-{}/*", o + 9), "gave-up")
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    o = write(&w, &out, o + 10, T0 + 5 * MINUTE, "out 5a\n").await;
    w.finish(&out, o).await;
    w.finish(&err, e).await;
    out
}

/// The step's merged lines in write-time order.
fn merged() -> Vec<String> {
    let mut lines = Vec::new();
    for i in 0..5 {
        lines.push(format!("out {i}a\n"));
        lines.push(format!("out {i}b\n"));
        // The gap has no write time: it comes right after the bytes before it.
        if i == 4 {
            lines.push("[relay: 10 bytes dropped: gave-up]\n".to_owned());
        }
        lines.push(format!("err {i}\n"));
    }
    lines.push("out 5a\n".to_owned());
    lines
}

async fn every_parameter(s: &Server) {
    let out = step(s).await;
    let rd = s.client(&s.token(CTX, Scope::Read));
    let data = format!("/logs/{out}/data");
    let logs = format!("/api/{CTX}/logs");

    // A stream's bytes: as they are unless a parameter asks for lines.
    let all = rd.text(&data).await;
    assert!(all.starts_with("out 0a\nout 0b\nout 1a\n") && all.ends_with("out 4b\nout 5a\n"));
    assert_eq!(
        rd.text(&format!("{data}?tail=3")).await,
        "out 4a\nout 4b\nout 5a\n"
    );
    let since = rfc3339(T0 + 3 * MINUTE);
    assert_eq!(
        rd.text(&format!("{data}?since={since}")).await,
        "out 3a\nout 3b\nout 4a\nout 4b\nout 5a\n"
    );
    let until = rfc3339(T0 + MINUTE);
    assert_eq!(
        rd.text(&format!("{data}?until={until}")).await,
        "out 0a\nout 0b\nout 1a\nout 1b\n"
    );
    assert_eq!(
        rd.text(&format!("{data}?since={since}&tail=1")).await,
        "out 5a\n"
    );
    assert_eq!(
        rd.text(&format!("{data}?tail=2&timestamps=true")).await,
        format!(
            "{} out 4b\n{} out 5a\n",
            nanos(T0 + 4 * MINUTE),
            nanos(T0 + 5 * MINUTE)
        )
    );
    assert_eq!(
        rd.text(&format!("{data}?tail=1&prefix=true")).await,
        "[s1/stdout] out 5a\n"
    );
    assert_eq!(
        rd.text(&format!("{data}?limit_bytes=10")).await,
        "out 0a\nout"
    );
    assert_eq!(
        rd.text(&format!("{data}?tail=2&markers=true")).await,
        "[relay: 10 bytes dropped: gave-up]\nout 5a\n"
    );
    // NDJSON: records in the window.
    let recs = rd.ndjson(&format!("{data}?since={since}")).await;
    assert!(!recs.is_empty());
    assert!(
        recs.iter().all(|r| r["type"] == "dropped"
            || r["written_ms"].as_u64().unwrap() >= T0 + 3 * MINUTE),
        "{recs:?}"
    );
    assert_eq!(recs[0]["data"], "out 3a\nout 3b\n");
    // Bad parameters: clear errors.
    for bad in [
        "since=soon",
        "until=yesterday-ish",
        "tail=-1",
        "limit_bytes=lots",
    ] {
        let r = rd
            .req(Method::GET, &format!("{data}?{bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let r = rd
        .req(Method::GET, &format!("{data}?tail=1"))
        .header("range", "bytes=0-3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // A step's logs: both streams merged by write time, whole lines, the gap as a line.
    let want = merged().concat();
    assert_eq!(rd.text(&logs).await, want);
    assert_eq!(
        rd.text(&format!("{logs}?markers=false")).await,
        want.replace("[relay: 10 bytes dropped: gave-up]\n", "")
    );
    assert_eq!(
        rd.text(&format!("{logs}?tail=4")).await,
        merged()[merged().len() - 4..].concat()
    );
    let window = format!(
        "since={}&until={}",
        rfc3339(T0 + MINUTE),
        rfc3339(T0 + 2 * MINUTE)
    );
    assert_eq!(
        rd.text(&format!("{logs}?{window}")).await,
        "out 1a\nout 1b\nerr 1\nout 2a\nout 2b\n"
    );
    assert_eq!(
        rd.text(&format!("{logs}?{window}&timestamps=true&prefix=true"))
            .await,
        format!(
            "{t1} [s1/stdout] out 1a\n{t1} [s1/stdout] out 1b\n{t1h} [s1/stderr] err 1\n\
             {t2} [s1/stdout] out 2a\n{t2} [s1/stdout] out 2b\n",
            t1 = nanos(T0 + MINUTE),
            t1h = nanos(T0 + MINUTE + MINUTE / 2),
            t2 = nanos(T0 + 2 * MINUTE),
        )
    );
    assert_eq!(
        rd.text(&format!("{logs}?limit_bytes=20")).await,
        &want[..20]
    );
    let recs = rd.ndjson(&format!("{logs}?{window}")).await;
    let texts: Vec<&str> = recs.iter().map(|r| r["data"].as_str().unwrap()).collect();
    assert_eq!(texts, ["out 1a\nout 1b\n", "err 1\n", "out 2a\nout 2b\n"]);
    let recs = rd.ndjson(&format!("{logs}?limit_bytes=16")).await;
    let texts: Vec<&str> = recs.iter().map(|r| r["data"].as_str().unwrap()).collect();
    assert_eq!(texts, ["out 0a\nout 0b\n", "er"]);

    // A trigger's logs: the same parameters.
    let tw = s.client(&s.token(TRIGGER, Scope::Write));
    let tr = s.client(&s.token(TRIGGER, Scope::Read));
    let id = tw.stream("hook.stdout").await;
    let mut at = 0;
    for i in 0..4 {
        at = write(&tw, &id, at, T0 + i * MINUTE, &format!("req {i}\n")).await;
    }
    let tlogs = format!("/api/{TRIGGER}/logs");
    assert_eq!(
        tr.text(&format!("{tlogs}?tail=2&prefix=true")).await,
        "[hook/stdout] req 2\n[hook/stdout] req 3\n"
    );
    assert_eq!(
        tr.text(&format!(
            "{tlogs}?since={}&limit_bytes=8",
            rfc3339(T0 + MINUTE)
        ))
        .await,
        "req 1\nre"
    );

    // Two replicas of the trigger, each naming its pod (a pod's own token would name it for
    // it): `pod=` selects one by name, or by the UID in its streams' names.
    let mut replicas = Vec::new();
    for (uid, pod) in [("uid-1", "hook-7d9f8-aaaaa"), ("uid-2", "hook-7d9f8-bbbbb")] {
        let r = tw
            .create(serde_json::json!({"name": format!("hook.{uid}.stdout"), "pod": pod}))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let created: serde_json::Value = r.json().await.unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        let now = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        write(&tw, &id, 0, now, &format!("{pod} serves\n")).await;
        let status = tr.json(&format!("/logs/{id}")).await;
        assert_eq!(status["pod"], pod);
        replicas.push(id);
    }
    let a = "hook-7d9f8-aaaaa serves\n";
    let b = "hook-7d9f8-bbbbb serves\n";
    assert_eq!(tr.text(&format!("{tlogs}?pod=hook-7d9f8-aaaaa")).await, a);
    assert_eq!(tr.text(&format!("{tlogs}?pod=uid-2")).await, b);
    // No stream of that pod: nothing to read is a 404, as for a step that does not exist.
    let wf = s.client(&s.token("workflows/w1", Scope::Read));
    for missing in [
        format!("{tlogs}?pod=hook-7d9f8-ccccc"),
        "/api/workflows/w1/runs/r1/steps/never/logs".to_owned(),
        format!("{logs}?stream=never"),
    ] {
        let r = wf.req(Method::GET, &missing).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{missing}");
    }
    // A follower of a step that has not started waits for it instead.
    let r = wf
        .req(
            Method::GET,
            "/api/workflows/w1/runs/r1/steps/never/logs?follow=true",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = tr
        .req(Method::GET, &format!("{tlogs}?pod=Not_A_Pod"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Without since, until or tail a trigger's read covers the last hour: the replicas' lines of
    // now, not the requests written in 2023.
    let mut recent: Vec<String> = tr
        .text(&tlogs)
        .await
        .lines()
        .map(|l| format!("{l}\n"))
        .collect();
    recent.sort();
    assert_eq!(recent, [a, b]);
    // A step's read has no such default: its whole history.
    assert!(rd.text(&logs).await.starts_with("out 0a\n"));
}

#[tokio::test]
async fn every_read_parameter_on_file_storage() {
    every_parameter(&Server::start(&[])).await;
}

#[tokio::test]
async fn every_read_parameter_on_s3() {
    let Some(moto) = Emulator::moto() else {
        return;
    };
    let r = reqwest::Client::new()
        .put(format!("{}/relay-logs", moto.endpoint()))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with_env(tmp.path(), "s3://relay-logs/reads", &[], &moto.s3_env());
    every_parameter(&s).await;
}

/// A follower of a step from its last line, with timestamps: a line without its newline comes
/// out after the hold, and the rest of it continues that line; the read ends when the step does.
#[tokio::test]
async fn a_follower_starts_at_the_tail_and_gets_held_lines_after_a_moment() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let rd = s.client(&s.token(CTX, Scope::Read));
    let out = w.stream("stdout").await;
    let mut at = 0;
    for i in 0..3 {
        at = write(&w, &out, at, T0 + i * MINUTE, &format!("line {i}\n")).await;
    }
    let resp = rd
        .req(
            Method::GET,
            &format!("/api/{CTX}/logs?follow=true&tail=1&timestamps=true"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = Box::pin(resp.bytes_stream());
    let mut got = Vec::new();
    read_until(
        &mut body,
        &mut got,
        &format!("{} line 2\n", nanos(T0 + 2 * MINUTE)),
    )
    .await;
    // A prompt without its newline is not held back for ever.
    at = write(&w, &out, at, T0 + 3 * MINUTE, "prompt> ").await;
    read_until(&mut body, &mut got, "prompt> ").await;
    at = write(&w, &out, at, T0 + 4 * MINUTE, "yes\n").await;
    w.finish(&out, at).await;
    let stderr = w.stream("stderr").await;
    w.finish(&stderr, 0).await;
    read_until(&mut body, &mut got, "prompt> yes\n").await;
    assert_eq!(
        String::from_utf8(got).unwrap(),
        format!(
            "{} line 2\n{} prompt> yes\n",
            nanos(T0 + 2 * MINUTE),
            nanos(T0 + 3 * MINUTE)
        )
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("the follower ends with the step")
            .is_none()
    );
}

/// Reads `body` until what was read ends with `want`, failing after 10 s.
async fn read_until(
    body: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    got: &mut Vec<u8>,
    want: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(got).ends_with(want) {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("no {want:?} in {:?}", String::from_utf8_lossy(got)))
            .expect("the follower ended early")
            .unwrap();
        got.extend_from_slice(&chunk);
    }
}
