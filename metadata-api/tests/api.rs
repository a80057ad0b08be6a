//! Every route, status code and limit, through the real binary on a real socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{io::Write, time::Duration};

use common::{Api, CTX, Server, TRIGGER};
use metadata_api::auth::{AUDIENCE, Claims, Context, ISSUER, Scope};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].is_string(), "error body without message: {v}");
    v["error"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn create_is_idempotent_and_validates() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let r = w.create(json!({"name": "stdout"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let a: Value = r.json().await.unwrap();
    let id = a["id"].as_str().unwrap();
    assert_eq!(id.len(), 64);
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert_eq!(a["name"], "stdout");
    assert_eq!(a["source"], "entrypoint");
    assert_eq!(a["length"], 0);
    let b: Value = w
        .create(json!({"name": "stdout"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(a["id"], b["id"]);
    let other = w.stream("stderr").await;
    assert_ne!(other, id);
    // Names.
    for bad in [
        json!({"name": ""}),
        json!({"name": "a/b"}),
        json!({"name": "x".repeat(65)}),
        json!({"name": "ünï"}),
        json!({"name": 5}),
        json!({}),
        json!({"name": "a", "extra": 1}),
        json!({"name": "a", "source": "other"}),
    ] {
        let r = w.create(bad.clone()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(error_code(r).await, "bad_request");
    }
    assert_eq!(
        w.create(json!({"name": "x".repeat(64)})).await.status(),
        StatusCode::OK
    );
    // Malformed JSON.
    let r = w
        .req(Method::POST, "/logs")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Oversized JSON body.
    let r = w
        .req(Method::POST, "/logs")
        .body(vec![b' '; 100 << 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A write token cannot pick another context or the ebpf source.
    let r = w
        .create(json!({"name": "stdout", "context": TRIGGER}))
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = w.create(json!({"name": "stdout", "source": "ebpf"})).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // A read token cannot create.
    let rd = s.client(&s.token("workflows/w1", Scope::Read));
    assert_eq!(
        rd.create(json!({"name": "stdout"})).await.status(),
        StatusCode::FORBIDDEN
    );
    // Collectors create ebpf streams in the context they name.
    let c = s.client(&s.token("workflows", Scope::Collector));
    let r = c.create(json!({"name": "stdout", "context": CTX})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["source"], "ebpf");
    assert_ne!(v["id"], a["id"]);
    assert_eq!(
        c.create(json!({"name": "stdout"})).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        c.create(json!({"name": "stdout", "context": "workflows/../x"}))
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn tokens_are_checked() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let id = w.stream("stdout").await;
    let mut anon = w.clone();
    anon.token = None;
    for (method, path) in [
        (Method::POST, "/logs".to_owned()),
        (Method::GET, format!("/logs/{id}")),
        (Method::GET, format!("/logs/{id}/data")),
        (Method::PATCH, format!("/logs/{id}/data")),
        (Method::POST, format!("/logs/{id}/markers")),
        (Method::GET, format!("/api/{CTX}/logs")),
    ] {
        let r = anon.req(method.clone(), &path).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
    }
    let keys = s.keys();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |exp: u64, aud: &str| Claims {
        sub: Context::stream(CTX).unwrap(),
        scope: Scope::Write,
        aud: aud.into(),
        iss: ISSUER.into(),
        iat: now - 100,
        exp,
    };
    let expired = keys.sign(&claims(now - 60, AUDIENCE)).unwrap();
    let wrong_aud = keys.sign(&claims(now + 60, "someone-else")).unwrap();
    let forged = metadata_api::auth::Keys::from_secret(&[1; 32])
        .mint(CTX, Scope::Write, Duration::from_secs(60))
        .unwrap();
    for bad in [
        expired,
        wrong_aud,
        forged,
        "garbage".into(),
        "a.b.c".into(),
        "x".repeat(5000),
    ] {
        let mut c = w.clone();
        c.token = Some(bad);
        assert_eq!(
            c.create(json!({"name": "stdout"})).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let r = w
        .http
        .post(format!("{}/logs", s.url))
        .header(
            "authorization",
            format!("Basic {}", s.token(CTX, Scope::Write)),
        )
        .json(&json!({"name": "stdout"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn foreign_unknown_and_odd_ids_are_404() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let id = w.stream("stdout").await;
    let other = s.client(&s.token("workflows/w2/runs/r1/steps/s1", Scope::Write));
    let other_reader = s.client(&s.token("workflows/w2", Scope::Read));
    let near_reader = s.client(&s.token("workflows/w1x", Scope::Read));
    for c in [&other, &other_reader, &near_reader] {
        for (m, p) in [
            (Method::GET, format!("/logs/{id}")),
            (Method::GET, format!("/logs/{id}/data")),
            (Method::PATCH, format!("/logs/{id}/data")),
            (Method::POST, format!("/logs/{id}/markers")),
        ] {
            let r = c
                .req(m.clone(), &p)
                .header("content-range", "bytes 0-0/*")
                .body("x")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{m} {p}");
            assert_eq!(error_code(r).await, "not_found");
        }
    }
    let unknown = "0".repeat(64);
    for p in [
        format!("/logs/{unknown}"),
        format!("/logs/{}", id.to_uppercase()),
        "/logs/xyz".to_owned(),
        "/logs/..%2F..%2Fkey".to_owned(),
        "/logs/%2e%2e".to_owned(),
        format!("/logs/{id}%00"),
    ] {
        let r = w.req(Method::GET, &p).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{p}");
    }
    // The collector sees only ebpf streams.
    let c = s.client(&s.token("workflows", Scope::Collector));
    assert_eq!(
        c.req(Method::GET, &format!("/logs/{id}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    // A reader of the workflow sees it, and cannot write.
    let rd = s.client(&s.token("workflows/w1", Scope::Read));
    assert_eq!(rd.status(&id).await["context"], CTX);
    assert_eq!(
        rd.patch(&id, "bytes 0-0/*", "x").await.status(),
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn ranges_resends_conflicts_and_final_length() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let id = w.stream("stdout").await;
    w.put_at(&id, 5, b"world").await;
    let st = w.status(&id).await;
    assert_eq!(st["length"], 0);
    assert_eq!(st["end"], 10);
    assert_eq!(st["pending"], json!([{"start": 0, "end": 5}]));
    w.put_at(&id, 0, b"hello").await;
    // Identical re-send: 202, nothing duplicated.
    w.put_at(&id, 3, b"lowo").await;
    assert_eq!(w.data(&id).await, b"helloworld");
    // Overlap with different bytes.
    let r = w.patch(&id, "bytes 8-11/*", "XXXX").await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(error_code(r).await, "conflict");
    // Malformed or inconsistent ranges.
    for (range, body, status) in [
        ("bytes 0-1", "ab", StatusCode::BAD_REQUEST),
        ("bytes 5-3/*", "ab", StatusCode::BAD_REQUEST),
        ("bytes 10-12/*", "ab", StatusCode::BAD_REQUEST),
        ("bytes 10-10/*", "ab", StatusCode::BAD_REQUEST),
        ("bytes */5", "ab", StatusCode::BAD_REQUEST),
        ("items 0-1/*", "ab", StatusCode::BAD_REQUEST),
        ("bytes 10-11/11", "ab", StatusCode::BAD_REQUEST),
        (
            "bytes 99999999999999999999-1/*",
            "ab",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let r = w.patch(&id, range, body).await;
        assert_eq!(r.status(), status, "{range}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].is_string());
    }
    let r = w
        .req(Method::PATCH, &format!("/logs/{id}/data"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "PATCH without Content-Range"
    );
    let r = w
        .req(Method::PATCH, &format!("/logs/{id}/data"))
        .header("content-type", "text/html")
        .header("content-range", "bytes 10-10/*")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // POST appends at the end.
    let r = w
        .req(Method::POST, &format!("/logs/{id}/data"))
        .header("content-type", "application/octet-stream")
        .body("!!")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(w.data(&id).await, b"helloworld!!");
    // Final length below what is stored, then the right one, then beyond it.
    assert_eq!(
        w.patch(&id, "bytes */5", Vec::new()).await.status(),
        StatusCode::RANGE_NOT_SATISFIABLE
    );
    w.put_at(&id, 12, b"?").await;
    w.finish(&id, 13).await;
    w.finish(&id, 13).await;
    let st = w.status(&id).await;
    assert_eq!(st["complete"], true);
    assert_eq!(st["final_length"], 13);
    let r = w.patch(&id, "bytes 13-13/*", "x").await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(error_code(r).await, "range_not_satisfiable");
    assert_eq!(
        w.patch(&id, "bytes */14", Vec::new()).await.status(),
        StatusCode::RANGE_NOT_SATISFIABLE
    );
    // `bytes a-b/N` stores and declares at once.
    let id2 = w.stream("stderr").await;
    w.put_at(&id2, 0, b"ab").await;
    let r = w.patch(&id2, "bytes 2-3/4", "cd").await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(w.status(&id2).await["complete"], true);
}

#[tokio::test]
async fn gzip_bodies_and_size_limits() {
    let s = Server::start(&["--max-body", "64K", "--max-decoded", "1M"]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let id = w.stream("stdout").await;
    let plain = common::bytes(1, 50_000);
    let r = w
        .patch_encoded(
            &id,
            &format!("bytes 0-{}/*", plain.len() - 1),
            "gzip",
            gzip(&plain),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(w.data(&id).await, plain);
    // Over the wire limit, with and without Content-Length.
    let big = vec![b'a'; 65 << 10];
    let r = w
        .patch(
            &id,
            &format!("bytes 50000-{}/*", 50_000 + big.len() - 1),
            big.clone(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let chunks = futures::stream::iter(
        big.chunks(4096)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = w
        .patch(
            &id,
            &format!("bytes 50000-{}/*", 50_000 + big.len() - 1),
            reqwest::Body::wrap_stream(chunks),
        )
        .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A gzip bomb: 32 MiB of zeros in 32 KiB.
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&vec![0u8; 32 << 20]).unwrap();
    let bomb = e.finish().unwrap();
    assert!(bomb.len() < 64 << 10);
    let r = w
        .req(Method::PATCH, &format!("/logs/{id}/data"))
        .header(
            "content-range",
            format!("bytes 50000-{}/*", 50_000 + (32 << 20) - 1),
        )
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(r).await, "too_large");
    // Truncated and bogus gzip.
    let mut cut = gzip(b"some log line\n");
    cut.truncate(cut.len() - 6);
    for body in [cut, b"not gzip at all".to_vec()] {
        let r = w
            .patch_encoded(&id, "bytes 50000-50013/*", "gzip", body)
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
    let r = w
        .patch_encoded(&id, "bytes 50000-50001/*", "br", "ab")
        .await;
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Nothing of the refused requests was stored.
    let st = w.status(&id).await;
    assert_eq!(st["end"], 50_000);
    let metrics = w.text("/metrics").await;
    assert!(
        metrics.contains("relay_metadata_api_log_bytes_rejected_total{reason=\"too_large\"}"),
        "{metrics}"
    );
}

/// zstd as the client sends it (`client::compress_into`), and as other writers might: several
/// frames, a streamed frame without its size, an upper-case token; bombs, over-wide windows and
/// broken bodies are refused and nothing of them is stored.
#[tokio::test]
async fn zstd_bodies_and_size_limits() {
    use client::compress_into;
    use metadata_api::coding::Coding;
    let s = Server::start(&["--max-body", "64K", "--max-decoded", "1M"]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let id = w.stream("stdout").await;
    let lines: Vec<u8> = (0..4000)
        .flat_map(|i| format!("{i:05} Compiling crate{} v0.1.{i}\n", i % 13).into_bytes())
        .collect();
    let body = compress_into(Coding::Zstd, &lines, 3, Vec::new()).unwrap();
    assert!(body.len() < lines.len() / 4, "{} bytes", body.len());
    let mut end = 0;
    let mut send = async |coding: &str, body: Vec<u8>, n: usize| {
        let r = w
            .patch_encoded(&id, &format!("bytes {end}-{}/*", end + n - 1), coding, body)
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{coding}");
        end += n;
    };
    send("zstd", body, lines.len()).await;
    // Two frames in one body, the second streamed (no content size in its header).
    let (a, b) = lines.split_at(30_000);
    let mut two = zstd::bulk::compress(a, 1).unwrap();
    two.extend(zstd::stream::encode_all(b, 1).unwrap());
    send(" ZSTD ", two, lines.len()).await;
    let want = [&lines[..], &lines[..]].concat();
    assert_eq!(w.data(&id).await, want);
    let end = want.len();
    let refused = async |body: Vec<u8>, n: usize| {
        w.patch_encoded(&id, &format!("bytes {end}-{}/*", end + n - 1), "zstd", body)
            .await
    };
    // A zstd bomb: 32 MiB of zeros in a few KiB, no size in its header.
    let bomb = zstd::stream::encode_all(&vec![0u8; 32 << 20][..], 19).unwrap();
    assert!(bomb.len() < 4 << 10, "{}", bomb.len());
    let r = refused(bomb, 32 << 20).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(r).await, "too_large");
    // One that says so in its header: refused the same way.
    let announced = zstd::bulk::compress(&vec![0u8; 2 << 20], 1).unwrap();
    let r = refused(announced, 2 << 20).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A 16 MiB window (`zstd --long=24`) the decoder would have to allocate, whatever the body.
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    e.window_log(24).unwrap();
    e.write_all(&lines).unwrap();
    let r = refused(e.finish().unwrap(), lines.len()).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_request", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid zstd body"),
        "{v}"
    );
    // Truncated, corrupt (the checksum the client writes catches it), bogus, gzip sent as zstd.
    let good = compress_into(Coding::Zstd, &lines, 1, Vec::new()).unwrap();
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x55;
    for body in [
        good[..good.len() - 6].to_vec(),
        corrupt,
        b"not zstd at all".to_vec(),
        gzip(&lines),
    ] {
        let r = refused(body, lines.len()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v: Value = r.json().await.unwrap();
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .starts_with("invalid zstd body"),
            "{v}"
        );
    }
    // Unknown codings are refused naming the ones that are not.
    let r = w
        .patch_encoded(&id, &format!("bytes {end}-{end}/*"), "br", "a")
        .await;
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("gzip, zstd or identity"),
        "{v}"
    );
    // Nothing of the refused requests was stored.
    assert_eq!(w.status(&id).await["end"], end as u64);
    assert_eq!(w.data(&id).await, want);
}

#[tokio::test]
async fn markers_are_validated_skipped_and_reported() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let id = w.stream("stdout").await;
    w.put_at(&id, 0, b"abc").await;
    assert_eq!(
        w.mark_for(&id, "bytes 3-5/*", "buffer-full").await.status(),
        StatusCode::ACCEPTED
    );
    w.put_at(&id, 6, b"ghi").await;
    for (body, why) in [
        (
            json!({"range": "bytes 3-5/*", "markers": ["lost"]}),
            "unknown marker",
        ),
        (json!({"range": "bytes 3-5/*", "markers": []}), "no marker"),
        (
            json!({"range": "bytes 5-3/*", "markers": ["dropped"]}),
            "backwards",
        ),
        (
            json!({"range": "bytes */9", "markers": ["dropped"]}),
            "no range",
        ),
        (json!({"range": 5, "markers": ["dropped"]}), "wrong type"),
        (json!({"markers": ["dropped"]}), "missing range"),
        (
            json!({"range": "bytes 3-5/*", "markers": ["dropped"], "reason": 7}),
            "reason of the wrong type",
        ),
    ] {
        let r = w
            .req(Method::POST, &format!("/logs/{id}/markers"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{why}");
    }
    // An unknown reason is refused, naming the reasons there are.
    let r = w.mark_for(&id, "bytes 3-5/*", "tired").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("unknown drop reason \"tired\"; the reasons are unspecified, buffer-full"),
        "{msg}"
    );
    let st = w.status(&id).await;
    assert_eq!(st["length"], 9);
    assert_eq!(
        st["dropped"],
        json!([{"start": 3, "end": 6, "reason": "buffer-full"}])
    );
    let r = w
        .req(Method::GET, &format!("/logs/{id}/data"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-relay-dropped"], "3-5");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"abcghi");
    // Markers with a final length complete the stream.
    assert_eq!(
        w.mark(&id, "bytes 9-9/10").await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(w.status(&id).await["complete"], true);
    // NDJSON shows where the gap is.
    let rd = s.client(&s.token("workflows/w1", Scope::Read));
    let recs = rd.ndjson(&format!("/logs/{id}/data")).await;
    assert_eq!(recs[0]["type"], "data");
    assert_eq!(recs[0]["data"], "abc");
    assert_eq!(recs[1]["type"], "dropped");
    assert_eq!(recs[1]["offset"], 3);
    assert_eq!(recs[1]["length"], 3);
    assert_eq!(recs[1]["reason"], "buffer-full");
    assert_eq!(recs[2]["data"], "ghi");
    assert_eq!(recs[2]["offset"], 6);
    assert_eq!(recs[2].get("reason"), None, "data has no reason");
    // A marker without a reason (an older writer's) is stored as unspecified.
    let last = recs.last().unwrap();
    assert_eq!(
        (&last["type"], &last["reason"]),
        (&json!("dropped"), &json!("unspecified"))
    );
}

#[tokio::test]
async fn throttling_answers_429_with_retry_after_and_stores_nothing() {
    let s = Server::start(&["--stream-rate", "100K", "--global-rate", "1G"]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let id = w.stream("stdout").await;
    let part = vec![b'x'; 80 << 10];
    w.put_at(&id, 0, &part).await;
    let r = w
        .patch(
            &id,
            &format!("bytes {}-{}/*", part.len(), 2 * part.len() - 1),
            part.clone(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&after), "Retry-After {after}");
    assert_eq!(w.status(&id).await["end"], part.len());
    // Markers are never throttled.
    assert_eq!(
        w.mark(
            &id,
            &format!("bytes {}-{}/*", part.len(), 2 * part.len() - 1)
        )
        .await
        .status(),
        StatusCode::ACCEPTED
    );
    // Once the budget refills, the same request is accepted.
    let off = 2 * part.len();
    let status = common::eventually(Duration::from_secs(10), "budget refill", || {
        let w = w.clone();
        let id = id.clone();
        let part = part.clone();
        async move {
            let r = w
                .patch(
                    &id,
                    &format!("bytes {off}-{}/*", off + part.len() - 1),
                    part,
                )
                .await;
            (r.status() != StatusCode::TOO_MANY_REQUESTS).then_some(r.status())
        }
    })
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let metrics = w.text("/metrics").await;
    assert!(
        metrics.contains("relay_metadata_api_throttled_requests_total{reason=\"stream_rate\"}")
    );
}

#[tokio::test]
async fn consumer_api_merges_sources_and_streams() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(TRIGGER, Scope::Write));
    let c = s.client(&s.token("workflows", Scope::Collector));
    let rd = s.client(&s.token("workflows/w1", Scope::Read));
    let out = w.stream("stdout").await;
    let err = w.stream("stderr").await;
    w.put_at(&out, 0, b"line one\n").await;
    w.put_at(&err, 0, b"oops\n").await;
    // The entrypoint dropped a range the collector has.
    w.mark(&out, "bytes 9-18/*").await;
    w.put_at(&out, 19, b"line three\n").await;
    let r = c
        .create(json!({"name": "stdout", "context": TRIGGER}))
        .await;
    let ebpf: Value = r.json().await.unwrap();
    let ebpf = ebpf["id"].as_str().unwrap().to_owned();
    c.put_at(&ebpf, 0, b"line one\nline two!\nline three\n")
        .await;
    let path = format!("/api/{TRIGGER}/logs");
    let all = rd.req(Method::GET, &path).send().await.unwrap();
    assert_eq!(all.status(), StatusCode::OK);
    let text = all.text().await.unwrap();
    // Both streams, each complete and in order; interleaved by arrival.
    assert!(text.contains("oops\n"), "{text:?}");
    assert_eq!(
        text.replacen("oops\n", "", 1),
        "line one\nline two!\nline three\n"
    );
    let only = rd
        .req(
            Method::GET,
            &format!("{path}?stream=stdout&source=entrypoint"),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The range neither path fills is a line of its own, unless markers are switched off.
    assert_eq!(
        only,
        "line one\n[relay: 10 bytes dropped: unspecified]\nline three\n"
    );
    let unmarked = rd
        .text(&format!(
            "{path}?stream=stdout&source=entrypoint&markers=false"
        ))
        .await;
    assert_eq!(unmarked, "line one\nline three\n");
    let ebpf_only = rd.text(&format!("{path}?stream=stdout&source=ebpf")).await;
    assert_eq!(ebpf_only, "line one\nline two!\nline three\n");
    let nd = rd.ndjson_text(&format!("{path}?stream=stdout")).await;
    let recs: Vec<Value> = nd
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let sources: Vec<&str> = recs.iter().map(|r| r["source"].as_str().unwrap()).collect();
    assert_eq!(sources, ["entrypoint", "ebpf", "entrypoint"], "{nd}");
    assert!(
        recs.iter()
            .all(|r| r["stream"] == "stdout" && r["received_ms"].is_u64())
    );
    // Per-container streams: a sidecar only the collector saw is served from the ebpf path,
    // by name and among all the context's streams.
    let side = c
        .create(json!({"name": "sidecar.stdout", "context": TRIGGER}))
        .await;
    let side: Value = side.json().await.unwrap();
    let side = side["id"].as_str().unwrap().to_owned();
    c.put_at(&side, 0, b"sidecar says hi\n").await;
    let by_name = rd.text(&format!("{path}?stream=sidecar.stdout")).await;
    assert_eq!(by_name, "sidecar says hi\n");
    let nd_all = rd.ndjson_text(&path).await;
    let streams: std::collections::BTreeSet<String> = nd_all
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["stream"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        streams.into_iter().collect::<Vec<_>>(),
        ["sidecar.stdout", "stderr", "stdout"],
        "{nd_all}"
    );
    // Bad parameters and foreign readers.
    for q in [
        "?stream=a%2Fb",
        "?stream=",
        "?source=kernel",
        "?follow=maybe",
    ] {
        let r = rd
            .req(Method::GET, &format!("{path}{q}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{q}");
    }
    let stranger = s.client(&s.token("workflows/w2", Scope::Read));
    assert_eq!(
        stranger
            .req(Method::GET, &path)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    let r = rd
        .req(Method::GET, "/api/workflows/w1/triggers/..%2F..%2Fx/logs")
        .send()
        .await
        .unwrap();
    assert!(matches!(
        r.status(),
        StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND
    ));
    // The writer can read its own step.
    let own = w.req(Method::GET, &path).send().await.unwrap();
    assert_eq!(own.status(), StatusCode::OK);
}

#[tokio::test]
async fn ranged_reads() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let id = w.stream("stdout").await;
    w.put_at(&id, 0, b"0123456789").await;
    let r = w
        .req(Method::GET, &format!("/logs/{id}/data"))
        .header("range", "bytes=2-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], "bytes 2-5/*");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"2345");
    let r = w
        .req(Method::GET, &format!("/logs/{id}/data"))
        .header("range", "bytes=7-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"789");
    let r = w
        .req(Method::GET, &format!("/logs/{id}/data"))
        .header("range", "bytes=20-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers()["content-range"], "bytes */10");
    let r = w
        .req(Method::GET, &format!("/logs/{id}/data"))
        .header("range", "lines=1-2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn health_and_metrics() {
    let s = Server::start(&[]);
    let api = Api {
        http: reqwest::Client::new(),
        url: s.url.clone(),
        token: None,
    };
    for p in ["/healthz", "/readyz"] {
        assert_eq!(
            api.req(Method::GET, p).send().await.unwrap().status(),
            StatusCode::OK
        );
    }
    let w = s.client(&s.token(CTX, Scope::Write));
    let id = w.stream("stdout").await;
    w.put_at(&id, 0, b"abc").await;
    let m = api.text("/metrics").await;
    for needle in [
        "relay_metadata_api_log_bytes_accepted_total 3",
        "relay_metadata_api_http_requests_total{route=\"/logs/{id}/data\",status=\"202\"} 1",
        "relay_metadata_api_storage_seconds_bucket",
        "relay_metadata_api_streams_open 1",
        "relay_metadata_api_followers 0",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
    assert_eq!(
        api.req(Method::GET, "/nope").send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.req(Method::DELETE, "/logs")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
}

/// With `--metrics-listen`, the metrics (which name workflows) are on their own port only, so a
/// cluster can keep them from tenants that reach the API.
#[tokio::test]
async fn metrics_listen_moves_the_metrics_off_the_api_port() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_metadata-api"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--storage")
        .arg(format!("file://{}", tmp.path().join("streams").display()))
        .arg("--key-file")
        .arg(&key)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = |prefix: &str| {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l.trim()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{l:?}"))
            .to_owned()
    };
    let api = line("metadata-api listening on ");
    let metrics = line("metadata-api metrics on ");
    let http = reqwest::Client::new();
    // Traffic for a workflow, so the metrics name it.
    let keys = metadata_api::auth::Keys::load_or_create(&key).unwrap();
    let token = keys
        .mint(CTX, Scope::Write, Duration::from_secs(60))
        .unwrap();
    let r = http
        .post(format!("{api}/logs"))
        .bearer_auth(&token)
        .json(&json!({"name": "stdout"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http.get(format!("{api}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(!r.text().await.unwrap().contains("w1"));
    let r = http.get(&metrics).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(text.contains("relay_metadata_api_"), "{text}");
    for probe in ["healthz", "readyz"] {
        let api_probe = http.get(format!("{api}/{probe}")).send().await.unwrap();
        assert_eq!(api_probe.status(), StatusCode::OK);
        let base = metrics.trim_end_matches("/metrics");
        let r = http.get(format!("{base}/{probe}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    // The metrics port serves nothing else.
    let base = metrics.trim_end_matches("/metrics");
    let r = http.get(format!("{base}/logs/x")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The token key is rotated as the README says, on the real binary: tokens of the old key work
/// through the grace period and stop after it; streams keep their ids and bytes throughout.
#[tokio::test]
async fn token_keys_rotate_without_losing_any_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let storage = format!("file://{}", dir.join("streams").display());
    let key = dir.join("key").display().to_string();
    let new_key = dir.join("token-2.key").display().to_string();
    let mint = |files: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_metadata-api"));
        cmd.args(["token", "--key-file", &key]);
        for f in files {
            cmd.args(["--token-key-file", f]);
        }
        let out = cmd
            .args(["--context", CTX, "--scope", "write"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };

    // Before: the server secret signs.
    let before = Server::start_on(dir, &storage, &[]);
    let old = mint(&[]);
    let api = before.client(&old);
    let id = api.stream("stdout").await;
    api.put_at(&id, 0, b"before\n").await;
    drop(before);

    // The rotation starts: a new key signs, the old one still verifies.
    let both = ["--token-key-file", &new_key, "--token-key-file", &key];
    let during = Server::start_on(dir, &storage, &both);
    during.client(&old).put_at(&id, 7, b"during\n").await;
    let new = mint(&[&new_key, &key]);
    assert_ne!(new, old);
    let api = during.client(&new);
    assert_eq!(api.stream("stdout").await, id);
    api.put_at(&id, 14, b"after\n").await;
    drop(during);

    // The grace period is over: the old key's tokens are refused, the streams are all there.
    let after = Server::start_on(dir, &storage, &["--token-key-file", &new_key]);
    let r = after
        .client(&old)
        .req(Method::GET, &format!("/logs/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let api = after.client(&mint(&[&new_key]));
    assert_eq!(api.data(&id).await, b"before\nduring\nafter\n");
}

#[tokio::test]
async fn write_times_are_the_writers_and_reads_return_them() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let rd = s.client(&s.token(CTX, Scope::Read));
    let id = w.stream("stdout").await;
    let patch = |range: &'static str, written: &'static str, body: &'static [u8]| {
        w.req(Method::PATCH, &format!("/logs/{id}/data"))
            .header("content-type", "application/octet-stream")
            .header("content-range", range)
            .header("x-relay-written", written)
            .body(body)
            .send()
    };
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Shipped late (an API that was down): the time the bytes were written, not received.
    let r = patch("bytes 0-5/*", "1700000000123", b"early\n")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // A writer's clock far ahead is not believed: the receive time stands in.
    let ahead = (before + 3_600_000).to_string();
    let r = w
        .req(Method::PATCH, &format!("/logs/{id}/data"))
        .header("content-type", "application/octet-stream")
        .header("content-range", "bytes 6-11/*")
        .header("x-relay-written", ahead)
        .body(&b"ahead\n"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // Not a time: refused, nothing stored.
    let r = patch("bytes 12-16/*", "soon", b"bad!\n").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "bad_request");
    assert_eq!(w.status(&id).await["length"], 12);
    // Without the header: the receive time.
    w.put_at(&id, 12, b"none\n").await;

    let recs = rd.ndjson(&format!("/logs/{id}/data")).await;
    assert_eq!(recs.len(), 3, "{recs:?}");
    assert_eq!(recs[0]["written_ms"], 1_700_000_000_123u64);
    assert!(recs[0]["received_ms"].as_u64().unwrap() >= before);
    for r in &recs[1..] {
        let written = r["written_ms"].as_u64().unwrap();
        assert!(written >= before && written <= r["received_ms"].as_u64().unwrap());
    }
}
