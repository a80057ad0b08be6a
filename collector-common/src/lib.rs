//! Types shared by the collector's eBPF programs (`collector-ebpf`) and its user space
//! (`collector`). Everything here is `#[repr(C)]`, `Copy` and free of implicit padding, so both
//! sides agree on the bytes; the `user` feature adds the `aya::Pod` impls user space needs.
#![no_std]

/// Most bytes of user data one ring buffer record carries. A larger write is split into several
/// records by `bpf_loop`, each with its own offset.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// Deepest cgroup level the kernel side walks when it looks for a watched ancestor.
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// The record header in front of every chunk of captured bytes in the ring buffer. The `len`
/// bytes of data follow it directly.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// cgroup v2 id (the directory's inode) of the writing task.
    pub cgroup_id: u64,
    /// Inode number of the file written to: with `cgroup_id` it names the stream.
    pub ino: u64,
    /// Offset of the first byte in the stream (all bytes ever written to it by the cgroup).
    pub offset: u64,
    /// Process (thread group) id of the writer.
    pub tgid: u32,
    /// Bytes of data following the header.
    pub len: u32,
    /// The fd the stream was first written through (1 or 2): a hint for stdout or stderr.
    pub fd: u32,
    /// `FILE_KIND_*` of the file.
    pub kind: u32,
    /// `uncopied::*`: 0 when `len` bytes of data follow; otherwise the syscall put `len` bytes
    /// into the file from a source the programs cannot read (another file, a pipe), no data
    /// follows, and user space reports the range as dropped for this reason.
    pub uncopied: u32,
    /// Explicit padding (the struct stays free of implicit padding).
    pub reserved: u32,
}

/// Why bytes put into a watched file could not be copied: the source of the data is not the
/// writer's memory but a file or pipe the kernel moves pages from, or (io_uring `WRITEV`) it
/// may no longer be where the programs could find it.
pub mod uncopied {
    /// Data follows the header.
    pub const NONE: u32 = 0;
    pub const SENDFILE: u32 = 1;
    pub const SPLICE: u32 = 2;
    pub const TEE: u32 = 3;
    pub const COPY_FILE_RANGE: u32 = 4;
    /// io_uring `WRITEV`/`WRITEV_FIXED`: the iovec array may be reused before the completion.
    pub const URING_WRITEV: u32 = 5;
    pub const URING_SPLICE: u32 = 6;
    pub const URING_TEE: u32 = 7;

    /// The syscall's (or io_uring operation's) name, for metrics and dropped-range reasons.
    pub fn syscall(reason: u32) -> &'static str {
        match reason {
            SENDFILE => "sendfile",
            SPLICE => "splice",
            TEE => "tee",
            COPY_FILE_RANGE => "copy_file_range",
            URING_WRITEV => "io_uring_writev",
            URING_SPLICE => "io_uring_splice",
            URING_TEE => "io_uring_tee",
            _ => "unknown",
        }
    }
}

/// Size of [`ChunkHeader`] in the ring buffer.
pub const HEADER_BYTES: usize = size_of::<ChunkHeader>();

/// The file behind the fd is a pipe or FIFO.
pub const FILE_KIND_FIFO: u32 = 1;
/// The file behind the fd is a character device other than the memory devices (a tty).
pub const FILE_KIND_TTY: u32 = 2;

/// Key of the per-stream state map: a file written by a cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub cgroup_id: u64,
    pub ino: u64,
}

/// Per-stream state kept by the kernel side. All counters only grow and are updated with atomic
/// adds, since writers on several CPUs share them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Bytes written to the stream so far: the offset of the next write.
    pub offset: u64,
    /// Bytes that could not be put into the ring buffer (it was full).
    pub lost_bytes: u64,
    /// Chunks that could not be put into the ring buffer.
    pub lost_chunks: u64,
    /// `STREAM_*`: set by user space once it knows what the stream is.
    pub mode: u32,
    /// The fd the stream was first written through.
    pub fd: u32,
}

/// Not yet looked at by user space: capture.
pub const STREAM_NEW: u32 = 0;
/// A container's stdout or stderr: capture.
pub const STREAM_CAPTURE: u32 = 1;
/// Some other pipe of the container (`a | b` inside it): offsets still count, nothing is captured.
pub const STREAM_IGNORE: u32 = 2;

