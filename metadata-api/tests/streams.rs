//! Parallel out-of-order writers, followers, restarts and replicas, through the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{sync::Arc, time::Duration};

use common::{CTX, Server, TRIGGER, bytes, sha256};
use futures::StreamExt;
use metadata_api::auth::Scope;
use rand::seq::SliceRandom;
use reqwest::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_out_of_order_parts_read_back_identical() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let id = w.stream("stdout").await;
    let source = Arc::new(bytes(42, 64 * 37_001));
    let mut parts: Vec<usize> = (0..64).collect();
    parts.shuffle(&mut rand::rng());
    let part_len = 37_001;
    let mut tasks = Vec::new();
    for chunk in parts.chunks(8) {
        let (w, id, source, chunk) = (w.clone(), id.clone(), source.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            for i in chunk {
                let a = i * part_len;
                w.put_at(&id, a as u64, &source[a..a + part_len]).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    w.finish(&id, source.len() as u64).await;
    assert_eq!(w.status(&id).await["complete"], true);
    assert_eq!(sha256(&w.data(&id).await), sha256(&source));
}

#[tokio::test]
async fn follower_sees_later_bytes_and_ends_at_final_length() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let rd = s.client(&s.token("workflows/w1", Scope::Read));
    let id = w.stream("stdout").await;
    w.put_at(&id, 0, b"first\n").await;
    let resp = rd
        .req(Method::GET, &format!("/logs/{id}/data?follow=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    // Wait for the first chunk before writing more: the follower must see bytes written later.
    while got.len() < 6 {
        got.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    assert_eq!(got, b"first\n");
    // A gap, filled afterwards: the follower waits on it and then goes on in order.
    w.put_at(&id, 12, b"third\n").await;
    w.put_at(&id, 6, b"second").await;
    w.mark(&id, "bytes 18-19/*").await;
    w.put_at(&id, 20, b"end").await;
    w.finish(&id, 23).await;
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = body.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
    })
    .await;
    assert!(rest.is_ok(), "follower did not end at the final length");
    assert_eq!(got, b"first\nsecondthird\nend");
}

#[tokio::test]
async fn trigger_follow_streams_until_the_reader_leaves() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(TRIGGER, Scope::Write));
    let rd = s.client(&s.token("workflows/w1", Scope::Read));
    let id = w.stream("stderr").await;
    let resp = rd
        .req(Method::GET, &format!("/api/{TRIGGER}/logs?follow=true"))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    w.put_at(&id, 0, b"hook fired\n").await;
    w.finish(&id, 11).await;
    let mut text = String::new();
    while !text.ends_with('\n') {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("no record")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let rec: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(rec["stream"], "stderr");
    assert_eq!(rec["data"], "hook fired\n");
    // Complete, yet a trigger stays open for more.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), body.next())
            .await
            .is_err(),
        "trigger follow ended by itself"
    );
    let metrics = rd.text("/metrics").await;
    assert!(
        metrics.contains("relay_metadata_api_followers 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = format!("file://{}", tmp.path().join("streams").display());
    // As deployed: a restarted container keeps its pod's name among the stream's writers.
    let replica = ["--replica-id", "metadata-api-0"];
    let mut s = Server::start_on(tmp.path(), &storage, &replica);
    let token = s.token(CTX, Scope::Write);
    let w = s.client(&token);
    let id = w.stream("stdout").await;
    let source = Arc::new(bytes(9, 400 * 16_384));
    // A writer streams parts until the server dies under it; it records what got a 202.
    let writer = {
        let (w, id, source) = (w.clone(), id.clone(), source.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for (i, part) in source.chunks(16_384).enumerate() {
                let a = i * 16_384;
                let r = w
                    .req(Method::PATCH, &format!("/logs/{id}/data"))
                    .header(
                        "content-range",
                        format!("bytes {a}-{}/*", a + part.len() - 1),
                    )
                    .body(part.to_vec())
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status() == StatusCode::ACCEPTED) {
                    acked.push(i);
                } else {
                    break;
                }
            }
            acked
        })
    };
    // Kill once a good share is in.
    common::eventually(Duration::from_secs(20), "ingest progress", || {
        let w = w.clone();
        let id = id.clone();
        async move { (w.status(&id).await["length"].as_u64().unwrap() > 1 << 20).then_some(()) }
    })
    .await;
    s.kill();
    let acked = writer.await.unwrap();
    assert!(!acked.is_empty());
    let s2 = Server::start_on(tmp.path(), &storage, &replica);
    let w2 = s2.client(&token);
    // Same id after restart, and the stream continues.
    assert_eq!(w2.stream("stdout").await, id);
    let data = w2.data(&id).await;
    for &i in &acked {
        let a = i * 16_384;
        assert_eq!(
            &data[a..a + 16_384],
            &source[a..a + 16_384],
            "part {i} lost"
        );
    }
    let st = w2.status(&id).await;
    let end = st["end"].as_u64().unwrap() as usize;
    // Finish the stream from where it is.
    let mut at = st["length"].as_u64().unwrap() as usize;
    while at < source.len() {
        let n = 16_384.min(source.len() - at);
        w2.put_at(&id, at as u64, &source[at..at + n]).await;
        at += n;
    }
    assert!(end <= source.len());
    w2.finish(&id, source.len() as u64).await;
    assert_eq!(sha256(&w2.data(&id).await), sha256(&source));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_shared_storage_do_not_corrupt_a_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = format!("file://{}", tmp.path().join("streams").display());
    // A short writer window: each replica's first write it shares with the other waits a
    // quarter longer than it.
    let window = ["--writer-window", "300ms"];
    let a = Server::start_on(tmp.path(), &storage, &window);
    let b = Server::start_on(tmp.path(), &storage, &window);
    let token = a.token(CTX, Scope::Write);
    let (wa, wb) = (a.client(&token), b.client(&token));
    let id = wa.stream("stdout").await;
    assert_eq!(wb.stream("stdout").await, id);
    // Both replicas race to store different bytes over overlapping ranges, many times.
    let mut winners = Vec::new();
    for round in 0..40u64 {
        let base = round * 100;
        let (x, y) = (vec![b'a'; 60], vec![b'b'; 60]);
        let (range_a, range_b) = (
            format!("bytes {base}-{}/*", base + 59),
            format!("bytes {}-{}/*", base + 30, base + 89),
        );
        let ra = wa.patch(&id, &range_a, x);
        let rb = wb.patch(&id, &range_b, y);
        let (ra, rb) = tokio::join!(ra, rb);
        let (sa, sb) = (ra.status(), rb.status());
        assert!(
            !(sa == StatusCode::ACCEPTED && sb == StatusCode::ACCEPTED),
            "round {round}: both conflicting writes were acknowledged"
        );
        for st in [sa, sb] {
            assert!(
                matches!(st, StatusCode::ACCEPTED | StatusCode::CONFLICT),
                "{st}"
            );
        }
        winners.push((base, sa == StatusCode::ACCEPTED, sb == StatusCode::ACCEPTED));
    }
    // Let readers pass the gaps, then check what each replica reads back against the winners.
    let st = wa.status(&id).await;
    for gap in st["pending"].as_array().unwrap() {
        let (s, e) = (gap["start"].as_u64().unwrap(), gap["end"].as_u64().unwrap());
        let r = wa.mark(&id, &format!("bytes {s}-{}/*", e - 1)).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    for w in [&wa, &wb] {
        let text = w.ndjson_text(&format!("/logs/{id}/data")).await;
        let mut image = vec![0u8; 4000];
        for line in text.lines() {
            let rec: serde_json::Value = serde_json::from_str(line).unwrap();
            if rec["type"] == "data" {
                let off = rec["offset"].as_u64().unwrap() as usize;
                let data = rec["data"].as_str().unwrap().as_bytes();
                image[off..off + data.len()].copy_from_slice(data);
            }
        }
        for &(base, a_won, b_won) in &winners {
            let base = base as usize;
            if a_won {
                assert!(
                    image[base..base + 60].iter().all(|&c| c == b'a'),
                    "round at {base}"
                );
            }
            if b_won {
                assert!(
                    image[base + 30..base + 90].iter().all(|&c| c == b'b'),
                    "round at {base}"
                );
            }
            if !a_won && !b_won {
                assert!(
                    image[base..base + 90].iter().all(|&c| c == 0),
                    "round at {base}: unacknowledged bytes kept"
                );
            }
        }
    }
}

#[tokio::test]
async fn step_follower_picks_up_container_streams_created_after_it_began() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let c = s.client(&s.token("workflows", Scope::Collector));
    let rd = s.client(&s.token("workflows/w1", Scope::Read));
    // The reader comes first: nothing exists yet for the step.
    let resp = rd
        .req(Method::GET, &format!("/api/{CTX}/logs?follow=true"))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    // Then the step's container starts: the entrypoint writes its stdout, and the collector a
    // sidecar's that no entrypoint wraps.
    let build: serde_json::Value = w
        .create(serde_json::json!({"name": "build.stdout"}))
        .await
        .json()
        .await
        .unwrap();
    let build = build["id"].as_str().unwrap().to_owned();
    let side: serde_json::Value = c
        .create(serde_json::json!({"name": "sidecar.stdout", "source": "ebpf", "context": CTX}))
        .await
        .json()
        .await
        .unwrap();
    let side = side["id"].as_str().unwrap().to_owned();
    w.put_at(&build, 0, b"compiling\n").await;
    c.put_at(&side, 0, b"proxy up\n").await;
    w.finish(&build, 10).await;
    c.finish(&side, 9).await;
    // The follower ends by itself once both are complete.
    let mut text = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = body.next().await {
            text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        }
    })
    .await;
    assert!(ended.is_ok(), "follower did not end: {text}");
    let mut recs: Vec<(String, String, String)> = text
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                r["stream"].as_str().unwrap().to_owned(),
                r["source"].as_str().unwrap().to_owned(),
                r["data"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    recs.sort();
    assert_eq!(
        recs,
        [
            (
                "build.stdout".into(),
                "entrypoint".into(),
                "compiling\n".into()
            ),
            ("sidecar.stdout".into(), "ebpf".into(), "proxy up\n".into()),
        ],
        "{text}"
    );
}

