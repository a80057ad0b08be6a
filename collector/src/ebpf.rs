//! Loading and attaching the kernel side, and the maps user space works with.

use std::{fs, os::fd::AsRawFd, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use collector_common::{
    KernelOffsets, STREAM_IGNORE, StdioInodes, StreamKey, StreamState, Verdict,
};

use tokio::io::{Interest, unix::AsyncFd};

use crate::btf;

/// The eBPF object `build.rs` built.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/collector"));

/// The syscall tracepoints the programs attach to (category `syscalls`); the program names are
/// the tracepoint names. Exits first: an entry saved before its exit program is attached would
/// otherwise stay behind.
const TRACEPOINTS: [&str; 4] = [
    "sys_exit_write",
    "sys_exit_writev",
    "sys_enter_write",
    "sys_enter_writev",
];

/// Why the collector cannot run here. Each message is one line saying what is missing.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "missing privileges: loading eBPF programs needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)"
    )]
    Privileges,
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("this collector was built without its eBPF object (AYA_BUILD_SKIP was set)")]
    NoObject,
    #[error("cannot load the eBPF programs: {0}")]
    Load(String),
    #[error("cannot attach to tracepoint syscalls/{tracepoint}: {reason}")]
    Attach {
        tracepoint: &'static str,
        reason: String,
    },
}

/// Settings for [`Probes::load`].
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub ring_bytes: u32,
    /// Wake user space once this many bytes wait in the ring.
    pub wakeup_bytes: u64,
    pub log: bool,
}

/// The loaded, attached programs and the maps user space uses.
pub struct Probes {
    /// Keeps the programs attached.
    pub ebpf: Ebpf,
    pub events: RingBuf<MapData>,
    pub watched: HashMap<MapData, u64, u32>,
    pub generation: Array<MapData, u64>,
    pub streams: HashMap<MapData, StreamKey, StreamState>,
    pub stdio: HashMap<MapData, u64, StdioInodes>,
    pub verdicts: HashMap<MapData, u64, Verdict>,
    pub counters: PerCpuArray<MapData, u64>,
}

/// Whether this process may load tracing programs: CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON,
/// in its effective set.
pub fn privileged() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return false;
    };
    let has = |cap: u32| eff & (1 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

impl Probes {
    /// Checks what the collector needs, loads the programs and attaches them.
    pub fn load(opts: LoadOptions) -> Result<Self, Refusal> {
        if OBJECT.is_empty() {
            return Err(Refusal::NoObject);
        }
        if !privileged() {
            return Err(Refusal::Privileges);
        }
        let offsets: KernelOffsets = btf::kernel_offsets(Path::new(btf::VMLINUX))?;
        let self_tgid = std::process::id();
        // aya-log's level global: 0 turns every log statement into a cheap early return.
        let log_level: u8 = if opts.log { 0xff } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .override_global("SELF_TGID", &self_tgid, true)
            .override_global("OFFSETS", &offsets, true)
            .override_global("WAKEUP_BYTES", &opts.wakeup_bytes, true)
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .map_max_entries("EVENTS", opts.ring_bytes)
            .load(OBJECT)
            .map_err(|e| Refusal::Load(chain(&e)))?;
        if opts.log {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(logger) => spawn_logger(logger),
                Err(e) => tracing::warn!(error = %e, "eBPF log unavailable."),
            }
        }
        for tracepoint in TRACEPOINTS {
            let mut attach = || -> Result<(), String> {
                let program: &mut TracePoint = ebpf
                    .program_mut(tracepoint)
                    .ok_or("program missing from the object")?
                    .try_into()
                    .map_err(|e| chain(&e))?;
                program.load().map_err(|e| chain(&e))?;
                program
                    .attach("syscalls", tracepoint)
                    .map_err(|e| chain(&e))?;
                Ok(())
            };
            attach().map_err(|reason| Refusal::Attach { tracepoint, reason })?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| Refusal::Load(format!("map {name} missing from the object")))
        };
        let events = take("EVENTS")?;
        let watched = take("WATCHED")?;
        let generation = take("GENERATION")?;
        let streams = take("STREAMS")?;
        let counters = take("COUNTERS")?;
        let stdio = take("CGROUP_STDIO")?;
        let verdicts = take("VERDICTS")?;
        let conv = |e: aya::maps::MapError| Refusal::Load(chain(&e));
        Ok(Self {
            events: RingBuf::try_from(events).map_err(conv)?,
            watched: HashMap::try_from(watched).map_err(conv)?,
            generation: Array::try_from(generation).map_err(conv)?,
            streams: HashMap::try_from(streams).map_err(conv)?,
            stdio: HashMap::try_from(stdio).map_err(conv)?,
            verdicts: HashMap::try_from(verdicts).map_err(conv)?,
            counters: PerCpuArray::try_from(counters).map_err(conv)?,
            ebpf,
        })
    }
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes").finish_non_exhaustive()
    }
}