/// A cgroup's stdout and stderr: the inodes behind fds 1 and 2 of the container's command.
///
/// Taken when a task of the cgroup calls `execve` and is the command (see the exec program):
/// the cgroup's first exec, the same process exec'ing again (runc's init becoming the command,
/// a shell's `exec`), or the first child of an `entrypoint` (ours or Tekton's), which interposes
/// its own pipes. Such a record (`tgid` set) is exact, and the programs then capture only writes
/// to these two files, through whichever fd. A cgroup whose command started before the collector
/// has none: then the first task seen writing fills one in (`tgid` 0), replaced while both are
/// the same file (a terminal, or a shell's `>&2` that dup'ed fd 2 onto 1), and user space
/// decides what each pipe is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StdioInodes {
    /// 0 when fd 1 is not a pipe or terminal (or not open).
    pub stdout: u64,
    pub stderr: u64,
    /// The process the record was taken from; 0 for a first writer's.
    pub tgid: u32,
    /// An `entrypoint` process of the cgroup whose first child is the command, or 0.
    pub entrypoint: u32,
}

impl StdioInodes {
    /// Taken at an exec: exact.
    pub fn exact(&self) -> bool {
        self.tgid != 0
    }
}

/// Cached answer to "which watched cgroup is this task under?" for one cgroup id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The watched ancestor (or the cgroup itself), 0 when none is watched.
    pub root: u64,
    /// The value of the watch generation when this was computed: user space bumps the generation
    /// whenever the watched set changes, which makes every cached verdict stale at once.
    pub generation: u64,
}

/// Where user space stands in a stream it ships: the kernel's bytes `[0, raw)` were handed to
/// the shipper as the stream's bytes `[0, shipped)` (they differ once secret values are
/// redacted). Kept in a map the programs never touch, so that a collector started after another
/// stopped or crashed continues each stream exactly where the bytes it can account for end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub raw: u64,
    pub shipped: u64,
}

/// Version of the maps' layout (names, types, keys, values, what the programs keep in them).
/// Pinned maps are shared across collector restarts only within one version, so bump it with
/// any such change: a collector of another version starts over with fresh maps.
pub const MAP_LAYOUT: u32 = 3;

/// Indexes of the kernel-side counters (a per-CPU array of `u64`).
pub mod counter {
    /// Bytes put into the ring buffer.
    pub const CAPTURED_BYTES: u32 = 0;
    /// Chunks put into the ring buffer.
    pub const CAPTURED_CHUNKS: u32 = 1;
    /// Bytes that did not fit into the ring buffer.
    pub const LOST_BYTES: u32 = 2;
    /// Chunks that did not fit into the ring buffer.
    pub const LOST_CHUNKS: u32 = 3;
    /// Writes from watched cgroups that could not be tracked (stream or argument map full).
    pub const UNTRACKED_WRITES: u32 = 4;
    /// Bytes that could not be read from the writer's memory.
    pub const FAULTED_BYTES: u32 = 5;
    /// Bytes put into watched files from sources the programs cannot read (see `uncopied`).
    pub const UNCOPIED_BYTES: u32 = 6;
    /// Number of counters.
    pub const COUNT: u32 = 7;
}

