//! Kernel side of the collector: captures what tasks in watched cgroups write to their stdout and
//! stderr.
//!
//! One BTF-typed tracepoint (`tp_btf`), `sys_exit`, sees every syscall as it returns, with the
//! registers it was called with. A syscall that can put bytes into a file (see
//! [`collector_common::syscall`]; 32-bit programs' too, by their own table) and wrote some is
//! filtered (a watched cgroup, a pipe or tty behind its target fd, whatever the fd's number, and
//! that file being the container's stdout or stderr when the cgroup's stdio is known), and
//! exactly the `ret` bytes it wrote are copied into the ring buffer, in chunks of at most
//! [`CHUNK_BYTES`], each with its offset in the stream. The arguments are still in the saved
//! registers at exit (the kernel does not change a syscall's argument registers), so nothing runs at syscall entry: an unwatched process pays
//! for one program per syscall, a watched write for no per-write map insert. Bytes the
//! kernel moved from another file or pipe (`sendfile`, `splice`, `tee`) cannot be read here:
//! they take their place in the stream's offsets all the same, and one record without data says
//! which range and why, which user space reports as dropped. A chunk that does not fit into the
//! ring buffer is counted, never waited for: user space sees the gap in the offsets and reports
//! it as dropped.
//!
//! This program runs for every syscall on the node, so its path is kept short: BTF typing lets
//! it read the registers and the task's fd table with plain loads (the JIT guards them) rather
//! than a helper call each, the hot functions are inlined (a BPF-to-BPF call and return cost
//! more than their bodies here), and the rare paths (a new stream, a thread's first write, a
//! cgroup without a cached verdict) are out of line. `fexit` trampolines on the write syscalls
//! would spare every other syscall altogether, but kernels that forbid trampolines refuse to
//! load them (this project's test machines among them: `EPERM` for any `fentry`/`fexit`
//! program), while tracepoints work everywhere the collector runs.
//!
//! A raw tracepoint, `sched_process_exec`, notes the stdout and stderr of each container's
//! command when it starts (see [`StdioInodes`]): a container's output is a file, reached through
//! any fd (`dup2`, a reopen of `/dev/stdout`, a log file linked to it), and only writes to that
//! file are captured.
//!
//! Another, `io_uring_complete`, takes writes a program hands to io_uring instead of a syscall:
//! at each completion of a write-type request on such a file, the `res` bytes it wrote are
//! copied from the request's buffer (`WRITE`, `WRITE_FIXED`) or recorded as uncopied
//! (`WRITEV`, whose iovec array may be gone by then, `SPLICE`, `TEE`). Two completions never reach it: a request submitted with
//! `IOSQE_CQE_SKIP_SUCCESS` that succeeds posts no completion at all, and one whose completion
//! overflows a full completion queue is posted later without the request; both are documented
//! as not captured.
//!
//! While a new collector takes over from an old one, both attach to the same events; the shared
//! `OWNER` word says whose programs capture, and the new collector switches it in one store.
//!
//! Raw and BTF-typed tracepoints rather than the per-syscall `syscalls/sys_enter_write` events:
//! those are attached by an id read from tracefs, which a fresh host does not mount and a
//! container's `/sys` does not have, while these are opened by name or BTF id with one `bpf()`
//! call. They are also cheaper for the writes that matter (no perf record is built per event),
//! and one program can take every syscall that writes into a file.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so core's atomic types offer no `fetch_add`, and
// LLVM only selects the fetching atomic add for CPU v3, while rustc asks bpf-linker for `generic`
// (and aya-build owns the rustflags). The instruction itself is in every kernel since 5.12.
#![feature(asm_experimental_arch)]

use core::{arch::asm, ffi::c_void};

use aya_ebpf::{
    Global,
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_task, bpf_get_current_task_btf,
            bpf_loop, bpf_probe_read_user,
        },
    },
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use aya_log_ebpf::debug;
use collector_common::{
    CHUNK_BYTES, ChunkHeader, Cursor, FILE_KIND_FIFO, FILE_KIND_TTY, HEADER_BYTES, KernelOffsets,
    MAX_CGROUP_DEPTH, STREAM_IGNORE, StdioInodes, StreamKey, StreamState, Verdict, counter,
    syscall, uncopied,
};

/// Our own process: the collector must never capture itself.
#[unsafe(no_mangle)]
static SELF_TGID: Global<u32> = Global::new(0);

