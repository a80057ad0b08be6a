//! The shipping client against the real server binary on a real socket: round trips, throttling,
//! an API that is down, restarts, overflow accounting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ::client::{Client, ShipConfig, ShipReport, Shipper, StreamSpec, Token};
use common::{CTX, Server, bytes, eventually, free_addr, sum_metric};
use metadata_api::{auth::Scope, coding::Coding};
use serde_json::Value;

fn client(url: &str, token: &str) -> Arc<Client> {
    Arc::new(Client::new(url, Token::Value(token.to_owned()), Duration::from_secs(5)).unwrap())
}

fn quick() -> ShipConfig {
    ShipConfig {
        batch_bytes: 64 << 10,
        batch_interval: Duration::from_millis(20),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
        ..ShipConfig::default()
    }
}

/// Writes `data` in `chunk`-sized writes while the shipper runs, closes with `grace` and returns
/// the report.
async fn ship(
    cfg: ShipConfig,
    client: Arc<Client>,
    name: &str,
    data: &[u8],
    chunk: usize,
    grace: Duration,
) -> ShipReport {
    let shipper = Shipper::new(cfg);
    let run = {
        let s = shipper.clone();
        let spec = StreamSpec::named(name);
        tokio::spawn(async move { s.run(client, spec).await })
    };
    for c in data.chunks(chunk) {
        shipper.write(c);
        tokio::task::yield_now().await;
    }
    shipper.close(Instant::now() + grace);
    run.await.unwrap()
}

/// Checks the stream against what was written: stored bytes equal the original at their
/// offsets, stored and dropped ranges cover everything, and the final length is declared.
async fn verify(server: &Server, token: &str, report: &ShipReport, data: &[u8]) -> Value {
    let api = server.client(token);
    let id = report.id.clone().expect("stream opened");
    let st = api.status(&id).await;
    assert_eq!(st["final_length"], data.len() as u64, "{st}");
    assert_eq!(st["complete"], true, "{st}");
    assert_eq!(st["pending"], serde_json::json!([]), "{st}");
    let mut expected = Vec::new();
    for s in st["stored"].as_array().unwrap() {
        let (a, b) = (s["start"].as_u64().unwrap(), s["end"].as_u64().unwrap());
        expected.extend_from_slice(&data[a as usize..b as usize]);
    }
    let got = api.data(&id).await;
    assert!(got == expected, "stored bytes differ from what was written");
    let dropped: u64 = st["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["end"].as_u64().unwrap() - s["start"].as_u64().unwrap())
        .sum();
    assert_eq!(
        got.len() as u64 + dropped,
        data.len() as u64,
        "stored + dropped must cover every byte: {st}"
    );
    assert_eq!(report.written, data.len() as u64);
    assert_eq!(report.stored, got.len() as u64, "{report:?}");
    assert_eq!(report.dropped, dropped, "{report:?}");
    assert_eq!(report.lost(), 0, "{report:?}");
    assert!(report.final_declared);
    st
}

#[tokio::test]
async fn round_trip_is_byte_exact() {
    let server = Server::start(&[]);
    let token = server.token(CTX, Scope::Write);
    let data = bytes(1, 5 << 20);
    let report = ship(
        quick(),
        client(&server.url, &token),
        "stdout",
        &data,
        7000,
        Duration::from_secs(20),
    )
    .await;
    verify(&server, &token, &report, &data).await;
    assert_eq!(
        report.stored,
        data.len() as u64,
        "nothing dropped: {report:?}"
    );
}

/// Every coding the shipper can send, on log text (which each of them shrinks), round trips
/// through the real server byte for byte.
#[tokio::test]
async fn round_trip_is_byte_exact_in_every_coding() {
    let server = Server::start(&[]);
    let token = server.token(CTX, Scope::Write);
    let data: Vec<u8> = (0..60_000)
        .flat_map(|i| format!("{i:06} GET /api/items/{} 200 {}ms\n", i % 97, i % 40).into_bytes())
        .collect();
    for (coding, level) in [
        (Coding::Zstd, 1),
        (Coding::Zstd, 3),
        (Coding::Gzip, 6),
        (Coding::Identity, 0),
    ] {
        let cfg = ShipConfig {
            compression: coding,
            compression_level: level,
            ..quick()
        };
        let name = format!("{coding}-{level}");
        let report = ship(
            cfg,
            client(&server.url, &token),
            &name,
            &data,
            5000,
            Duration::from_secs(20),
        )
        .await;
        verify(&server, &token, &report, &data).await;
        assert_eq!(report.stored, data.len() as u64, "{name}: {report:?}");
    }
}

/// An API older than zstd, as a front of the real server that answers `415` to a zstd body (the
/// answer an API without the coding gives) and passes everything else on.
async fn front_without_zstd(server: &Server) -> (String, tokio::task::JoinHandle<()>) {
    use axum::{body::Body, extract::Request, http::StatusCode, response::Response};
    let upstream = server.url.clone();
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |req: Request| {
        let (upstream, http) = (upstream.clone(), http.clone());
        async move {
            let zstd = req
                .headers()
                .get("content-encoding")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"zstd"));
            if zstd {
                return Response::builder()
                    .status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
                    .header("content-type", "application/json")
                    .body(Body::from(
                        r#"{"error":"unsupported_media_type","message":"Content-Encoding must be gzip or identity"}"#,
                    ))
                    .unwrap();
            }
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let mut forward = http.request(parts.method, format!("{upstream}{}", parts.uri));
            for (k, v) in &parts.headers {
                if k != "host" {
                    forward = forward.header(k, v);
                }
            }
            let answer = forward.body(body).send().await.unwrap();
            let mut out = Response::builder().status(answer.status().as_u16());
            for (k, v) in answer.headers() {
                out = out.header(k, v);
            }
            out.body(Body::from(answer.bytes().await.unwrap())).unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, task)
}