#[tokio::test]
async fn a_step_whose_entrypoint_died_with_bytes_in_flight_reads_whole_and_its_follower_returns() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let c = s.client(&s.token("workflows", Scope::Collector));
    let rd = s.client(&s.token("workflows/w1", Scope::Read));
    let content = b"0123456789abcdefghijklmnopqrstuvwxyzABCD";
    // The entrypoint stored its first and third batches; the second was in flight when the
    // container was killed, and nobody will ever declare its final length.
    let entry = w.stream("build.stdout").await;
    w.put_at(&entry, 0, &content[..10]).await;
    w.put_at(&entry, 30, &content[30..]).await;
    let resp = rd
        .req(Method::GET, &format!("/api/{CTX}/logs?follow=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    while got.len() < 10 {
        got.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    // The follower waits at the gap; the collector's stream of the same output completes.
    let ebpf = c.ebpf_stream("build.stdout", CTX).await;
    c.put_at(&ebpf, 0, content).await;
    c.finish(&ebpf, content.len() as u64).await;
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = body.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
    })
    .await;
    assert!(
        rest.is_ok(),
        "the follower did not return: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        got, content,
        "the gap is filled from the collector's stream"
    );
    // A read now returns it all at once too.
    let whole = rd
        .req(Method::GET, &format!("/api/{CTX}/logs"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&whole[..], content);
}

