//! A corpus of workload shapes: the ways real programs put bytes into their stdout and stderr
//! (fds other than 1 and 2, reopened and symlinked files, every syscall that can fill a pipe,
//! shells, pipelines, threads, daemons), each run in a cgroup of its own under the real
//! collector, with its stdout and stderr the pipes of the test (as a container's are the pipes of
//! its runtime). Every shape must come back byte-exact on the `ebpf` path, or, where the kernel
//! moved the bytes from another file (`sendfile`, `splice`, `tee`), exactly accounted: the
//! stream's length is what the pipe carried, the stored bytes sit at their offsets, and the
//! dropped ranges are exactly the bytes those syscalls moved.
//!
//! Every hole found later gets a shape here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::BTreeMap, path::Path, process::Command};

use common::*;

/// A workload: a script for `sh` (busybox's, as a busybox image runs it) or for `python3` (as
/// the official Python images run it), and how many of its stdout bytes the kernel moves from
/// another file.
struct Shape {
    name: &'static str,
    program: Program,
    script: String,
    /// Bytes of stdout moved by `sendfile`, `splice` or `tee`: reported as dropped.
    uncopied: u64,
    /// Concurrent writers: the stream holds exactly the lines the pipe carried, but two writes
    /// racing on two CPUs may be stored in the other order (offsets are taken when a write
    /// returns, not when it enters the pipe).
    racing: bool,
}

enum Program {
    Busybox,
    Python,
    /// Python on a terminal (`tty: true`): stdout and stderr are one pseudo-terminal, which
    /// `pty.spawn` of the test's own Python reads (its line discipline turns `\n` into `\r\n`
    /// on the way: the container wrote the bytes before it, and those are what is captured).
    /// The script's output is the shape's expected stdout, given in the script's first line.
    PythonOnTty {
        wrote: &'static [u8],
    },
}

/// ctypes helpers for syscalls Python does not wrap.
const CTYPES: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
def iov(parts):
    keep = [ctypes.create_string_buffer(p, len(p)) for p in parts]
    arr = (iovec * len(parts))(*[iovec(ctypes.cast(k, ctypes.c_void_p), len(p)) for k, p in zip(keep, parts)])
    return keep, arr
def check(n, want, what):
    if n != want:
        raise SystemExit("%s returned %d (errno %d), wanted %d" % (what, n, ctypes.get_errno(), want))
"#;

/// A minimal io_uring for Python, with the raw syscalls (x86_64 numbers) and the ring layout of
/// include/uapi/linux/io_uring.h, as liburing sets it up: one request at a time, submitted and
/// waited for in one `io_uring_enter`.
const URING: &str = r#"
import mmap, struct
libc.syscall.restype = ctypes.c_long
class Ring:
    def __init__(self, entries=8):
        params = ctypes.create_string_buffer(120)
        fd = libc.syscall(425, entries, params)
        if fd < 0:
            raise SystemExit("io_uring_setup: errno %d" % ctypes.get_errno())
        self.fd = fd
        sq_entries, cq_entries = struct.unpack_from("<II", params, 0)
        # sq_off: head, tail, ring_mask, ring_entries, flags, dropped, array; cq_off: head,
        # tail, ring_mask, ring_entries, overflow, cqes.
        self.sq = struct.unpack_from("<7I", params, 40)
        self.cq = struct.unpack_from("<6I", params, 80)
        self.sqring = mmap.mmap(fd, self.sq[6] + sq_entries * 4, offset=0)
        self.cqring = mmap.mmap(fd, self.cq[5] + cq_entries * 16, offset=0x8000000)
        self.sqes = mmap.mmap(fd, sq_entries * 64, offset=0x10000000)
    def u32(self, ring, at):
        return struct.unpack_from("<I", ring, at)[0]
    def run(self, opcode, fd, addr, length, off=-1, fd_in=0):
        sq, cq = self.sq, self.cq
        tail = self.u32(self.sqring, sq[1])
        index = tail & self.u32(self.sqring, sq[2])
        sqe = bytearray(64)
        struct.pack_into("<BBHiQQI", sqe, 0, opcode, 0, 0, fd, off % 2**64, addr, length)
        struct.pack_into("<i", sqe, 44, fd_in)
        self.sqes[index * 64:(index + 1) * 64] = bytes(sqe)
        struct.pack_into("<I", self.sqring, sq[6] + index * 4, index)
        struct.pack_into("<I", self.sqring, sq[1], tail + 1)
        n = libc.syscall(426, self.fd, 1, 1, 1, None, 0)
        if n != 1:
            raise SystemExit("io_uring_enter returned %d (errno %d)" % (n, ctypes.get_errno()))
        head = self.u32(self.cqring, cq[0])
        at = cq[5] + (head & self.u32(self.cqring, cq[2])) * 16
        res = struct.unpack_from("<i", self.cqring, at + 8)[0]
        struct.pack_into("<I", self.cqring, cq[0], head + 1)
        if res < 0:
            raise SystemExit("io_uring opcode %d failed: errno %d" % (opcode, -res))
        return res
    def write(self, fd, data):
        buf = ctypes.create_string_buffer(data, len(data))
        done = 0
        while done < len(data):
            done += self.run(23, fd, ctypes.addressof(buf) + done, len(data) - done)
