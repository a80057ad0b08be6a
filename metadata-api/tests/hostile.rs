//! A hostile tenant against the real binary over real sockets: each case measures a
//! well-behaved writer of another tenant (create a stream, append 1 KiB: p50, p99, ops/s) quiet
//! and then under the attack, in the same run, and checks that it is served in time and loses
//! nothing, and that the attack is refused or cut off as the limits say.
//!
//! The hostile client connects from 127.0.0.2, the writer from 127.0.0.1: two peers, as two pods
//! are. Each attack runs on a thread and runtime of its own, as another pod's process would: on the
//! writer's runtime, every turn of the attack loop delayed the writer's next request by itself,
//! which measured the test, not the server. That thread runs at nice 19: in a cluster the hostile
//! pod's CPU is its own cgroup's, not the API server's; on this 2-core machine the attack client's
//! own CPU (thousands of connects a second) would otherwise be measured as the server's delay.
//! What the server spends on the attack (accepting, refusing, cutting) stays in the measurement. Limits are lowered (`--max-connections-per-peer 100`, `--head-timeout 2s`) so that each
//! case is quick and stays far from this machine's own limits; the defaults only scale them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use metadata_api::auth::Scope;
use reqwest::StatusCode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

/// Where the hostile tenant connects from.
const HOSTILE: [u8; 4] = [127, 0, 0, 2];
const LIMITS: [&str; 6] = [
    "--max-connections",
    "1000",
    "--max-connections-per-peer",
    "100",
    "--head-timeout",
    "2s",
];
/// The writer's operations per measurement: enough that its p99 is not simply the slowest.
const OPS: usize = 100;

/// Latencies of the well-behaved writer.
struct Latency {
    p50: Duration,
    p99: Duration,
    ops_per_s: f64,
}

/// `OPS` times: create a stream of another tenant and append 1 KiB to it; every one must
/// succeed.
async fn measure(server: &Server, tag: &str) -> Latency {
    let api = server.client(&server.token("workflows/quiet/runs/r1/steps/s1", Scope::Write));
    let data = bytes(7, 1024);
    let mut took = Vec::with_capacity(OPS);
    let start = Instant::now();
    for i in 0..OPS {
        let t = Instant::now();
        let id = api.stream(&format!("{tag}-{i}")).await;
        api.put_at(&id, 0, &data).await;
        took.push(t.elapsed());
    }
    let all = start.elapsed();
    took.sort();
    let at = |q: f64| took[((took.len() as f64 - 1.0) * q).round() as usize];
    Latency {
        p50: at(0.5),
        p99: at(0.99),
        ops_per_s: OPS as f64 / all.as_secs_f64(),
    }
}

/// Prints the case's row and checks the writer kept its p99 within twice the quiet one, or
/// within 50 ms of it: the quiet p99 is ~10 ms here, and on a 2-core machine whose other core
/// runs the attack, one scheduler hiccup is worth more than that. What the limits prevent shows
/// as seconds (the writer timed out after 5 s).
fn report(case: &str, quiet: &Latency, hostile: &Latency) {
    println!(
        "| {case} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.0} / {:.0} ops/s |",
        ms(quiet.p50),
        ms(quiet.p99),
        ms(hostile.p50),
        ms(hostile.p99),
        quiet.ops_per_s,
        hostile.ops_per_s,
    );
    let allowed = (quiet.p99 * 2).max(quiet.p99 + Duration::from_millis(50));
    assert!(
        hostile.p99 <= allowed,
        "{case}: the writer's p99 went from {:?} to {:?}",
        quiet.p99,
        hostile.p99
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `attack` on a thread and runtime of its own; the handle's result is awaited with
/// [`joined`].
fn attack<T: Send + 'static>(
    attack: impl Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        // `renice` of this thread's id lowers this thread alone (Linux priorities are per thread).
        let me = std::fs::read_link("/proc/thread-self").unwrap();
        let tid = me.file_name().unwrap().to_str().unwrap().to_owned();
        let reniced = std::process::Command::new("renice")
            .args(["-n", "19", "-p", &tid])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("renice (util-linux) runs");
        assert!(reniced.success(), "renice of the attack thread failed");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(attack)
    })
}

async fn joined<T: Send + 'static>(h: std::thread::JoinHandle<T>) -> T {
    tokio::task::spawn_blocking(move || h.join().unwrap())
        .await
        .unwrap()
}