/// A shipper told to use zstd, in front of an API that does not take it: every byte is stored
/// all the same, sent uncompressed once the API has said so.
#[tokio::test]
async fn a_coding_the_api_refuses_falls_back_to_plain_without_loss() {
    let server = Server::start(&[]);
    let token = server.token(CTX, Scope::Write);
    let (url, front) = front_without_zstd(&server).await;
    let data: Vec<u8> = (0..40_000)
        .flat_map(|i| format!("{i:06} GET /api/items/{} 200\n", i % 97).into_bytes())
        .collect();
    let cfg = ShipConfig {
        compression: Coding::Zstd,
        compression_level: 1,
        ..quick()
    };
    let report = ship(
        cfg,
        client(&url, &token),
        "stdout",
        &data,
        5000,
        Duration::from_secs(20),
    )
    .await;
    verify(&server, &token, &report, &data).await;
    assert_eq!(report.stored, data.len() as u64, "{report:?}");
    assert_eq!(report.dropped, 0, "{report:?}");
    front.abort();
}

/// The server's connection limits (`conn.rs`) as a writer meets them: three connections for
/// its address, against the shipper's eight requests in flight. Those over the limit are
/// answered `429` + `Retry-After` at once; the shipper retries them and stores every byte.
#[tokio::test]
async fn a_connection_limit_is_retried_without_loss() {
    let server = Server::start(&["--max-connections-per-peer", "3"]);
    let token = server.token(CTX, Scope::Write);
    let data = bytes(4, 512 << 10);
    let report = ship(
        ShipConfig {
            batch_bytes: 16 << 10,
            max_in_flight: 8,
            ..quick()
        },
        client(&server.url, &token),
        "stdout",
        &data,
        4096,
        Duration::from_secs(60),
    )
    .await;
    // The test reads from the same address: first the shipper's connections must be gone,
    // which the server sees a moment after the shipper returns.
    eventually(
        Duration::from_secs(10),
        "the shipper's connections to close",
        || async {
            let r = reqwest::get(format!("{}/metrics", server.url)).await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            let text = r.text().await.ok()?;
            (sum_metric(&text, "relay_metadata_api_connections_open ") <= 1.0).then_some(())
        },
    )
    .await;
    verify(&server, &token, &report, &data).await;
    assert_eq!(report.stored, data.len() as u64, "{report:?}");
    let refused = server
        .metric("relay_metadata_api_connections_refused_total")
        .await;
    assert!(refused > 0.0, "the test must meet the connection limit");
    println!("{refused} connections refused, every byte stored");
}

