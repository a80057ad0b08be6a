//! A ring buffer too small for the writer: exact dropped ranges, everything else byte-exact, and
//! the writer never waits for the collector.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn a_full_ring_loses_exact_ranges_and_never_blocks_the_writer() {
    if !can_run() {
        return;
    }
    let api = Api::start(&[]);
    let cg = Cgroup::new("overflow");
    // 64 KiB of ring (four 16 KiB chunks) and a reader that only looks every 200 ms.
    let collector = Collector::start_with(
        collector_cmd(),
        &api,
        &[(&cg.path, CTX)],
        &["--ring-bytes", "64K", "--ring-poll", "200ms"],
    );
    let files = tempfile::tempdir().unwrap();
    let data = random(32 << 20);
    let path = files.path().join("data");
    std::fs::write(&path, &data).unwrap();
    let (code, out, err) = run_piped(Cgroup::sh(
        &cg.path,
        &format!("exec cat {}", path.display()),
    ));
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert!(out == data);

    let (status, stored) = complete_ebpf(&api, CTX, "stdout");
    let dropped = assert_accounted(&status, &stored, &data);
    assert!(
        dropped > 0,
        "the ring never overflowed; the test proves nothing: {status}"
    );
    // Every dropped byte is one the kernel counted as lost (none were lost in user space).
    assert_eq!(collector.metric("kernel_lost_bytes_total"), dropped);
    assert_eq!(collector.metric("unreported_bytes_total"), 0);
}

#[test]
fn a_stream_whose_every_chunk_was_lost_is_still_reported_in_full() {
    if !can_run() {
        return;
    }
    let api = Api::start(&[]);
    let cg = Cgroup::new("all-lost");
    // One page of ring: no 16 KiB chunk ever fits, so user space sees nothing of this stream.
    let collector = Collector::start_with(
        collector_cmd(),
        &api,
        &[(&cg.path, CTX)],
        &["--ring-bytes", "4K"],
    );
    let files = tempfile::tempdir().unwrap();
    let data = random(1 << 20);
    let path = files.path().join("data");
    std::fs::write(&path, &data).unwrap();
    let (code, out, _) = run_piped(Cgroup::sh(
        &cg.path,
        &format!("exec cat {}", path.display()),
    ));
    assert_eq!(code, 0);
    assert!(out == data);

    let (status, stored) = complete_ebpf(&api, CTX, "stdout");
    assert!(stored.is_empty(), "{status}");
    assert_eq!(
        spans(&status, "dropped"),
        vec![(0, data.len() as u64)],
        "{status}"
    );
    assert_eq!(
        collector.metric("kernel_lost_bytes_total"),
        data.len() as u64
    );
}
