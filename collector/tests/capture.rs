//! Byte-exact capture through the real kernel, the real collector and the real metadata API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{path::Path, process::Command};

use common::*;

/// Writes files to fds as the arguments say: `FD:write:PATH` (one write(2) per call, looping
/// only on partial writes) or `FD:writev:PATH` (one writev(2) of four parts, one empty).
const WRITER: &str = r#"
import os, sys
for item in sys.argv[1:]:
    fd, op, path = item.split(":", 2)
    fd = int(fd)
    data = open(path, "rb").read()
    if op == "write":
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    else:
        third = max(1, len(data) // 3)
        parts = [data[:third], b"", data[third:2 * third], data[2 * third:]]
        assert os.writev(fd, parts) == len(data)
"#;

/// A command that moves itself into `dir` and runs the writer with `plan`.
fn writer(dir: &Path, plan: &[String]) -> Command {
    let mut c = Cgroup::sh(dir, r#"exec python3 -c "$WRITER" "$@""#);
    c.env("WRITER", WRITER).arg("sh").args(plan);
    c
}

#[test]
fn writes_of_every_size_and_writev_are_captured_byte_exact_stdout_and_stderr_apart() {
    if !can_run() {
        return;
    }
    let api = Api::start(&[]);
    let cg = Cgroup::new("sizes");
    // Room for all of it (a 16 MiB write lands in the ring at once): this test is about
    // capture, not about a full ring or a slow API (see overflow.rs).
    let collector = Collector::start_with(
        collector_cmd(),
        &api,
        &[(&cg.path, CTX)],
        &["--buffer-limit", "64M", "--ring-bytes", "64M"],
    );
    let files = tempfile::tempdir().unwrap();
    let mut plan = Vec::new();
    let (mut want_out, mut want_err) = (Vec::new(), Vec::new());
    for (i, size) in [1usize, 4096, 65536, 1 << 20, 16 << 20]
        .into_iter()
        .enumerate()
    {
        for (fd, want) in [(1, &mut want_out), (2, &mut want_err)] {
            // stderr gets different sizes, so the two streams cannot be mixed up unnoticed.
            let n = if fd == 1 { size } else { size / 2 + 3 };
            let data = random(n);
            let path = files.path().join(format!("{fd}-{i}"));
            std::fs::write(&path, &data).unwrap();
            plan.push(format!("{fd}:write:{}", path.display()));
            want.extend_from_slice(&data);
        }
    }
    let vec = random(300_001);
    let path = files.path().join("vec");
    std::fs::write(&path, &vec).unwrap();
    plan.push(format!("1:writev:{}", path.display()));
    want_out.extend_from_slice(&vec);

    let (code, out, err) = run_piped(writer(&cg.path, &plan));
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert!(
        out == want_out && err == want_err,
        "the writer wrote what it was told"
    );

    for (name, want) in [("stdout", &want_out), ("stderr", &want_err)] {
        let (status, data) = complete_ebpf(&api, CTX, name);
        assert_eq!(
            status["final_length"],
            want.len() as u64,
            "{name}: {status}"
        );
        assert_eq!(spans(&status, "dropped"), vec![], "{name}: {status}");
        assert_eq!(
            sha256(&data),
            sha256(want),
            "{name} differs from what was written"
        );
    }
    assert_eq!(collector.metric("kernel_lost_bytes_total"), 0);
    assert_eq!(
        collector.metric("captured_bytes_total") - collector.metric("other_pipe_bytes_total"),
        (want_out.len() + want_err.len()) as u64
    );
}

#[test]
fn partial_non_blocking_writes_are_recorded_exactly_and_files_and_outsiders_are_not() {
    if !can_run() {
        return;
    }
    let api = Api::start(&[]);
    let cg = Cgroup::new("partial");
    let collector = Collector::start_with(collector_cmd(), &api, &[(&cg.path, CTX)], &[]);
    let files = tempfile::tempdir().unwrap();
    let own_file = files.path().join("own-file");
    // 8 MiB in 1 MiB writes to a non-blocking pipe: most return short or EAGAIN. The same
    // process also writes 1 MiB to a file it opened (fd 1 redirected there for a moment).
    let script = format!(
        r#"
import os, fcntl, select, sys
data = os.urandom(8 << 20)
fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_NONBLOCK)
view, partial = memoryview(data), 0
while view:
    try:
        n = os.write(1, view[:1 << 20])
    except BlockingIOError:
        select.select([], [1], [])
        continue
    partial += n < min(len(view), 1 << 20)
    view = view[n:]
saved = os.dup(1)
f = os.open("{}", os.O_WRONLY | os.O_CREAT, 0o644)
os.dup2(f, 1)
os.write(1, os.urandom(1 << 20))
os.dup2(saved, 1)
os.write(2, b"partial=%d\n" % partial)
"#,
        own_file.display()
    );
    let mut cmd = Cgroup::sh(&cg.path, r#"exec python3 -c "$SCRIPT""#);
    cmd.env("SCRIPT", script);
    // A process outside the watched cgroup writes to a pipe at the same time.
    let outsider = std::thread::spawn(|| {
        run_piped({
            let mut c = Command::new("python3");
            c.args([
                "-c",
                "import os\nfor _ in range(64): os.write(1, os.urandom(65536))",
            ]);
            c
        })
    });
    let (code, out, err) = run_piped(cmd);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    let partial: u64 = String::from_utf8_lossy(&err)
        .trim()
        .strip_prefix("partial=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(partial > 0, "no write was partial; the test proves nothing");
    assert_eq!(outsider.join().unwrap().1.len(), 64 * 65536);
    assert_eq!(std::fs::metadata(&own_file).unwrap().len(), 1 << 20);

    let (status, data) = complete_ebpf(&api, CTX, "stdout");
    assert_eq!(status["final_length"], out.len() as u64, "{status}");
    assert_eq!(
        sha256(&data),
        sha256(&out),
        "stdout differs from what the pipe carried"
    );
    let (_, stderr) = complete_ebpf(&api, CTX, "stderr");
    assert_eq!(stderr, err);
    // Nothing else: not the file, not the outsider. Pipes inside the cgroup (pyenv's shim
    // runs `$(...)` subshells) are captured until user space tells the kernel to ignore them.
    assert_eq!(
        collector.metric("captured_bytes_total") - collector.metric("other_pipe_bytes_total"),
        (out.len() + err.len()) as u64,
    );
}

#[test]
fn the_collector_never_captures_itself() {
    if !can_run() {
        return;
    }
    let api = Api::start(&[]);
    let cg = Cgroup::new("self");
    let job = cg.child("job");
    // The collector runs inside the cgroup it watches, logging at debug level to a pipe.
    let mut cmd = Cgroup::sh(&cg.path, r#"exec "$0" "$@""#);
    cmd.arg(env!("CARGO_BIN_EXE_collector"));
    let mut collector = Collector::start_with(cmd, &api, &[(&cg.path, CTX)], &[]);
    let (code, out, _) = run_piped(Cgroup::sh(&job, "echo from-the-job"));
    assert_eq!(code, 0);
    let (_, data) = complete_ebpf(&api, CTX, "job.stdout");
    assert_eq!(data, out);
    // The collector logged "Stream finished" on its stderr (a pipe, in a watched cgroup).
    assert_eq!(
        collector.metric("captured_bytes_total") - collector.metric("other_pipe_bytes_total"),
        out.len() as u64
    );
    assert_eq!(collector.stop(), Some(0));
}

/// What a fresh machine and the DaemonSet's container look like: no tracefs, no debugfs. The
/// collector runs in a mount namespace of its own where both are unmounted (wherever the host
/// has them), and still attaches and captures byte-exact.
#[test]
fn the_collector_attaches_and_captures_without_tracefs_or_debugfs() {
    if !can_run() {
        return;
    }
    let api = Api::start(&[]);
    let cg = Cgroup::new("no-tracefs");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            r#"for m in $(awk '$3 == "tracefs" || $3 == "debugfs" {print $2}' /proc/self/mounts | sort -r); do
                 umount -l "$m" || exit 97
               done
               if awk '$3 == "tracefs" || $3 == "debugfs"' /proc/self/mounts | grep -q .; then exit 98; fi
               exec "$0" "$@""#,
        )
        .arg(env!("CARGO_BIN_EXE_collector"));
    let mut collector = Collector::start_with(cmd, &api, &[(&cg.path, CTX)], &[]);
    let (code, out, err) = run_piped(Cgroup::sh(
        &cg.path,
        "i=0; while [ $i -lt 2000 ]; do echo \"line $i\"; i=$((i+1)); done; echo oops >&2",
    ));
    assert_eq!(code, 0);
    for (name, want) in [("stdout", &out), ("stderr", &err)] {
        let (status, data) = complete_ebpf(&api, CTX, name);
        assert_eq!(spans(&status, "dropped"), vec![], "{name}: {status}");
        assert_eq!(&data, want, "{name} differs from what was written");
    }
    assert_eq!(
        out.len(),
        (0..2000)
            .map(|i| format!("line {i}\n").len())
            .sum::<usize>()
    );
    assert_eq!(collector.stop(), Some(0));
}