/// Struct member offsets of the running kernel, from its BTF.
#[unsafe(no_mangle)]
static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_files: 0,
    files_fdt: 0,
    fdt_fd: 0,
    fdt_max_fds: 0,
    file_inode: 0,
    inode_mode: 0,
    inode_ino: 0,
    inode_rdev: 0,
    task_ti_status: 0,
    task_tgid: 0,
    task_real_parent: 0,
    task_thread_pid: 0,
    pid_level: 0,
    pid_numbers: 0,
    regs_nr: 0,
    regs_arg0: 0,
    regs_arg1: 0,
    regs_arg2: 0,
    nr: [u64::MAX; syscall::COUNT],
    uring_req_file: 0,
    uring_req_opcode: 0,
    uring_req_res: 0,
    uring_req_cmd: 0,
    uring_rw_addr: 0,
    uring_rw_len: 0,
    nr_compat: [u64::MAX; syscall::COUNT],
    nr_compat_sendfile: u64::MAX,
    regs_compat_arg0: 0,
    regs_compat_arg1: 0,
    regs_compat_arg2: 0,
});

/// One member of [`OFFSETS`]. `Global::load` would copy the whole struct (a volatile read of
/// some 200 bytes) for each use, on the path every syscall takes; this reads one word.
macro_rules! offset {
    ($($member:tt)+) => {
        // SAFETY: `Global<T>` is a single field around `MaybeUninit<T>`, so the `T` starts it
        // (checked below), and the loader always initialises it. Volatile, as `Global::load`,
        // so that the compiler does not fold in the placeholder values of the object file.
        unsafe {
            core::ptr::read_volatile(
                &raw const (*(&raw const OFFSETS).cast::<KernelOffsets>()).$($member)+,
            )
        }
    };
}

const _: () = assert!(size_of::<Global<KernelOffsets>>() == size_of::<KernelOffsets>());

/// This load of the programs: they capture only while `OWNER` holds it.
#[unsafe(no_mangle)]
static INSTANCE: Global<u64> = Global::new(0);

/// Wake the reader only once this many bytes wait in the ring buffer; user space also reads on a
/// short timer, so a trickle is not held back. 0 wakes it for every record.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u64> = Global::new(0);

/// Watched cgroup ids (maintained by user space); the value is unused.
#[map]
static WATCHED: HashMap<u64, u32> = HashMap::with_max_entries(4096, 0);

/// Cached verdicts per cgroup id, valid while their generation is current.
#[map]
static VERDICTS: LruHashMap<u64, Verdict> = LruHashMap::with_max_entries(16384, 0);

/// Index 0: the watch generation, bumped by user space whenever `WATCHED` changes.
#[map]
static GENERATION: Array<u64> = Array::with_max_entries(1, 0);

/// Offsets and loss counters per stream.
#[map]
static STREAMS: HashMap<StreamKey, StreamState> = HashMap::with_max_entries(16384, 0);

/// The stdio of each cgroup's command, or of its first writer (see [`StdioInodes`]).
#[map]
static CGROUP_STDIO: HashMap<u64, StdioInodes> = HashMap::with_max_entries(16384, 0);

/// Each writing thread's copy state (`pid_tgid`; `URING_KEY | pid_tgid` for io_uring
/// completions), kept between its writes so a write looks it up rather than inserting it.
#[map]
static PENDING: LruHashMap<u64, Pending> = LruHashMap::with_max_entries(16384, 0);

/// Index 0: the `INSTANCE` of the collector whose programs capture (set by user space).
#[map]
static OWNER: Array<u64> = Array::with_max_entries(1, 0);

/// Captured chunks for user space. Its size is set by the loader.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 23, 0);

/// User space's place in each stream it ships (see [`Cursor`]); the programs never touch it.
#[map]
static CURSORS: HashMap<StreamKey, Cursor> = HashMap::with_max_entries(16384, 0);

/// See [`counter`].
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// A watched write being copied: its stream, arguments and the state of the copy loop, in map
/// memory because `bpf_loop` callbacks compare values kept there far more cheaply for the
/// verifier than values on the stack.
#[repr(C)]
struct Pending {
    key: StreamKey,
    /// The data (`write`) or the iovec array (`writev`).
    buf: u64,
    /// Bytes (`write`) or iovecs (`writev`).
    count: u64,
    /// Stream offset of the write's first byte.
    base: u64,
    /// Bytes written by the syscall.
    total: u64,
    /// Bytes copied (or lost) so far.
    done: u64,
    /// Next iovec to load, and the one being copied.
    iov_next: u64,
    iov_base: u64,
    iov_len: u64,
    iov_off: u64,
    fd: u32,
    kind: u32,
    tgid: u32,
    /// The `syscall::*` being traced.
    op: u32,
    /// `uncopied::*`: why the bytes cannot be copied, or 0.
    uncopied: u32,
    /// 0: `buf` is the data; 1: an array of `struct iovec`; [`VECTORED_COMPAT`]: of
    /// `struct compat_iovec`. A u32 so that this type has no implicit padding.
    vectored: u32,
}

/// `struct iovec` as user space passes it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// `struct compat_iovec` as a 32-bit program passes it.
#[repr(C)]
#[derive(Clone, Copy)]
struct CompatIovec {
    base: u32,
    len: u32,
}