"#;

/// Syscalls of a 32-bit program for Python: `sys32(a0, a1, a2, nr, a3)` runs syscall `nr` of
/// the i386 table through `int $0x80` (x86-64 code: push rbx; mov eax, ecx; mov ebx, edi;
/// mov ecx, esi; mov esi, r8d; int 0x80; pop rbx; ret), on buffers that `put` places below 4 GiB.
/// The kernel enters such a syscall as it enters an i386 binary's (ia32 emulation: TS_COMPAT
/// set, the 32-bit table, arguments in ebx, ecx, edx, esi), so this is how an i386 image's
/// programs write, without an i386 toolchain on the test machine.
const INT80: &str = r#"
import mmap, struct
low = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40,
                prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
base = ctypes.addressof(ctypes.c_char.from_buffer(low))
assert base + len(low) < 2**32, hex(base)
code = bytes([0x53, 0x89, 0xC8, 0x89, 0xFB, 0x89, 0xF1, 0x44, 0x89, 0xC6, 0xCD, 0x80, 0x5B, 0xC3])
low[0:len(code)] = code
u = ctypes.c_uint
sys32 = ctypes.CFUNCTYPE(ctypes.c_int, u, u, u, u, u)(base)
free = [4096]
def put(data):
    at = free[0]
    low[at:at + len(data)] = data
    free[0] = (at + len(data) + 63) // 64 * 64
    return base + at
"#;

