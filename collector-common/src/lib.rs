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

/// The inodes behind fds 1 and 2 of the first task seen writing in a cgroup: what user space
/// falls back on to tell a container's stdout from its stderr when no process is left to look at.
/// Replaced while both are the same file (a terminal, or a shell's `>&2` that dup'ed fd 2 onto 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StdioInodes {
    pub stdout: u64,
    pub stderr: u64,
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
pub const MAP_LAYOUT: u32 = 1;

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
    /// Number of counters.
    pub const COUNT: u32 = 6;
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
    /// `pt_regs` members holding a native syscall's number and first three arguments.
    pub regs_nr: u64,
    pub regs_arg0: u64,
    pub regs_arg1: u64,
    pub regs_arg2: u64,
    /// Native syscall numbers of `write` and `writev` on the running architecture.
    pub nr_write: u64,
    pub nr_writev: u64,
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