const S_IFMT: u16 = 0o170_000;
const S_IFIFO: u16 = 0o010_000;
const S_IFCHR: u16 = 0o020_000;
/// Major number of /dev/null, /dev/zero and friends: a character device, but not a terminal.
const MEM_MAJOR: u32 = 1;

/// x86's `TS_COMPAT` in `thread_info.status`: the task is in a 32-bit syscall, numbered and
/// passed differently (arch/x86/include/asm/thread_info.h).
const TS_COMPAT: u32 = 0x0002;

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct pt_regs *regs, long ret). A BTF-typed tracepoint, so `regs` is a typed
    // pointer that is read with plain loads: this runs for every syscall on the node.
    let ret: i64 = ctx.arg(1);
    if ret <= 0 {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    let id: u64 = load(regs, offset!(regs_nr));
    // Which table the number is from is only looked up for the few that are in either.
    let ops = Ops {
        native: watched_syscall(id),
        compat: compat_syscall(id),
    };
    if ops.native.is_none() && ops.compat.is_none() {
        return 0;
    }
    exit(&ctx, regs, ops, ret as u64).unwrap_or(0)
}

/// What a syscall number is among the watched syscalls, in the native table and in the 32-bit
/// one (`write` of a 32-bit program is 4, native `stat`).
#[derive(Clone, Copy)]
struct Ops {
    native: Option<usize>,
    compat: Option<usize>,
}

#[raw_tracepoint(tracepoint = "io_uring_complete")]
pub fn io_uring_complete(ctx: RawTracePointContext) -> u32 {
    // TP_PROTO(struct io_ring_ctx *ctx, void *req, struct io_uring_cqe *cqe) since 5.19 (before:
    // ctx, req, user_data, res, cflags). The result is read from the request, not the entry.
    uring_complete(ctx.arg(1)).unwrap_or(0)
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm): `p` is the
    // current task, which has its new `comm` already.
    note_command();
    0
}

/// The `syscall::*` index of native syscall number `id`; `None` for every other syscall, which
/// the programs pass over at once.
#[inline(always)]
fn watched_syscall(id: u64) -> Option<usize> {
    // The two that nearly every captured byte goes through come first.
    if id == offset!(nr[syscall::WRITE]) {
        return Some(syscall::WRITE);
    }
    if id == offset!(nr[syscall::WRITEV]) {
        return Some(syscall::WRITEV);
    }
    (syscall::PWRITEV2..syscall::COUNT).find(|&op| offset!(nr[op]) == id)
}

/// The `syscall::*` index of 32-bit syscall number `id` (see [`watched_syscall`]).
#[inline(always)]
fn compat_syscall(id: u64) -> Option<usize> {
    if id == offset!(nr_compat[syscall::WRITE]) {
        return Some(syscall::WRITE);
    }
    if id == offset!(nr_compat_sendfile) {
        return Some(syscall::SENDFILE);
    }
    (syscall::WRITEV..syscall::COUNT).find(|&op| offset!(nr_compat[op]) == id)
}

/// `Pending::vectored` of a 32-bit program's iovec array: `struct compat_iovec`.
const VECTORED_COMPAT: u32 = 2;

/// Where the target fd of `op` is among its arguments, how its bytes are read, and why they
/// cannot be when they cannot.
struct Shape {
    fd_arg: u8,
    vectored: bool,
    uncopied: u32,
}

#[inline(always)]
fn shape(op: usize) -> Shape {
    let (fd_arg, vectored, uncopied) = match op {
        syscall::WRITE => (0, false, uncopied::NONE),
        syscall::WRITEV | syscall::PWRITEV2 | syscall::VMSPLICE => (0, true, uncopied::NONE),
        syscall::SENDFILE => (0, false, uncopied::SENDFILE),
        syscall::SPLICE => (2, false, uncopied::SPLICE),
        syscall::TEE => (1, false, uncopied::TEE),
        _ => (2, false, uncopied::COPY_FILE_RANGE),
    };
    Shape {
        fd_arg,
        vectored,
        uncopied,
    }
}

#[inline(always)]
fn count(index: u32, n: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer is to this CPU's slot of a live map value; an atomic add keeps it
        // right even if the program is preempted by another run of itself on this CPU.
        unsafe { fetch_add(c, n) };
    }
}

/// Atomically adds `n` to `*dst` and returns the previous value.
///
/// # Safety
///
/// `dst` must point to a live, aligned `u64` in map memory.
#[inline(always)]
unsafe fn fetch_add(dst: *mut u64, n: u64) -> u64 {
    let mut value = n;
    // SAFETY: as the caller promises; BPF_ATOMIC | BPF_FETCH | BPF_ADD on a double word.
    unsafe {
        asm!(
            "{v} = atomic_fetch_add((u64 *)({p} + 0), {v})",
            p = in(reg) dst,
            v = inout(reg) value,
            options(nostack),
        );
    }
    value
}