/// Offsets into kernel structures, read by the loader from the running kernel's BTF and set as
/// read-only globals (aya has no CO-RE relocations for Rust programs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.files`
    pub task_files: u64,
    /// `files_struct.fdt`
    pub files_fdt: u64,
    /// `fdtable.fd`
    pub fdt_fd: u64,
    /// `fdtable.max_fds`
    pub fdt_max_fds: u64,
    /// `file.f_inode`
    pub file_inode: u64,
    /// `inode.i_mode`
    pub inode_mode: u64,
    /// `inode.i_ino`
    pub inode_ino: u64,
    /// `inode.i_rdev`
    pub inode_rdev: u64,
    /// `task_struct.thread_info.status`: where x86 marks a task inside a 32-bit (compat)
    /// syscall, whose numbers and argument registers differ from the native ones.
    pub task_ti_status: u64,
    /// `task_struct.tgid` and `task_struct.real_parent`.
    pub task_tgid: u64,
    pub task_real_parent: u64,
    /// `task_struct.thread_pid`, `pid.level` and `pid.numbers`: the task's pid in its own pid
    /// namespace is `thread_pid->numbers[level].nr`.
    pub task_thread_pid: u64,
    pub pid_level: u64,
    pub pid_numbers: u64,
    /// `pt_regs` members holding a native syscall's number and first three arguments.
    pub regs_nr: u64,
    pub regs_arg0: u64,
    pub regs_arg1: u64,
    pub regs_arg2: u64,
    /// Native numbers on the running architecture of the syscalls that can put bytes into a
    /// pipe or terminal, indexed by `syscall::*`; `u64::MAX` where one does not exist.
    pub nr: [u64; syscall::COUNT],
    /// The same for 32-bit programs (x86's ia32 emulation: another table, arguments in other
    /// registers, iovecs of two 32-bit words); `nr_compat_sendfile` is the older `sendfile`
    /// with a 32-bit offset, beside `sendfile64` in `nr_compat[SENDFILE]`. All `u64::MAX`
    /// where the kernel runs no 32-bit programs.
    pub nr_compat: [u64; syscall::COUNT],
    pub nr_compat_sendfile: u64,
    /// `pt_regs` members holding a 32-bit syscall's first three arguments.
    pub regs_compat_arg0: u64,
    pub regs_compat_arg1: u64,
    pub regs_compat_arg2: u64,
    /// `io_kiocb.file`, `io_kiocb.opcode`, `io_kiocb.cqe.res` and `io_kiocb.cmd` (where a
    /// read or write request keeps its `struct io_rw`), and `io_rw.addr` and `io_rw.len`.
    /// All `u64::MAX` on a kernel without io_uring, whose program is then not attached.
    pub uring_req_file: u64,
    pub uring_req_opcode: u64,
    pub uring_req_res: u64,
    pub uring_req_cmd: u64,
    pub uring_rw_addr: u64,
    pub uring_rw_len: u64,
}

impl KernelOffsets {
    /// Whether the running kernel has io_uring (its request type is in the BTF).
    pub fn has_io_uring(&self) -> bool {
        self.uring_req_opcode != u64::MAX
    }
}

/// The syscalls the programs watch: indexes into [`KernelOffsets::nr`].
///
/// `pwrite64` and `pwritev` are not among them: on a pipe or terminal they fail with `ESPIPE`
/// before writing anything (`pwritev2` with offset -1 is `writev` and is watched).
pub mod syscall {
    /// `write(fd, buf, count)`: copied.
    pub const WRITE: usize = 0;
    /// `writev(fd, iov, iovcnt)`: copied.
    pub const WRITEV: usize = 1;
    /// `pwritev2(fd, iov, iovcnt, -1, flags)`: copied.
    pub const PWRITEV2: usize = 2;
    /// `vmsplice(fd, iov, nr_segs, flags)`: the pages of the caller's memory, copied.
    pub const VMSPLICE: usize = 3;
    /// `sendfile(out_fd, in_fd, offset, count)`: from a file, not copied.
    pub const SENDFILE: usize = 4;
    /// `splice(fd_in, off_in, fd_out, off_out, len, flags)`: not copied.
    pub const SPLICE: usize = 5;
    /// `tee(fd_in, fd_out, len, flags)`: not copied.
    pub const TEE: usize = 6;
    /// `copy_file_range(fd_in, off_in, fd_out, off_out, len, flags)`: not copied (the kernel
    /// refuses pipes and terminals as its target, so this only ever counts).
    pub const COPY_FILE_RANGE: usize = 7;
    /// Number of watched syscalls.
    pub const COUNT: usize = 8;
}

#[cfg(feature = "user")]
#[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
mod user {
    // SAFETY: all of these are `#[repr(C)]` structs of integers without padding, valid for any
    // bit pattern.
    unsafe impl aya::Pod for super::ChunkHeader {}
    unsafe impl aya::Pod for super::StreamKey {}
    unsafe impl aya::Pod for super::StreamState {}
    unsafe impl aya::Pod for super::Verdict {}
    unsafe impl aya::Pod for super::StdioInodes {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::Cursor {}
}
