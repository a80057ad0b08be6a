//! A collector that stops (SIGTERM) or crashes (SIGKILL) mid-stream, with its programs and maps
//! pinned: capture goes on in the kernel, the next run continues every stream at its kernel
//! offsets, and what nobody could keep is a dropped range, never a silent gap or a shift.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    thread::JoinHandle,
    time::Duration,
};

use common::*;
use testbed::api::{assert_accounted, spans, wait_for};

/// Writes `data<i>` from a control directory to stdout once `go<i>` appears there (one write per
/// 64 KiB), and creates `done<i>` after each.
const WRITER: &str = r#"
import os, sys, time
ctl, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    while not os.path.exists(f"{ctl}/go{i}"):
        time.sleep(0.005)
    view = memoryview(open(f"{ctl}/data{i}", "rb").read())
    while view:
        view = view[os.write(1, view[:65536]):]
    open(f"{ctl}/done{i}", "w").close()
"#;

/// A BPF filesystem of the test's own (each mount is a separate instance), unmounted on drop:
/// that unpins everything in it, which detaches the programs and frees the maps.
struct Pins {
    mount: tempfile::TempDir,
    dir: String,
}

impl Pins {
    fn new() -> Self {
        let mount = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(mount.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t bpf");
        let dir = mount.path().join("relay-collector").display().to_string();
        Self { mount, dir }
    }

    fn arg(&self) -> &str {
        &self.dir
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mount.path()).status();
    }
}

/// The workload: phases of random bytes written on cue from inside a cgroup, its stdout a pipe
/// read to the end.
struct Writer {
    ctl: tempfile::TempDir,
    child: Child,
    out: Option<JoinHandle<Vec<u8>>>,
    phases: Vec<Vec<u8>>,
}