#[inline(always)]
fn exit(ctx: &BtfTracePointContext, regs: u64, ops: Ops, written: u64) -> Result<u32, i64> {
    // The cgroup first: it rules out nearly every write on the node.
    // SAFETY: a helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if watched_root(cgroup_id) == 0 {
        return Ok(0);
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == SELF_TGID.load() {
        return Ok(0);
    }
    // A 32-bit program's syscall is numbered from its own table and takes its arguments in
    // other registers, of which only the low 32 bits count (a 64-bit program making one with
    // `int $0x80` may leave anything in the high ones).
    let status: u32 = load(current_task(), offset!(task_ti_status));
    let compat = status & TS_COMPAT != 0;
    let (op, args, width) = if compat {
        (
            ops.compat,
            [
                offset!(regs_compat_arg0),
                offset!(regs_compat_arg1),
                offset!(regs_compat_arg2),
            ],
            u64::from(u32::MAX),
        )
    } else {
        (
            ops.native,
            [offset!(regs_arg0), offset!(regs_arg1), offset!(regs_arg2)],
            u64::MAX,
        )
    };
    let Some(op) = op else {
        return Ok(0);
    };
    let arg = |n: usize| load::<u64>(regs, args[n.min(2)]) & width;
    // The fd is read only now: every write on the node gets this far only from a watched cgroup.
    let shape = shape(op);
    let fd = arg(usize::from(shape.fd_arg));
    let Some((ino, kind)) = stdio_file(fd) else {
        return Ok(0);
    };
    if not_output(cgroup_id, ino) || !owner() {
        return Ok(0);
    }
    let (buf, count_arg) = if shape.uncopied == uncopied::NONE {
        (arg(1), arg(2))
    } else {
        (0, 0)
    };
    let Some(p) = scratch(pid_tgid) else {
        count(counter::UNTRACKED_WRITES, 1);
        return Ok(0);
    };
    p.key = StreamKey { cgroup_id, ino };
    p.buf = buf;
    p.count = count_arg;
    p.fd = fd as u32;
    p.kind = kind;
    p.tgid = tgid;
    p.op = op as u32;
    p.uncopied = shape.uncopied;
    p.vectored = match (shape.vectored, compat) {
        (false, _) => 0,
        (true, false) => 1,
        (true, true) => VECTORED_COMPAT,
    };
    if capture(p, written) == Some(0) {
        debug!(
            ctx,
            "new stream: cgroup {} inode {} fd {}", p.key.cgroup_id, p.key.ino, p.fd
        );
    }
    Ok(0)
}

/// Whether this load of the programs is the one that captures (see `OWNER`).
#[inline(always)]
fn owner() -> bool {
    OWNER.get(0).copied() == Some(INSTANCE.load())
}

/// The copy state of the thread (or io_uring completion) `key`, created on its first write.
#[inline(always)]
fn scratch(key: u64) -> Option<&'static mut Pending> {
    if let Some(p) = PENDING.get_ptr_mut(&key) {
        // SAFETY: the entry of the current thread, which only this thread's runs of the
        // programs touch, and only one at a time.
        return Some(unsafe { &mut *p });
    }
    new_scratch(key)
}

/// [`scratch`] for a thread's first write: out of line, as it is rare.
#[inline(never)]
fn new_scratch(key: u64) -> Option<&'static mut Pending> {
    let fresh = Pending {
        key: StreamKey {
            cgroup_id: 0,
            ino: 0,
        },
        buf: 0,
        count: 0,
        base: 0,
        total: 0,
        done: 0,
        iov_next: 0,
        iov_base: 0,
        iov_len: 0,
        iov_off: 0,
        fd: 0,
        kind: 0,
        tgid: 0,
        op: 0,
        uncopied: 0,
        vectored: 0,
    };
    PENDING.insert(&key, &fresh, 0).ok()?;
    // SAFETY: as above.
    PENDING.get_ptr_mut(&key).map(|p| unsafe { &mut *p })
}

/// Whether file `ino` of the current task's cgroup is one its stdio record rules out: another
/// pipe of the container (`a | b` inside it), not its output.
#[inline(always)]
fn not_output(cgroup_id: u64, ino: u64) -> bool {
    // SAFETY: a copy is taken at once.
    unsafe { CGROUP_STDIO.get(&cgroup_id) }
        .copied()
        .is_some_and(|stdio| stdio.exact() && ino != stdio.stdout && ino != stdio.stderr)
}

/// io_uring opcodes (include/uapi/linux/io_uring.h) that put bytes into a file.
const IORING_OP_WRITEV: u8 = 2;
const IORING_OP_WRITE_FIXED: u8 = 5;
const IORING_OP_WRITE: u8 = 23;
const IORING_OP_SPLICE: u8 = 30;
const IORING_OP_TEE: u8 = 33;
const IORING_OP_WRITEV_FIXED: u8 = 61;