/// A connection from the hostile peer.
async fn hostile_connect(to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((HOSTILE, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

fn addr(server: &Server) -> SocketAddr {
    server.url.trim_start_matches("http://").parse().unwrap()
}

/// What the server sent before closing, or `None` if it is still open after `wait`.
async fn answer(conn: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + wait;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Open files of process `pid` now.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn a_connection_flood_from_one_peer_leaves_other_tenants_served() {
    let server = Server::process(&LIMITS);
    let quiet = measure(&server, "quiet").await;
    // 500 connections held open, each with a request head that never ends (as in the issue),
    // reopened as the server refuses or closes them, for as long as the writer is measured.
    let stop = Arc::new(AtomicBool::new(false));
    let (to, pid, halt) = (addr(&server), server.pid(), Arc::clone(&stop));
    let flood = attack(async move {
        let (mut refused, mut cut, mut most_files) = (0usize, 0usize, 0usize);
        let mut conns = Vec::new();
        while !halt.load(Ordering::Acquire) {
            while conns.len() < 500 {
                let mut c = hostile_connect(to).await;
                c.write_all(b"POST /logs HTTP/1.1\r\nhost: x\r\n")
                    .await
                    .unwrap();
                conns.push(c);
            }
            let mut buf = [0u8; 512];
            let mut i = 0;
            while i < conns.len() {
                match conns[i].try_read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => i += 1,
                    Ok(n) if n > 0 => {
                        let a = String::from_utf8_lossy(&buf[..n]);
                        assert!(a.starts_with("HTTP/1.1 429"), "{a:?}");
                        assert!(a.contains("retry-after: 1"), "{a:?}");
                        refused += 1;
                        conns.swap_remove(i);
                    }
                    // Closed without an answer: an admitted head cut at its deadline, or a
                    // refusal past the number written at once.
                    _ => {
                        cut += 1;
                        conns.swap_remove(i);
                    }
                }
            }
            most_files = most_files.max(open_files(pid));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (refused, cut, most_files)
    });
    let writer = async {
        // Let the flood reach its size first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let l = measure(&server, "flood").await;
        // Long enough for admitted heads to meet their deadline (2 s).
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Release);
        l
    };
    let under = writer.await;
    let (refused, cut, most_files) = joined(flood).await;
    report("connection flood, 500 partial heads", &quiet, &under);
    println!(
        "flood: {refused} refused with 429, {cut} closed without an answer, at most \
         {most_files} files open"
    );
    assert!(refused >= 400, "only {refused} refused");
    // Far below the open-files limit: the 100 admitted, the refusals being written (at most
    // 256 at a time) and a few of the writer's and the store's; not one per connection tried.
    assert!(most_files < 450, "{most_files} open files");
    assert!(
        server
            .metric("relay_metadata_api_connections_refused_total")
            .await as usize
            >= refused
    );
    // Once the flood is over, partial heads are admitted again and closed at their deadline
    // (2 s), unanswered.
    let start = Instant::now();
    let mut heads = Vec::new();
    for _ in 0..20 {
        let mut c = hostile_connect(addr(&server)).await;
        c.write_all(b"POST /logs HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        heads.push(c);
    }
    for c in &mut heads {
        let a = answer(c, Duration::from_secs(5)).await;
        assert_eq!(
            a.as_deref(),
            Some(""),
            "a partial head was answered or kept"
        );
    }
    let took = start.elapsed();
    println!("20 partial heads closed {took:?} after they were sent");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[tokio::test]
async fn slow_heads_and_slow_bodies_are_cut_at_their_deadlines() {
    let server = Server::process(&LIMITS);
    let quiet = measure(&server, "quiet").await;
    let api = server.client(&server.token(CTX, Scope::Write));
    let id = api.stream("slow").await;
    let token = server.token(CTX, Scope::Write);
    let (to, stream, bearer) = (addr(&server), id.clone(), token.clone());
    let dribble = attack(async move {
        // Slow heads: a byte every 100 ms, for ever.
        let mut slow_heads = Vec::new();
        for _ in 0..50 {
            slow_heads.push(hostile_connect(to).await);
        }
        // A slow body: 100,000 bytes declared, 10 bytes a second sent (the deadline is 2 s +
        // 100,000 bytes at 64 KiB/s, about 3.5 s).
        let mut slow_body = hostile_connect(to).await;
        let head = format!(
            "PATCH /logs/{stream}/data HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {bearer}\r\n\
             content-range: bytes 0-99999/*\r\ncontent-length: 100000\r\n\r\n"
        );
        slow_body.write_all(head.as_bytes()).await.unwrap();
        let start = Instant::now();
        let mut ended = vec![None; slow_heads.len()];
        let mut body_answer = None;
        while start.elapsed() < Duration::from_secs(8)
            && (ended.iter().any(Option::is_none) || body_answer.is_none())
        {
            for (c, end) in slow_heads.iter_mut().zip(&mut ended) {
                if end.is_none() && c.write_all(b"x").await.is_err() {
                    *end = Some(start.elapsed());
                }
            }
            if body_answer.is_none() {
                let _ = slow_body.write_all(b"0123456789").await;
                if let Some(a) = answer(&mut slow_body, Duration::from_millis(1)).await {
                    body_answer = Some((a, start.elapsed()));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (ended, body_answer)
    });
    let writer = measure(&server, "slow").await;
    let (ended, body_answer) = joined(dribble).await;
    report("50 slow heads and a slow body", &quiet, &writer);
    for end in &ended {
        let end = end.expect("a slow head was never cut");
        assert!(end < Duration::from_secs(4), "a slow head lasted {end:?}");
    }
    let (cut, after) = body_answer.expect("the slow body was never cut");
    assert!(cut.starts_with("HTTP/1.1 408"), "{cut:?}");
    assert!(
        after < Duration::from_secs(6),
        "the slow body lasted {after:?}"
    );
    // Nothing of it was stored.
    assert_eq!(api.status(&id).await["length"], 0);
    // A slow upload that keeps above the minimum rate goes through: 256 KiB in 20 KiB pieces
    // every 100 ms (~200 KiB/s, 1.3 s in all; its deadline is 2 s + 256 KiB at 64 KiB/s = 6 s).
    let data = bytes(3, 256 << 10);
    let mut c = TcpStream::connect(addr(&server)).await.unwrap();
    let head = format!(
        "PATCH /logs/{id}/data HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         content-range: bytes 0-{}/*\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        data.len() - 1,
        data.len()
    );
    c.write_all(head.as_bytes()).await.unwrap();
    for piece in data.chunks(20 << 10) {
        c.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = answer(&mut c, Duration::from_secs(5)).await.unwrap();
    assert!(a.starts_with("HTTP/1.1 202"), "{a:?}");
    assert_eq!(api.data(&id).await, data);
}

#[tokio::test]
async fn oversized_and_malformed_heads_are_refused_without_harm() {
    let server = Server::process(&LIMITS);
    let quiet = measure(&server, "quiet").await;
    let to = addr(&server);
    let heads = attack(async move {
        let mut answers = Vec::new();
        for i in 0..60 {
            let mut c = hostile_connect(to).await;
            let head: Vec<u8> = match i % 3 {
                // A 1 MiB header line.
                0 => [
                    b"GET /logs/x HTTP/1.1\r\nx-big: ".as_slice(),
                    &vec![b'a'; 1 << 20],
                    b"\r\n\r\n",
                ]
                .concat(),
                // Five hundred headers.
                1 => {
                    let mut h = b"GET /logs/x HTTP/1.1\r\n".to_vec();
                    for n in 0..500 {
                        h.extend_from_slice(format!("x-{n}: y\r\n").as_bytes());
                    }
                    h.extend_from_slice(b"\r\n");
                    h
                }
                // Not HTTP.
                _ => b"\x00\x01\x02 GARBAGE\r\n\r\n".to_vec(),
            };
            let _ = c.write_all(&head).await;
            answers.push(answer(&mut c, Duration::from_secs(5)).await);
        }
        answers
    });
    let writer = measure(&server, "heads").await;
    let answers = joined(heads).await;
    report("60 oversized or malformed heads", &quiet, &writer);
    for a in answers {
        let a = a.expect("a bad head was left open");
        // A 4xx, or closed at once when the head overflowed the buffer before parsing.
        assert!(a.is_empty() || a.starts_with("HTTP/1.1 4"), "{a:?}");
    }
}

#[tokio::test]
async fn a_writer_ignoring_retry_after_is_refused_without_its_body_being_read() {
    let server = Server::process(&["--stream-rate", "4K"]);
    let token = server.token(CTX, Scope::Write);
    let api = server.client(&token);
    let id = api.stream("impatient").await;
    let chunk = bytes(5, 4096);
    api.put_at(&id, 0, &chunk).await;
    let r = api.patch(&id, "bytes 4096-8191/*", chunk.clone()).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait >= 1);
    // Back at once, again and again: the first 8 are let through as possibly on their way (and
    // refused by the budget), then the rest are refused for coming back early.
    let mut reasons = Vec::new();
    for _ in 0..10 {
        let r = api.patch(&id, "bytes 4096-8191/*", chunk.clone()).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        let body: serde_json::Value = r.json().await.unwrap();
        reasons.push(body["message"].as_str().unwrap().to_owned());
    }
    assert!(
        reasons[..8].iter().all(|m| m.contains("stream_rate")),
        "{reasons:?}"
    );
    assert!(
        reasons[8..].iter().all(|m| m.contains("retry_after")),
        "{reasons:?}"
    );
    // Once more, with a head that declares a megabyte and no body at all: the answer comes
    // without the server waiting for the body.
    let mut c = TcpStream::connect(addr(&server)).await.unwrap();
    let head = format!(
        "PATCH /logs/{id}/data HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         content-range: bytes 4096-1052671/*\r\ncontent-length: 1048576\r\n\r\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let start = Instant::now();
    let a = answer(&mut c, Duration::from_secs(1)).await;
    let a = match a {
        Some(a) => a,
        None => {
            // The answer may be sent with the connection left open: read what is there.
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf))
                .await
                .map_or(0, |r| r.unwrap_or(0));
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
    };
    assert!(a.starts_with("HTTP/1.1 429"), "{a:?}");
    assert!(a.contains("retry_after"), "{a:?}");
    assert!(start.elapsed() < Duration::from_millis(500));
    assert_eq!(api.status(&id).await["length"], 4096);
    assert!(
        server
            .metric("relay_metadata_api_throttled_requests_total{reason=\"retry_after\"}")
            .await
            >= 1.0
    );
    // After the time it was given, the writer is served.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    api.put_at(&id, 4096, &chunk).await;
}

#[tokio::test]
async fn a_tenant_at_ten_times_its_budget_leaves_the_others_theirs() {
    // 1 MiB/s per tenant, 3 MiB/s for the service: the loud tenant offers ten times its share
    // over ten streams, which without a tenant budget would take the whole service's.
    let server = Server::process(&[
        "--tenant-rate",
        "1M",
        "--stream-rate",
        "1M",
        "--global-rate",
        "3M",
    ]);
    let quiet = measure(&server, "quiet").await;
    let stop = Arc::new(AtomicBool::new(false));
    let loud = server.client(&server.token("workflows/loud/runs/r1/steps/s1", Scope::Write));
    let piece = bytes(9, 64 << 10);
    let writers = (0..10).map(|i| {
        let (loud, piece, stop) = (loud.clone(), piece.clone(), Arc::clone(&stop));
        async move {
            let id = loud.stream(&format!("loud-{i}")).await;
            let (mut offset, mut refused) = (0u64, 0u32);
            let start = Instant::now();
            while !stop.load(Ordering::Acquire) {
                let end = offset + piece.len() as u64 - 1;
                let r = loud
                    .patch(&id, &format!("bytes {offset}-{end}/*"), piece.clone())
                    .await;
                match r.status() {
                    StatusCode::ACCEPTED => offset = end + 1,
                    StatusCode::TOO_MANY_REQUESTS => {
                        refused += 1;
                        // Ten times its share: back far sooner than it is told.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("loud writer got {other}"),
                }
            }
            (offset, refused, start.elapsed())
        }
    });
    let loud = attack(futures::future::join_all(writers.collect::<Vec<_>>()));
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let under = measure(&server, "loud").await;
    // Three seconds of the loud tenant at least, for its rate to show.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(start.elapsed())).await;
    stop.store(true, Ordering::Release);
    let loud = joined(loud).await;
    report("a tenant at 10x its budget", &quiet, &under);
    let stored: u64 = loud.iter().map(|l| l.0).sum();
    let refused: u32 = loud.iter().map(|l| l.1).sum();
    let secs = loud.iter().map(|l| l.2).max().unwrap().as_secs_f64();
    println!(
        "loud tenant: {:.2} MiB/s stored over {secs:.1} s, {refused} requests refused",
        stored as f64 / secs / f64::from(1 << 20)
    );
    // Its own budget (1 MiB/s, plus the one second's burst each bucket starts with).
    assert!(
        (stored as f64) < (secs + 2.0) * f64::from(1 << 20),
        "the loud tenant stored {stored} bytes in {secs} s"
    );
    assert!(refused > 0);
}