#[tokio::test]
async fn the_collector_settles_the_stream_of_an_entrypoint_that_died_with_its_container() {
    let s = Server::start(&[]);
    let w = s.client(&s.token(CTX, Scope::Write));
    let c = s.client(&s.token("workflows", Scope::Collector));
    let rd = s.client(&s.token("workflows/w1", Scope::Read));
    let content = b"0123456789abcdefghijklmnopqrstuvwxyzABCD";
    let entry = w.stream("build.stdout").await;
    w.put_at(&entry, 0, &content[..10]).await;
    w.put_at(&entry, 30, &content[30..35]).await;
    let ebpf = c.ebpf_stream("build.stdout", CTX).await;
    let settle = |id: String| {
        let c = c.clone();
        async move {
            c.req(Method::POST, &format!("/logs/{id}/settle"))
                .send()
                .await
                .unwrap()
        }
    };
    // Only a complete ebpf stream, and only the collector, can say its container is gone.
    assert_eq!(settle(ebpf.clone()).await.status(), StatusCode::CONFLICT);
    let by_writer = w
        .req(Method::POST, &format!("/logs/{entry}/settle"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_writer.status(), StatusCode::FORBIDDEN);
    c.put_at(&ebpf, 0, content).await;
    c.finish(&ebpf, content.len() as u64).await;
    let resp = settle(ebpf.clone()).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["settling"], serde_json::json!([entry]));

    let started = std::time::Instant::now();
    let status = common::eventually(
        Duration::from_secs(10),
        "the entrypoint stream settles",
        || {
            let w = w.clone();
            let entry = entry.clone();
            async move {
                let st = w.status(&entry).await;
                (st["complete"] == true).then_some(st)
            }
        },
    )
    .await;
    println!("settled {:?} after the collector's call", started.elapsed());
    assert_eq!(status["final_length"], content.len() as u64, "{status}");
    assert_eq!(status["writer_died_at"], 10, "{status}");
    assert_eq!(
        status["dropped"],
        serde_json::json!([
            {"start": 10, "end": 30, "reason": "writer-died"},
            {"start": 35, "end": 40, "reason": "writer-died"}
        ]),
        "{status}"
    );
    // The report says what happened, and the merged read holds every byte.
    let report: serde_json::Value = rd
        .req(Method::GET, &format!("/api/{CTX}/logs/capture-report"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = report.to_string();
    assert!(
        text.contains("the entrypoint writer died at offset 10"),
        "{report:#}"
    );
    let whole = rd
        .req(Method::GET, &format!("/api/{CTX}/logs"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&whole[..], content);
    // Settling again changes nothing.
    assert_eq!(settle(ebpf).await.status(), StatusCode::OK);
}