/// Marks the `PENDING` entry an io_uring completion uses: thread ids stay below 2^31, so these
/// keys never meet the syscall entries (a completion can run inside a watched syscall).
const URING_KEY: u64 = 1 << 63;

/// At an io_uring completion in a watched cgroup: captures what a write-type request put into
/// the container's output, as the syscall exit does for a syscall.
fn uring_complete(req: u64) -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: a helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if tgid == SELF_TGID.load() || watched_root(cgroup_id) == 0 {
        return None;
    }
    let opcode: u8 = read_kernel(req, offset!(uring_req_opcode))?;
    // The buffer of a `WRITE` must stay put until its completion, and the request keeps its
    // address. A `WRITEV`'s iovec array is not: the kernel copies it at submission and the
    // program may reuse it at once, so reading it now could store other bytes; its range is
    // marked instead, as are the pages a `SPLICE` or `TEE` moved.
    let uncopied = match opcode {
        IORING_OP_WRITE | IORING_OP_WRITE_FIXED => uncopied::NONE,
        IORING_OP_WRITEV | IORING_OP_WRITEV_FIXED => uncopied::URING_WRITEV,
        IORING_OP_SPLICE => uncopied::URING_SPLICE,
        IORING_OP_TEE => uncopied::URING_TEE,
        _ => return None,
    };
    let res: i32 = read_kernel(req, offset!(uring_req_res))?;
    if res <= 0 {
        return None;
    }
    let file: u64 = read_kernel(req, offset!(uring_req_file))?;
    let (ino, kind) = file_kind(file)?;
    if not_output(cgroup_id, ino) {
        return None;
    }
    if !owner() {
        return None;
    }
    // io-wq workers and the SQPOLL thread share the submitter's files: its fd 2 tells stderr.
    let fd = if stdio_file(2).map(|f| f.0) == Some(ino) && stdio_file(1).map(|f| f.0) != Some(ino) {
        2
    } else {
        1
    };
    let (buf, count_arg) = if uncopied == uncopied::NONE {
        let rw = req + offset!(uring_req_cmd);
        let len: u32 = read_kernel(rw, offset!(uring_rw_len))?;
        (read_kernel(rw, offset!(uring_rw_addr))?, u64::from(len))
    } else {
        (0, 0)
    };
    let Some(p) = scratch(URING_KEY | pid_tgid) else {
        count(counter::UNTRACKED_WRITES, 1);
        return None;
    };
    p.key = StreamKey { cgroup_id, ino };
    p.buf = buf;
    p.count = count_arg;
    p.fd = fd;
    p.kind = kind;
    p.tgid = tgid;
    p.op = u32::MAX;
    p.uncopied = uncopied;
    p.vectored = 0;
    capture(p, res as u64);
    Some(0)
}

/// The watched cgroup that `cgroup`, the current task's, is or is under, or 0.
#[inline(always)]
fn watched_root(cgroup: u64) -> u64 {
    let generation = GENERATION.get(0).copied().unwrap_or(0);
    // SAFETY: a copy is taken at once; a concurrent update can at worst give a stale verdict,
    // which the generation check rejects.
    if let Some(v) = unsafe { VERDICTS.get(&cgroup) }
        && v.generation == generation
    {
        return v.root;
    }
    decide_root(cgroup, generation)
}

/// [`watched_root`] without a current verdict: walks the task's ancestors and caches the result.
#[inline(never)]
fn decide_root(cgroup: u64, generation: u64) -> u64 {
    let mut root = 0;
    // Level 0 is the root of the hierarchy; the walk stops past the task's own level.
    for level in 0..MAX_CGROUP_DEPTH {
        // SAFETY: a helper without memory arguments.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        if WATCHED.get_ptr(&id).is_some() {
            root = id;
            break;
        }
    }
    let _ = VERDICTS.insert(&cgroup, &Verdict { root, generation }, 0);
    root
}

/// Records the stdio of the current task for its cgroup, unless a clear one is known. Called for
/// the first write of each stream, so a cgroup's first writer sets it when its command started
/// before the collector (otherwise the exec program has set it).
fn note_stdio(cgroup_id: u64) {
    // SAFETY: a copy is taken at once.
    if let Some(known) = unsafe { CGROUP_STDIO.get(&cgroup_id) }
        && (known.exact() || known.stdout != known.stderr)
    {
        return;
    }
    let (Some((stdout, _)), Some((stderr, _))) = (stdio_file(1), stdio_file(2)) else {
        return;
    };
    let stdio = StdioInodes {
        stdout,
        stderr,
        tgid: 0,
        entrypoint: 0,
    };
    let _ = CGROUP_STDIO.insert(&cgroup_id, &stdio, 0);
}