/// The programs' maps that stay with the rest of user space when the ring buffer goes to its
/// reader.
pub struct Maps {
    pub watched: HashMap<MapData, u64, u32>,
    pub generation: Array<MapData, u64>,
    pub streams: HashMap<MapData, StreamKey, StreamState>,
    pub stdio: HashMap<MapData, u64, StdioInodes>,
    pub verdicts: HashMap<MapData, u64, Verdict>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps").finish_non_exhaustive()
    }
}

impl Maps {
    /// Watches the cgroup `id` and everything below it.
    pub fn watch(&mut self, id: u64) -> Result<(), aya::maps::MapError> {
        self.watched.insert(id, 0, 0)?;
        self.bump_generation()
    }

    /// Makes every cached cgroup verdict in the kernel stale.
    fn bump_generation(&mut self) -> Result<(), aya::maps::MapError> {
        let g = self.generation.get(&0, 0)?;
        self.generation.set(0, g + 1, 0)
    }

    /// Has the kernel pass over cgroup `id` (its cached verdict says "not watched") until the
    /// watched set changes or [`Maps::reconsider`], and forget the cgroup's streams `inos`: their
    /// offsets stop counting, so they would be wrong should the cgroup be captured again.
    pub fn pass_over(&mut self, id: u64, inos: impl IntoIterator<Item = u64>) {
        let generation = self.generation.get(&0, 0).unwrap_or(0);
        let verdict = Verdict {
            root: 0,
            generation,
        };
        if let Err(e) = self.verdicts.insert(id, verdict, 0) {
            tracing::warn!(error = %e, "Cannot make the kernel pass over a cgroup.");
        }
        for ino in inos {
            self.forget(&StreamKey { cgroup_id: id, ino });
        }
    }

    /// Has the kernel look again at every cgroup it was told to pass over (their cached verdicts
    /// become stale).
    pub fn reconsider(&mut self) {
        if let Err(e) = self.bump_generation() {
            tracing::warn!(error = %e, "Cannot have the kernel look at passed-over cgroups again.");
        }
    }

    /// The kernel's state of a stream, if it has one.
    pub fn stream(&self, key: &StreamKey) -> Option<StreamState> {
        self.streams.get(key, 0).ok()
    }

    /// Tells the kernel to stop capturing a stream (its offsets keep counting).
    pub fn ignore(&mut self, key: &StreamKey) {
        if let Ok(mut state) = self.streams.get(key, 0) {
            state.mode = STREAM_IGNORE;
            if let Err(e) = self.streams.insert(key, state, 0) {
                tracing::warn!(error = %e, "Cannot mark a stream as ignored.");
            }
        }
    }

    /// Forgets a stream whose cgroup is gone.
    pub fn forget(&mut self, key: &StreamKey) {
        let _ = self.streams.remove(key);
    }

    /// The stdio the kernel saw for a cgroup's first writer.
    pub fn cgroup_stdio(&self, cgroup_id: u64) -> Option<StdioInodes> {
        self.stdio.get(&cgroup_id, 0).ok()
    }

    /// The files of every stream the kernel counts, by cgroup (one scan of the map).
    pub fn streams_by_cgroup(&self) -> std::collections::HashMap<u64, Vec<u64>> {
        let mut by_cgroup: std::collections::HashMap<u64, Vec<u64>> = Default::default();
        for key in self.streams.keys().filter_map(Result::ok) {
            by_cgroup.entry(key.cgroup_id).or_default().push(key.ino);
        }
        by_cgroup
    }

    /// Forgets a cgroup that is gone, and its streams (files `inos`).
    pub fn forget_cgroup(&mut self, cgroup_id: u64, inos: impl IntoIterator<Item = u64>) {
        let _ = self.stdio.remove(&cgroup_id);
        let _ = self.verdicts.remove(&cgroup_id);
        for ino in inos {
            self.forget(&StreamKey { cgroup_id, ino });
        }
    }
}

impl Probes {
    /// Splits into the programs, the ring buffer (for its reader), the maps the reader updates,
    /// and the counters (for metrics).
    pub fn split(self) -> (Ebpf, RingBuf<MapData>, Maps, PerCpuArray<MapData, u64>) {
        let Self {
            ebpf,
            events,
            watched,
            generation,
            streams,
            stdio,
            verdicts,
            counters,
        } = self;
        (
            ebpf,
            events,
            Maps {
                watched,
                generation,
                streams,
                stdio,
                verdicts,
            },
            counters,
        )
    }
}

/// Registers `inner` with the tokio reactor for readability.
pub fn register_readable<T: AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: every `T` used here (aya's ring buffers) owns its map fd, keeps it open until it is
    // dropped, and always returns that same fd from `as_raw_fd`.
    #[expect(
        unsafe_code,
        reason = "tokio's AsyncFd registration is unsafe since 1.54"
    )]
    let fd = unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) };
    fd.map_err(std::io::Error::from)
}

fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        let mut fd = match register_readable(logger) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "eBPF log unavailable.");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