fn shapes(files: &Path) -> Vec<Shape> {
    let blob = files.join("blob");
    std::fs::write(&blob, random(100_000)).unwrap();
    let blob = blob.display().to_string();
    let logs = files.join("logs");
    std::fs::create_dir(&logs).unwrap();
    let logs = logs.display().to_string();
    let busybox = |name, script: &str| Shape {
        name,
        program: Program::Busybox,
        script: script.to_owned(),
        uncopied: 0,
        racing: false,
    };
    let python = |name, script: String| Shape {
        name,
        program: Program::Python,
        script,
        uncopied: 0,
        racing: false,
    };
    vec![
        busybox(
            "echo",
            "echo out; echo err >&2; printf 'no newline at the end'",
        ),
        // `exec 3>&1` is fcntl(F_DUPFD) in busybox's ash: the container's stdout through fd 3.
        busybox(
            "dup-fd",
            "exec 3>&1 4>&2; echo via-three >&3; echo via-four >&4; exec 1>&-; echo still >&3",
        ),
        // Output hidden on purpose goes nowhere, and what goes through the saved fd is output.
        busybox(
            "exec-redirect",
            "exec 3>&1 1>/dev/null; echo hidden; echo shown >&3; echo err >&2",
        ),
        // A reopen makes a new open file on the same pipe.
        busybox(
            "reopen",
            "echo a > /dev/stdout; echo b > /proc/self/fd/2; echo c >> /dev/fd/1; \
             echo d > /dev/stderr",
        ),
        // Pipes inside the container are not its output; the last command's output is.
        busybox(
            "pipeline",
            "seq 1 3000 | tr 1 x | sort -r; echo a | tr a b >&2",
        ),
        // A child that outlives its parent (fork and exit, as daemons do) and keeps the pipes.
        busybox(
            "daemon",
            "(sleep 0.3; echo late-from-the-daemon; echo late-err >&2) & echo parent-exits",
        ),
        // Many children and subshells, each a process of its own.
        busybox(
            "children",
            "for i in 1 2 3 4 5 6 7 8; do (echo child $i; echo child-err $i >&2); done; \
             sh -c 'echo grandchild'",
        ),
        Shape {
            // busybox `cat` copies files with sendfile(2).
            uncopied: 100_000,
            ..busybox("busybox-cat", &format!("echo before; cat {blob}; echo after"))
        },
        // nginx's official image links its logs to the container's output
        // (docker-library/nginx, mainline/debian/Dockerfile: `ln -sf /dev/stdout
        // /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log`), and nginx
        // opens them O_WRONLY|O_APPEND|O_CREAT (src/os/unix/ngx_files.h, NGX_FILE_APPEND).
        python(
            "nginx-logs",
            format!(
                r#"
import os
os.symlink("/dev/stdout", "{logs}/access.log")
os.symlink("/dev/stderr", "{logs}/error.log")
flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
access = os.open("{logs}/access.log", flags, 0o644)
error = os.open("{logs}/error.log", flags, 0o644)
os.write(error, b"2026/12/06 17:00:00 [notice] 1#1: start worker processes\n")
for i in range(2000):
    os.write(access, b'10.0.0.%d - - [06/Dec/2026:17:00:00 +0000] "GET /item/%d HTTP/1.1" 200 612 "-" "curl/8.5.0" "-"\n' % (i % 250, i))
"#
            ),
        ),
        // Python's stdout on a pipe is block-buffered: 8 KiB writes, the rest at exit.
        python(
            "python-buffered",
            "import sys\nfor i in range(30000): print('line', i)\nprint('bye', file=sys.stderr)"
                .to_owned(),
        ),
        python(
            "python-unbuffered",
            "import sys\nsys.stdout.reconfigure(write_through=True)\n\
             for i in range(3000): print('line', i, flush=True)\n"
                .to_owned(),
        ),
        python(
            "writev-many",
            "import os\nparts = [b'part %d\\n' % i for i in range(1000)]\n\
             assert os.writev(1, parts) == sum(map(len, parts))\n"
                .to_owned(),
        ),
        python(
            "pwritev2",
            format!(
                "{CTYPES}\nparts = [b'pwritev2 %d\\n' % i for i in range(300)]\n\
                 keep, arr = iov(parts)\n\
                 libc.pwritev2.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_int]\n\
                 check(libc.pwritev2(1, arr, len(parts), -1, 0), sum(map(len, parts)), 'pwritev2')\n"
            ),
        ),
        // At most one pipe slot per iovec (16 slots): eight parts go in one call. The pipe
        // holds the caller's pages, not copies: as vmsplice(2) asks, they are left alone until
        // the reader has taken them (FIONREAD on the pipe is 0), or it would read later contents.
        python(
            "vmsplice",
            format!(
                "{CTYPES}\nparts = [b'vmsplice %d ' % i + b'v' * 400 + b'\\n' for i in range(8)]\n\
                 keep, arr = iov(parts)\n\
                 libc.vmsplice.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]\n\
                 check(libc.vmsplice(1, arr, len(parts), 0), sum(map(len, parts)), 'vmsplice')\n\
                 import fcntl, struct, termios, time\n\
                 while struct.unpack('i', fcntl.ioctl(1, termios.FIONREAD, b'0000'))[0]: time.sleep(0.01)\n\
                 os.write(1, b'after\\n')\n"
            ),
        ),
        Shape {
            uncopied: 100_000,
            ..python(
                "sendfile",
                format!(
                    "import os\nos.write(1, b'before\\n')\nf = os.open('{blob}', os.O_RDONLY)\n\
                     sent = 0\nwhile sent < 100000: sent += os.sendfile(1, f, sent, 100000 - sent)\n\
                     os.write(1, b'after\\n')\n"
                ),
            )
        },
        Shape {
            uncopied: 100_000,
            ..python(
                "splice",
                format!(
                    "import os\nos.write(2, b'before\\n')\nf = os.open('{blob}', os.O_RDONLY)\n\
                     moved = 0\nwhile moved < 100000: moved += os.splice(f, 1, 100000 - moved)\n\
                     os.write(1, b'after\\n')\n"
                ),
            )
        },
        Shape {
            uncopied: 4096,
            ..python(
                "tee",
                format!(
                    "{CTYPES}\nr, w = os.pipe()\nos.write(w, b't' * 4096)\n\
                     libc.tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]\n\
                     check(libc.tee(r, 1, 4096, 0), 4096, 'tee')\nos.write(1, b'after\\n')\n"
                ),
            )
        },
        // io_uring (opcodes from include/uapi/linux/io_uring.h): WRITE is copied from the
        // request's buffer, more than the pipe holds so that it completes late; WRITEV's iovec
        // array may be gone by its completion and SPLICE moves pages, so those are marked.
        Shape {
            uncopied: 22 + 5_000,
            ..python(
                "io-uring",
                format!(
                    "{CTYPES}{URING}\nring = Ring()\n\
                     ring.write(1, b''.join(b'uring line %d\\n' % i for i in range(20000)))\n\
                     ring.write(2, b'uring to stderr\\n')\n\
                     keep, arr = iov([b'writev one\\n', b'writev two\\n'])\n\
                     check(ring.run(2, 1, ctypes.addressof(arr), 2), 22, 'IORING_OP_WRITEV')\n\
                     f = os.open('{blob}', os.O_RDONLY)\nmoved = 0\n\
                     while moved < 5000: moved += ring.run(30, 1, moved, 5000 - moved, fd_in=f)\n\
                     os.write(1, b'after\\n')\n"
                ),
            )
        },
        // A 32-bit program (i386 images, old static binaries): `write` is 4 in its table (native
        // `stat`), `writev` 146 with iovecs of two 32-bit words, `sendfile` 187 and `sendfile64`
        // 239 (arch/x86/entry/syscalls/syscall_32.tbl).
        Shape {
            uncopied: 100_000,
            ..python(
                "i386",
                format!(
                    "{CTYPES}{INT80}\n\
                     for i in range(200):\n\
                     \x20   line = b'i386 write %d\\n' % i\n\
                     \x20   check(sys32(1, put(line), len(line), 4, 0), len(line), 'write')\n\
                     err = b'i386 to stderr\\n'\n\
                     check(sys32(2, put(err), len(err), 4, 0), len(err), 'write')\n\
                     parts = [b'i386 writev %d\\n' % i for i in range(50)]\n\
                     vec = put(b''.join(struct.pack('<II', put(p), len(p)) for p in parts))\n\
                     check(sys32(1, vec, len(parts), 146, 0), sum(map(len, parts)), 'writev')\n\
                     f = os.open('{blob}', os.O_RDONLY)\nsent = 0\n\
                     for nr, upto in ((187, 50000), (239, 100000)):\n\
                     \x20   while sent < upto:\n\
                     \x20       n = sys32(1, f, 0, nr, upto - sent)\n\
                     \x20       assert n > 0, 'sendfile: %d' % n\n\
                     \x20       sent += n\n\
                     os.write(1, b'after\\n')\n"
                ),
            )
        },
        // A terminal is both stdout and stderr: one stream, `stdout`, as Kubernetes shows it.
        Shape {
            name: "tty",
            program: Program::PythonOnTty {
                wrote: b"on a terminal\nto stderr too\nand back\n",
            },
            script: "import sys\nprint('on a terminal', flush=True)\n\
                     print('to stderr too', file=sys.stderr, flush=True)\nprint('and back')\n"
                .to_owned(),
            uncopied: 0,
            racing: false,
        },
        Shape {
            racing: true,
            ..python(
                "threads",
                "import os, threading\n\
                 def run(t):\n    for i in range(500): os.write(1 if i % 3 else 2, b'thread %d line %d\\n' % (t, i))\n\
                 ts = [threading.Thread(target=run, args=(t,)) for t in range(8)]\n\
                 [t.start() for t in ts]; [t.join() for t in ts]\n"
                    .to_owned(),
            )
        },
    ]
}