/// At an exec in a watched cgroup: takes the stdio of the container's command (see
/// [`StdioInodes`] for which exec that is).
fn note_command() -> Option<()> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if tgid == SELF_TGID.load() || watched_root(cgroup_id) == 0 {
        return None;
    }
    // SAFETY: a copy is taken at once.
    let known = unsafe { CGROUP_STDIO.get(&cgroup_id) }.copied();
    let parent_is = |pid: u32| pid != 0 && parent_tgid() == Some(pid);
    // A container's own pid 1 is its command: runc's init process may have exec'd in the cgroup
    // before, as another process (its stage-0 parent), with the runtime's stdio rather than the
    // command's (a terminal it sets up later, the entrypoint's pipes).
    let init = namespace_pid() == Some(1);
    let entrypoint = if init {
        0
    } else {
        known.map_or(0, |k| k.entrypoint)
    };
    let comm = bpf_get_current_comm().ok()?;
    let wrapper = comm.starts_with(b"entrypoint\0");
    let command = init
        || match known {
            None => true,
            Some(k) if k.tgid == tgid => true,
            // The first child of the entrypoint (a record without files yet).
            Some(k) if k.stdout == 0 && k.stderr == 0 => parent_is(k.entrypoint),
            // An entrypoint writing to the container's output, exec'd after another process of
            // the cgroup wrote or exec'd there: under runc that is its init (which writes its
            // log and sync pipes from the cgroup before the command starts), and when the
            // command is not its namespace's pid 1 (`shareProcessNamespace`) nothing else tells
            // the two apart. The entrypoint puts its own pipes between its child and that
            // output, so its child's are the ones to watch.
            Some(k) => {
                wrapper
                    && stdio_file(1).map(|f| f.0) == Some(k.stdout)
                    && stdio_file(2).map(|f| f.0) == Some(k.stderr)
            }
        };
    if !command {
        return None;
    }
    let stdio = if wrapper {
        // Ours or Tekton's: its first child is the command, with the pipes it reads.
        StdioInodes {
            stdout: 0,
            stderr: 0,
            tgid,
            entrypoint: tgid,
        }
    } else {
        StdioInodes {
            stdout: stdio_file(1).map_or(0, |f| f.0),
            stderr: stdio_file(2).map_or(0, |f| f.0),
            tgid,
            entrypoint,
        }
    };
    CGROUP_STDIO.insert(&cgroup_id, &stdio, 0).ok()
}

/// The current task's pid in its own pid namespace.
fn namespace_pid() -> Option<u32> {
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let pid: u64 = read_kernel(task, offset!(task_thread_pid))?;
    let level: u32 = read_kernel(pid, offset!(pid_level))?;
    // `struct upid` is { int nr; struct pid_namespace *ns; }: 16 bytes, `nr` first. Levels are
    // bounded by MAX_PID_NS_LEVEL (32).
    let at = offset!(pid_numbers) + u64::from(level.min(32)) * 16;
    read_kernel::<i32>(pid, at).map(|n| n as u32)
}

/// The thread group id of the current task's parent.
fn parent_tgid() -> Option<u32> {
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let parent: u64 = read_kernel(task, offset!(task_real_parent))?;
    read_kernel::<i32>(parent, offset!(task_tgid)).map(|t| t as u32)
}

/// The current task, as a pointer the verifier knows the type of (see [`load`]).
#[inline(always)]
fn current_task() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_get_current_task_btf() as u64 }
}

/// The `T` at `offset` in kernel object `base`, which must be a pointer the verifier knows the
/// BTF type of (a `tp_btf` argument, the current task, or a pointer member loaded from one) and
/// `offset` one of [`OFFSETS`] (read-only, so the verifier checks the access against the type).
/// A plain load, which the JIT guards against faults (a null or bad pointer reads as 0): several
/// times cheaper than the helper call of [`read_kernel`], which takes any address.
#[inline(always)]
fn load<T: Copy>(base: u64, offset: u64) -> T {
    // SAFETY: as the verifier checks; see above.
    unsafe { core::ptr::read_volatile((base + offset) as *const T) }
}

#[inline(always)]
fn read_kernel<T>(base: u64, offset: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel((base + offset) as *const T) }.ok()
}

/// The inode number and kind of the file behind `fd` of the current task, when it is a pipe,
/// FIFO or terminal; `None` for files, sockets, /dev/null and everything else.
#[inline(always)]
fn stdio_file(fd: u64) -> Option<(u64, u32)> {
    let files: u64 = load(current_task(), offset!(task_files));
    if files == 0 {
        return None;
    }
    let fdt: u64 = load(files, offset!(files_fdt));
    let max_fds: u32 = load(fdt, offset!(fdt_max_fds));
    if fd >= u64::from(max_fds) {
        return None;
    }
    // `fdt->fd` is a pointer to pointers, which the verifier does not type: the element is
    // read with the helper.
    let fds: u64 = load(fdt, offset!(fdt_fd));
    file_kind(read_kernel(fds, fd * 8)?)
}