#[tokio::test]
async fn throttling_is_retried_without_loss_or_duplicates() {
    // 1 MiB/s for the stream: most batches meet a 429 and wait for Retry-After.
    let server = Server::start(&["--stream-rate", "1M"]);
    let token = server.token(CTX, Scope::Write);
    let data = bytes(2, 3 << 20);
    let cfg = ShipConfig {
        buffer_limit: 16 << 20,
        ..quick()
    };
    let report = ship(
        cfg,
        client(&server.url, &token),
        "stdout",
        &data,
        4096,
        Duration::from_secs(30),
    )
    .await;
    verify(&server, &token, &report, &data).await;
    assert_eq!(report.stored, data.len() as u64, "{report:?}");
    let metrics = server.metrics().await;
    let throttled = sum_metric(&metrics, "relay_metadata_api_throttled_requests_total");
    assert!(throttled > 0.0, "the test must meet 429s:\n{metrics}");
    // Never back before its Retry-After: the server would refuse that too (reason retry_after).
    assert!(
        !metrics.lines().any(|l| l
            .starts_with("relay_metadata_api_throttled_requests_total{reason=\"retry_after\"}")),
        "the client came back before its Retry-After:\n{metrics}"
    );
}

#[tokio::test]
async fn overflow_while_throttled_is_reported_as_exact_dropped_ranges() {
    let server = Server::start(&["--stream-rate", "256K"]);
    let token = server.token(CTX, Scope::Write);
    let data = bytes(3, 4 << 20);
    let cfg = ShipConfig {
        buffer_limit: 256 << 10,
        ..quick()
    };
    let report = ship(
        cfg,
        client(&server.url, &token),
        "stderr",
        &data,
        16 << 10,
        Duration::from_secs(30),
    )
    .await;
    let st = verify(&server, &token, &report, &data).await;
    assert!(report.dropped > 0, "the buffer must overflow: {report:?}");
    assert!(!st["dropped"].as_array().unwrap().is_empty());
    assert_eq!(
        report.dropped_by_reason,
        [(::client::DropReason::BufferFull, report.dropped)].into(),
        "an overflow is a full buffer and nothing else"
    );
    assert!(
        st["dropped"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["reason"] == "buffer-full"),
        "{st}"
    );
}

#[tokio::test]
async fn api_down_then_up_ships_what_was_buffered() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let storage = format!("file://{}", tmp.path().join("streams").display());
    // Mint a token with the key the server will use.
    let keys = metadata_api::auth::Keys::load_or_create(&tmp.path().join("key")).unwrap();
    let token = keys
        .mint(CTX, Scope::Write, Duration::from_secs(3600))
        .unwrap();
    let data = bytes(4, 1 << 20);
    let shipper = Shipper::new(quick());
    let run = {
        let (s, c) = (shipper.clone(), client(&url, &token));
        tokio::spawn(async move { s.run(c, StreamSpec::named("stdout")).await })
    };
    let wrote_at = unix_ms();
    for c in data.chunks(10_000) {
        assert_eq!(shipper.write(c), c.len(), "1 MiB fits the 8 MiB buffer");
    }
    // Let the shipper fail against the closed port before the server appears.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!run.is_finished());
    let up_at = unix_ms();
    let server = Server::start_full(tmp.path(), &storage, &addr, &[], &[]);
    shipper.close(Instant::now() + Duration::from_secs(20));
    let report = run.await.unwrap();
    verify(&server, &token, &report, &data).await;
    assert_eq!(report.stored, data.len() as u64, "{report:?}");
    // The bytes keep the time they were written, not the time the API came up and took them.
    let reader = server.client(&server.token(CTX, Scope::Read));
    let id = report.id.clone().unwrap();
    let mut records = 0;
    for r in reader.ndjson(&format!("/logs/{id}/data")).await {
        let (written, received) = (r["written_ms"].as_u64(), r["received_ms"].as_u64());
        let (Some(written), Some(received)) = (written, received) else {
            panic!("{r}")
        };
        assert!(
            (wrote_at..up_at).contains(&written),
            "{written} {wrote_at}..{up_at}"
        );
        assert!(received >= up_at, "{received} {up_at}");
        records += 1;
    }
    assert!(records > 0);
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn api_never_up_returns_by_the_deadline_with_everything_unreported() {
    let url = format!("http://{}", free_addr());
    let shipper = Shipper::new(quick());
    let run = {
        let (s, c) = (shipper.clone(), client(&url, "t"));
        tokio::spawn(async move { s.run(c, StreamSpec::named("stdout")).await })
    };
    shipper.write(&[7; 3000]);
    let t = Instant::now();
    shipper.close(Instant::now() + Duration::from_secs(1));
    let report = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("run ends at its deadline")
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(report.written, 3000);
    assert_eq!(report.lost(), 3000, "{report:?}");
    assert!(!report.final_declared);
    assert!(
        report
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("request to the metadata API failed")),
        "{report:?}"
    );
}