/// What the stream of one shape's stdout or stderr came back as.
enum Outcome {
    /// Byte-exact where stored, and exactly the expected bytes dropped.
    Accounted {
        bytes: usize,
        dropped: u64,
    },
    Failed(String),
}

#[test]
fn every_shape_of_the_corpus_is_captured_byte_exact_or_accounted_exactly() {
    if !can_run() {
        return;
    }
    let busybox = testbed::layout::busybox_rootfs().join("bin/busybox");
    if !busybox.exists() {
        testbed::skip_or_fail(&format!(
            "{} is missing: run `cargo xtask testbed install`",
            busybox.display()
        ));
        return;
    }
    let api = Api::start(&[]);
    let files = tempfile::tempdir().unwrap();
    let shapes = shapes(files.path());
    let cgroups: Vec<Cgroup> = shapes.iter().map(|s| Cgroup::new(s.name)).collect();
    let contexts: Vec<String> = shapes
        .iter()
        .map(|s| format!("workflows/corpus/runs/r1/steps/{}", s.name))
        .collect();
    let watched: Vec<(&Path, &str)> = cgroups
        .iter()
        .zip(&contexts)
        .map(|(c, ctx)| (c.path.as_path(), ctx.as_str()))
        .collect();
    let collector = Collector::start_with(collector_cmd(), &api, &watched, &[]);

    // All at once, as a node runs many containers.
    let runs: Vec<_> = shapes
        .iter()
        .zip(&cgroups)
        .map(|(shape, cg)| {
            let cmd = match shape.program {
                Program::Busybox => {
                    let mut c = Cgroup::sh(&cg.path, r#"exec "$BUSYBOX" sh -c "$SCRIPT""#);
                    c.env("BUSYBOX", &busybox);
                    // Applets by name, as in a busybox image.
                    c.env("PATH", busybox.parent().unwrap());
                    c
                }
                Program::Python => Cgroup::sh(&cg.path, r#"exec python3 -c "$SCRIPT""#),
                Program::PythonOnTty { .. } => {
                    let mut c = Command::new("python3");
                    c.args([
                        "-c",
                        "import pty, sys; sys.exit(pty.spawn(sys.argv[1:]) >> 8)",
                        "sh",
                        "-c",
                    ])
                    .arg(format!(
                        r#"echo $$ > {}/cgroup.procs && exec python3 -c "$SCRIPT""#,
                        cg.path.display()
                    ));
                    c
                }
            };
            let mut cmd: Command = cmd;
            cmd.env("SCRIPT", &shape.script);
            std::thread::spawn(move || run_piped(cmd))
        })
        .collect();
    let outputs: Vec<(i32, Vec<u8>, Vec<u8>)> =
        runs.into_iter().map(|r| r.join().unwrap()).collect();

    // Every shape is checked and the table printed before the verdict, so one run shows them all.
    let mut table: BTreeMap<&str, [Option<Outcome>; 2]> = BTreeMap::new();
    // What each container wrote: what its pipes carried, but on a terminal the line
    // discipline's output is what the test read, not what the container wrote.
    let outputs: Vec<(i32, Vec<u8>, Vec<u8>)> = shapes
        .iter()
        .zip(outputs)
        .map(|(shape, (code, out, err))| match shape.program {
            Program::PythonOnTty { wrote } => (code, wrote.to_vec(), Vec::new()),
            _ => (code, out, err),
        })
        .collect();
    for ((shape, ctx), (code, out, err)) in shapes.iter().zip(&contexts).zip(&outputs) {
        assert_eq!(*code, 0, "{}: {}", shape.name, String::from_utf8_lossy(err));
        let mut row = [None, None];
        for (i, (name, want)) in [("stdout", out), ("stderr", err)].into_iter().enumerate() {
            if want.is_empty() {
                continue;
            }
            let uncopied = if name == "stdout" { shape.uncopied } else { 0 };
            let check = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                check_stream(&api, ctx, name, want, shape.racing, uncopied)
            }));
            row[i] = Some(match check {
                Ok(dropped) => Outcome::Accounted {
                    bytes: want.len(),
                    dropped,
                },
                Err(panic) => Outcome::Failed(
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default(),
                ),
            });
        }
        table.insert(shape.name, row);
    }
    println!("{:<18} {:>26} {:>26}", "shape", "stdout", "stderr");
    let mut failures = Vec::new();
    for (name, row) in &table {
        let cell = |o: &Option<Outcome>| match o {
            None => "-".to_owned(),
            Some(Outcome::Accounted { bytes, dropped: 0 }) => format!("{bytes} B exact"),
            Some(Outcome::Accounted { bytes, dropped }) => {
                format!("{bytes} B, {dropped} dropped")
            }
            Some(Outcome::Failed(_)) => "FAILED".to_owned(),
        };
        println!("{name:<18} {:>26} {:>26}", cell(&row[0]), cell(&row[1]));
        for o in row {
            if let Some(Outcome::Failed(why)) = o {
                failures.push(format!("{name}: {why}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let total_uncopied: u64 = shapes.iter().map(|s| s.uncopied).sum();
    assert_eq!(collector.metric("uncopied_bytes_total"), total_uncopied);
    assert_eq!(collector.metric("kernel_lost_bytes_total"), 0);
    assert_eq!(collector.metric("faulted_bytes_total"), 0);
}

/// Checks one `ebpf` stream against what its pipe carried; returns its dropped bytes.
fn check_stream(api: &Api, ctx: &str, name: &str, want: &[u8], racing: bool, uncopied: u64) -> u64 {
    let (status, data) = complete_ebpf(api, ctx, name);
    // None of these containers runs under the entrypoint. Without a pod spec (local mode) the
    // collector can tell only from a process still running when it adopts the cgroup, and then
    // it must say that.
    if let Some(why) = status["entrypoint_absent"].as_str() {
        assert!(
            why.contains("does not run under the entrypoint"),
            "{status}"
        );
    }
    let dropped = if racing {
        assert_eq!(status["final_length"], want.len() as u64, "{status}");
        assert_eq!(spans(&status, "dropped"), vec![], "{status}");
        assert_eq!(sorted_lines(&data), sorted_lines(want), "lines differ");
        0
    } else {
        assert_accounted(&status, &data, want)
    };
    assert_eq!(dropped, uncopied, "dropped bytes: {status}");
    dropped
}

fn sorted_lines(b: &[u8]) -> Vec<&[u8]> {
    let mut lines: Vec<&[u8]> = b.split_inclusive(|&c| c == b'\n').collect();
    lines.sort_unstable();
    lines
}