/// The inode number and kind of `file` (a `struct file *`), when it is a pipe, FIFO or terminal.
#[inline(always)]
fn file_kind(file: u64) -> Option<(u64, u32)> {
    if file == 0 {
        return None;
    }
    let inode: u64 = read_kernel(file, offset!(file_inode))?;
    let mode: u16 = read_kernel(inode, offset!(inode_mode))?;
    let kind = match mode & S_IFMT {
        S_IFIFO => FILE_KIND_FIFO,
        S_IFCHR => {
            let rdev: u32 = read_kernel(inode, offset!(inode_rdev))?;
            if rdev >> 20 == MEM_MAJOR {
                return None;
            }
            FILE_KIND_TTY
        }
        _ => return None,
    };
    let ino: u64 = read_kernel(inode, offset!(inode_ino))?;
    Some((ino, kind))
}

#[inline(always)]
fn stream(key: &StreamKey, fd: u32) -> Option<*mut StreamState> {
    if let Some(s) = STREAMS.get_ptr_mut(key) {
        return Some(s);
    }
    new_stream(key, fd)
}

/// [`stream`] for a stream's first write: out of line, as it is rare.
#[inline(never)]
fn new_stream(key: &StreamKey, fd: u32) -> Option<*mut StreamState> {
    let fresh = StreamState {
        fd,
        ..StreamState::default()
    };
    // Another CPU may create it first: then its entry is used.
    let _ = STREAMS.insert(key, &fresh, u64::from(BPF_NOEXIST));
    STREAMS.get_ptr_mut(key)
}

/// Copies the `written` bytes of a finished write into the ring buffer. Returns the stream
/// offset they were given.
#[inline(always)]
fn capture(p: &mut Pending, written: u64) -> Option<u64> {
    let Some(state) = stream(&p.key, p.fd) else {
        count(counter::UNTRACKED_WRITES, 1);
        return None;
    };
    // SAFETY: a live map value; concurrent writers only ever do atomic adds on it.
    let base = unsafe { fetch_add(&raw mut (*state).offset, written) };
    if base == 0 {
        // A new stream: the writer's stdio says which file is stdout and which stderr.
        note_stdio(p.key.cgroup_id);
    }
    // SAFETY: as above; `mode` is a word user space stores.
    if unsafe { (*state).mode } == STREAM_IGNORE {
        return Some(base);
    }
    if p.uncopied != uncopied::NONE {
        if !emit_uncopied(p, base, written) {
            lose(state, written, 1);
        }
        return Some(base);
    }
    if p.vectored == 0 && written <= CHUNK_BYTES as u64 {
        // One chunk, as most writes are: copied here, without the loop helper's calls.
        if !emit(p, p.buf, written as u32, base) {
            lose(state, written, 1);
        }
        return Some(base);
    }
    p.base = base;
    p.total = written;
    // Stored one by one: plain stores of adjacent zeros become a call to `memset`, a
    // subprogram on the path of every captured write.
    for word in [&mut p.done, &mut p.iov_next, &mut p.iov_len, &mut p.iov_off] {
        // SAFETY: a valid, aligned `u64` of the thread's entry.
        unsafe { core::ptr::write_volatile(word, 0) };
    }
    let chunks = written / CHUNK_BYTES as u64 + 1;
    // Each iovec costs a step to load it and may end in a short chunk of its own.
    let loops = if p.vectored != 0 {
        chunks + 2 * p.count
    } else {
        chunks
    };
    // The callback context must live on the stack; it points at the map value.
    let mut ctx = LoopCtx {
        pending: p as *mut Pending,
    };
    // SAFETY: `copy_chunk` has the callback signature and `ctx` outlives the loop.
    unsafe {
        bpf_loop(
            loops.min(1 << 23) as u32,
            copy_chunk as *mut c_void,
            (&raw mut ctx).cast(),
            0,
        );
    }
    let lost = p.total - p.done.min(p.total);
    if lost > 0 {
        // The loop bound ran out (a writev with more iovecs than it allowed for).
        lose(state, lost, 1);
    }
    Some(base)
}

/// Counts bytes that did not reach the ring buffer, per stream and in total.
fn lose(state: *mut StreamState, bytes: u64, chunks: u64) {
    // SAFETY: a live map value, only updated with atomic adds.
    unsafe {
        fetch_add(&raw mut (*state).lost_bytes, bytes);
        fetch_add(&raw mut (*state).lost_chunks, chunks);
    }
    count(counter::LOST_BYTES, bytes);
    count(counter::LOST_CHUNKS, chunks);
}

/// What `bpf_loop` hands each step (on the caller's stack, as the verifier requires).
#[repr(C)]
struct LoopCtx {
    pending: *mut Pending,
}