impl Writer {
    fn start(dir: &Path, sizes: &[usize]) -> Self {
        let ctl = tempfile::tempdir().unwrap();
        let phases: Vec<Vec<u8>> = sizes.iter().map(|&n| random(n)).collect();
        for (i, data) in phases.iter().enumerate() {
            std::fs::write(ctl.path().join(format!("data{i}")), data).unwrap();
        }
        let mut cmd = Cgroup::sh(dir, r#"exec python3 -c "$WRITER" "$@""#);
        cmd.env("WRITER", WRITER)
            .arg("sh")
            .arg(ctl.path())
            .arg(sizes.len().to_string())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let out = Some(slurp(child.stdout.take().unwrap()));
        Self {
            ctl,
            child,
            out,
            phases,
        }
    }

    /// Runs phase `i` to its end.
    fn phase(&self, i: usize) {
        std::fs::write(self.ctl.path().join(format!("go{i}")), "").unwrap();
        let done = self.ctl.path().join(format!("done{i}"));
        wait_for(
            Duration::from_secs(30),
            &format!("phase {i} written"),
            || done.exists(),
        );
    }

    /// Waits for the writer to exit; returns everything it wrote, checked against the phases.
    fn finish(mut self) -> Vec<u8> {
        assert!(self.child.wait().unwrap().success());
        let out = self.out.take().unwrap().join().unwrap();
        assert!(out == self.phases.concat(), "the pipe got what was written");
        out
    }
}

fn collector(api: &Api, cg: &Cgroup, pins: &Pins, ring: &str) -> Collector {
    Collector::start_with(
        collector_cmd(),
        api,
        &[(&cg.path, CTX)],
        &["--pin-dir", pins.arg(), "--ring-bytes", ring],
    )
}

/// Waits until the ebpf stream `stdout` has `n` bytes stored from offset 0.
fn wait_stored(api: &Api, n: u64) {
    wait_for(
        Duration::from_secs(30),
        &format!("{n} bytes stored"),
        || {
            let (status, _) = api.read_ebpf(CTX, "stdout");
            spans(&status, "stored")
                .first()
                .is_some_and(|&(a, b)| a == 0 && b >= n)
        },
    );
}

#[test]
fn a_killed_collector_is_taken_over_at_the_kernel_offsets_without_loss() {
    if !can_run() {
        return;
    }
    let pins = Pins::new();
    let api = Api::start(&[]);
    let cg = Cgroup::new("restart-kill");
    let mut first = collector(&api, &cg, &pins, "4M");
    let writer = Writer::start(&cg.path, &[300_000, 1_000_000, 200_000]);
    writer.phase(0);
    wait_stored(&api, 300_000);
    first.child.as_mut().unwrap().kill().unwrap();
    first.child.take().unwrap().wait().unwrap();
    // Nobody reads the ring now: the kernel keeps counting and keeps the bytes (they fit).
    writer.phase(1);
    let _second = collector(&api, &cg, &pins, "4M");
    writer.phase(2);
    let written = writer.finish();
    let (status, stored) = complete_ebpf(&api, CTX, "stdout");
    assert_eq!(status["final_length"], written.len() as u64, "{status}");
    assert_eq!(spans(&status, "dropped"), vec![], "nothing lost: {status}");
    assert!(stored == written, "byte-exact across the crash");
}

#[test]
fn a_stopped_collector_leaves_the_stream_open_and_what_overflowed_the_ring_is_dropped_exactly() {
    if !can_run() {
        return;
    }
    let pins = Pins::new();
    let api = Api::start(&[]);
    let cg = Cgroup::new("restart-term");
    let mut first = collector(&api, &cg, &pins, "256K");
    // The middle phase is four times the ring: most of it cannot wait for the next run.
    let writer = Writer::start(&cg.path, &[200_000, 1 << 20, 200_000]);
    writer.phase(0);
    wait_stored(&api, 200_000);
    assert_eq!(first.stop(), Some(0));
    let (status, _) = api.read_ebpf(CTX, "stdout");
    assert_eq!(
        status["complete"], false,
        "left open for the next run: {status}"
    );
    writer.phase(1);
    let _second = collector(&api, &cg, &pins, "256K");
    // Phase 2 must find the ring drained, or its first bytes overflow it too (this raced: the
    // second run had not read the ring yet). The reader empties the ring before shipping what it
    // took, so a byte of phase 1 stored means the ring was read.
    wait_stored(&api, 200_001);
    writer.phase(2);
    let written = writer.finish();
    let (status, stored) = complete_ebpf(&api, CTX, "stdout");
    assert_eq!(status["final_length"], written.len() as u64, "{status}");
    let dropped = assert_accounted(&status, &stored, &written);
    assert!(
        dropped > 0 && dropped < 1 << 20,
        "the ring kept some of phase 1 and lost the rest: {status}"
    );
    // Phases 0 and 2 are whole: the gap lies inside phase 1.
    assert_eq!(&stored[..200_000], &written[..200_000]);
    let tail = written.len() - 200_000;
    assert_eq!(&stored[stored.len() - 200_000..], &written[tail..]);
}

#[test]
fn without_a_bpf_filesystem_the_collector_runs_unpinned_and_says_why() {
    if !can_run() {
        return;
    }
    let api = Api::start(&[]);
    let cg = Cgroup::new("restart-nobpffs");
    let dir = tempfile::tempdir().unwrap();
    let pin_dir = dir.path().join("pins");
    let collector = Collector::start_logged(
        Command::new(env!("CARGO_BIN_EXE_collector")),
        &api,
        &[
            "--pin-dir",
            pin_dir.to_str().unwrap(),
            "--cgroup",
            &format!("{}={CTX}", cg.path.display()),
        ],
    );
    collector.wait_for_log(
        Duration::from_secs(10),
        &["Not pinning", "is not on a BPF filesystem"],
    );
    assert!(!pin_dir.exists(), "nothing made under the pin directory");
    // It captures all the same.
    let writer = Writer::start(&cg.path, &[50_000]);
    writer.phase(0);
    let written = writer.finish();
    let (_, stored) = complete_ebpf(&api, CTX, "stdout");
    assert!(stored == written);
}