#[tokio::test]
async fn a_rerun_continues_after_what_is_stored_and_a_finished_stream_gets_a_new_generation() {
    let server = Server::start(&[]);
    let token = server.token(CTX, Scope::Write);
    let api = server.client(&token);
    // A previous writer stored 0-99 and 200-299 and died: 100-199 is pending.
    let id = api.stream("stdout").await;
    api.put_at(&id, 0, &[1; 100]).await;
    api.put_at(&id, 200, &[2; 100]).await;
    let c = client(&server.url, &token);
    let data = bytes(5, 1000);
    let report = ship(
        quick(),
        c.clone(),
        "stdout",
        &data,
        100,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(report.name, "stdout");
    assert_eq!(report.base, 300);
    assert_eq!(report.prior_dropped, 100, "{report:?}");
    let st = api.status(&id).await;
    assert_eq!(st["final_length"], 1300, "{st}");
    assert_eq!(st["complete"], true, "{st}");
    let got = api.data(&id).await;
    assert_eq!(
        &got[200..],
        &data[..],
        "this writer's bytes follow the old ones"
    );

    // The stream is complete now: the next run writes `stdout.1`.
    let again = ship(
        quick(),
        c,
        "stdout",
        b"second run",
        4,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(again.name, "stdout.1");
    assert_eq!(again.base, 0);
    let id1 = again.id.clone().unwrap();
    let got = eventually(Duration::from_secs(5), "second generation", || {
        let api = api.clone();
        let id1 = id1.clone();
        async move {
            let st = api.status(&id1).await;
            (st["complete"] == true).then_some(())?;
            Some(api.data(&id1).await)
        }
    })
    .await;
    assert_eq!(got, b"second run");
}

/// Runs a shipper that starts at stream offset `at` with `data`, then ends it with `end`
/// (`close` or `leave_open`).
async fn ship_from(
    client: Arc<Client>,
    at: Option<u64>,
    data: &[u8],
    end: fn(&Shipper, Instant),
) -> ShipReport {
    let shipper = Shipper::new(quick());
    if let Some(at) = at {
        shipper.resume_at(at);
    }
    let run = {
        let s = shipper.clone();
        tokio::spawn(async move { s.run(client, StreamSpec::named("stdout")).await })
    };
    for c in data.chunks(100) {
        shipper.write(c);
        tokio::task::yield_now().await;
    }
    end(&shipper, Instant::now() + Duration::from_secs(10));
    run.await.unwrap()
}

#[tokio::test]
async fn a_writer_left_open_is_taken_over_at_a_known_offset_without_silent_gaps() {
    let server = Server::start(&[]);
    let token = server.token(CTX, Scope::Write);
    let api = server.client(&token);
    let c = client(&server.url, &token);
    let data = bytes(9, 1000);

    // The first writer stops without ending the stream.
    let first = ship_from(c.clone(), None, &data[..300], Shipper::leave_open).await;
    assert!(!first.final_declared, "{first:?}");
    assert_eq!(first.stored, 300, "{first:?}");
    let id = first.id.clone().unwrap();
    let st = api.status(&id).await;
    assert_eq!(st["complete"], false, "{st}");
    assert!(st["final_length"].is_null(), "{st}");

    // It had also stored 500-599 when it died, and 300-499 was in its memory: lost. The next
    // writer knows the first handed over 450 bytes and its own start at 450.
    api.put_at(&id, 500, &data[500..600]).await;
    let second = ship_from(c.clone(), Some(450), &data[450..], Shipper::close).await;
    assert_eq!(second.base, 450, "{second:?}");
    assert_eq!(second.prior_dropped, 150, "300-449 is reported: {second:?}");
    assert_eq!(second.lost(), 0, "{second:?}");
    let st = api.status(&id).await;
    assert_eq!(st["complete"], true, "{st}");
    assert_eq!(st["final_length"], 1000, "{st}");
    assert_eq!(
        st["dropped"],
        serde_json::json!([{"start": 300, "end": 450, "reason": "writer-died"}]),
        "{st}"
    );
    let got = api.data(&id).await;
    let mut expected = data[..300].to_vec();
    expected.extend_from_slice(&data[450..]);
    assert!(
        got == expected,
        "stored bytes are the writers' own, in place"
    );
}

#[tokio::test]
async fn a_writer_resuming_behind_what_is_stored_rewrites_the_same_bytes() {
    let server = Server::start(&[]);
    let token = server.token(CTX, Scope::Write);
    let api = server.client(&token);
    let c = client(&server.url, &token);
    let data = bytes(11, 800);
    let first = ship_from(c.clone(), None, &data[..600], Shipper::leave_open).await;
    let id = first.id.clone().unwrap();
    // The next writer's last known hand-over was at 200: 200-599 come again, identical.
    let second = ship_from(c, Some(200), &data[200..], Shipper::close).await;
    assert_eq!(
        (second.base, second.prior_dropped, second.lost()),
        (200, 0, 0),
        "{second:?}"
    );
    let st = api.status(&id).await;
    assert_eq!(st["final_length"], 800, "{st}");
    assert_eq!(st["dropped"], serde_json::json!([]), "{st}");
    assert!(api.data(&id).await == data, "byte-exact");
}

#[tokio::test]
async fn bytes_marked_dropped_that_the_api_stored_anyway_are_not_counted_as_lost() {
    let server = Server::start(&[]);
    let token = server.token(CTX, Scope::Write);
    let api = server.client(&token);
    let data = bytes(13, 300);
    // What a request the writer gave up on leaves behind: bytes stored under its marker.
    let id = api.stream("stdout").await;
    api.put_at(&id, 0, &data[..100]).await;
    let shipper = Shipper::new(quick());
    shipper.resume_at(0);
    let run = {
        let (s, c) = (shipper.clone(), client(&server.url, &token));
        tokio::spawn(async move { s.run(c, StreamSpec::named("stdout")).await })
    };
    shipper.skip(150, ::client::DropReason::KernelLost);
    shipper.write(&data[150..]);
    shipper.close(Instant::now() + Duration::from_secs(10));
    let report = run.await.unwrap();
    assert_eq!(report.dropped, 150, "{report:?}");
    assert_eq!(report.dropped_stored, 100, "{report:?}");
    let st = api.status(&id).await;
    assert_eq!(
        st["dropped"],
        serde_json::json!([{"start": 100, "end": 150, "reason": "kernel-lost"}]),
        "{st}"
    );
}

#[tokio::test]
async fn rotated_token_file_is_picked_up() {
    let server = Server::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("token");
    std::fs::write(&path, "not-a-valid-token").unwrap();
    let c = Arc::new(
        Client::new(
            &server.url,
            Token::File(path.clone()),
            Duration::from_secs(5),
        )
        .unwrap(),
    );
    let shipper = Shipper::new(quick());
    let run = {
        let (s, c) = (shipper.clone(), c.clone());
        tokio::spawn(async move { s.run(c, StreamSpec::named("stdout")).await })
    };
    shipper.write(b"hello after rotation");
    // 401s are retried; the rotation below lets the next try through.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let token = server.token(CTX, Scope::Write);
    let next = tmp.path().join("token.new");
    std::fs::write(&next, &token).unwrap();
    std::fs::rename(&next, &path).unwrap();
    shipper.close(Instant::now() + Duration::from_secs(10));
    let report = run.await.unwrap();
    verify(&server, &token, &report, b"hello after rotation").await;
}