/// One `bpf_loop` step: copies the next chunk. Returns 1 to stop the loop.
extern "C" fn copy_chunk(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `LoopCtx` passed to `bpf_loop`, pointing at the thread's entry.
    let p = unsafe { &mut *(*ctx.cast::<LoopCtx>()).pending };
    if p.done >= p.total {
        return 1;
    }
    let left = p.total - p.done;
    let (src, n) = if p.vectored != 0 {
        if p.iov_off >= p.iov_len {
            if p.iov_next >= p.count {
                return 1;
            }
            let iov = if p.vectored == VECTORED_COMPAT {
                let at = p.buf + p.iov_next * core::mem::size_of::<CompatIovec>() as u64;
                // SAFETY: bpf_probe_read_user checks the address.
                let Ok(iov) =
                    (unsafe { aya_ebpf::helpers::bpf_probe_read_user(at as *const CompatIovec) })
                else {
                    return 1;
                };
                Iovec {
                    base: u64::from(iov.base),
                    len: u64::from(iov.len),
                }
            } else {
                let at = p.buf + p.iov_next * core::mem::size_of::<Iovec>() as u64;
                // SAFETY: bpf_probe_read_user checks the address.
                let Ok(iov) =
                    (unsafe { aya_ebpf::helpers::bpf_probe_read_user(at as *const Iovec) })
                else {
                    return 1;
                };
                iov
            };
            p.iov_next += 1;
            p.iov_base = iov.base;
            p.iov_len = iov.len;
            p.iov_off = 0;
            // An empty iovec: the next step loads the one after it.
            return 0;
        }
        let n = (p.iov_len - p.iov_off).min(left);
        (p.iov_base + p.iov_off, n)
    } else {
        (p.buf + p.done, left)
    };
    let n = n.min(CHUNK_BYTES as u64) as u32;
    let offset = p.base + p.done;
    if !emit(p, src, n, offset) {
        if let Some(state) = STREAMS.get_ptr_mut(&p.key) {
            lose(state, u64::from(n), 1);
        }
    }
    p.done += u64::from(n);
    p.iov_off += u64::from(n);
    0
}

/// Puts a record without data into the ring buffer: `written` bytes at `offset` came from a
/// source the programs cannot read, for the reason in `p.uncopied`.
fn emit_uncopied(p: &Pending, offset: u64, written: u64) -> bool {
    // A syscall moves at most MAX_RW_COUNT (INT_MAX rounded down to a page) bytes at a time.
    let Ok(len) = u32::try_from(written) else {
        return false;
    };
    let header = header(p, offset, len, p.uncopied);
    if EVENTS
        .output::<ChunkHeader>(&header, u64::from(BPF_RB_FORCE_WAKEUP))
        .is_err()
    {
        return false;
    }
    count(counter::UNCOPIED_BYTES, written);
    true
}

/// The record header of `len` bytes of `p`'s stream at `offset`.
#[inline(always)]
fn header(p: &Pending, offset: u64, len: u32, uncopied: u32) -> ChunkHeader {
    ChunkHeader {
        cgroup_id: p.key.cgroup_id,
        ino: p.key.ino,
        offset,
        tgid: p.tgid,
        len,
        fd: p.fd,
        kind: p.kind,
        uncopied,
        reserved: 0,
    }
}

/// Puts one chunk into the ring buffer, in the smallest record size class that holds it.
#[inline(always)]
fn emit(p: &Pending, src: u64, n: u32, offset: u64) -> bool {
    match n {
        0..=64 => emit_sized::<64>(p, src, n, offset),
        65..=512 => emit_sized::<512>(p, src, n, offset),
        513..=4096 => emit_sized::<4096>(p, src, n, offset),
        _ => emit_sized::<CHUNK_BYTES>(p, src, n, offset),
    }
}

#[inline(always)]
fn emit_sized<const N: usize>(p: &Pending, src: u64, n: u32, offset: u64) -> bool {
    if n as usize > N {
        return false;
    }
    let Some(mut record) = EVENTS.reserve_bytes(HEADER_BYTES + N, 0) else {
        return false;
    };
    let header = header(p, offset, n, uncopied::NONE);
    let dst = record.as_mut_ptr();
    // SAFETY: the record has room for the header and N bytes; n <= N is checked above.
    let read = unsafe {
        dst.cast::<ChunkHeader>().write_unaligned(header);
        bpf_probe_read_user(dst.add(HEADER_BYTES).cast(), n, src as *const c_void)
    };
    if read != 0 {
        record.discard(0);
        count(counter::FAULTED_BYTES, u64::from(n));
        return false;
    }
    let waiting = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let flags = if waiting >= WAKEUP_BYTES.load() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    record.submit(u64::from(flags));
    count(counter::CAPTURED_BYTES, u64::from(n));
    count(counter::CAPTURED_CHUNKS, 1);
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
