//! Loading and attaching the kernel side, and the maps user space works with.

use std::{
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, RawTracePoint,
        links::{FdLink, PinnedLink},
    },
};
use collector_common::{
    Cursor, KernelOffsets, MAP_LAYOUT, STREAM_IGNORE, StdioInodes, StreamKey, StreamState, Verdict,
};

use tokio::io::{Interest, unix::AsyncFd};

use crate::btf;

/// The eBPF object `build.rs` built.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/collector"));

/// The raw tracepoints the programs attach to, by name through `BPF_RAW_TRACEPOINT_OPEN` or by
/// BTF id (no tracefs needed, so it works on a host that does not mount it and in a container
/// whose `/sys` lacks it); the program names are the tracepoint names. `io_uring_complete` only
/// where the kernel has io_uring.
const TRACEPOINTS: [&str; 3] = ["sched_process_exec", "io_uring_complete", "sys_exit"];

/// The tracepoints whose programs are BTF-typed (`tp_btf`): their pointer arguments are read
/// with plain loads, which matters where a program runs for every syscall.
const BTF_TYPED: [&str; 1] = ["sys_exit"];

/// The maps shared by every run of the collector on a node when it pins them: all of the
/// programs' state, so that offsets keep counting (and the ring keeps filling) between runs.
const PINNED_MAPS: [&str; 10] = [
    "OWNER",
    "WATCHED",
    "VERDICTS",
    "GENERATION",
    "STREAMS",
    "CGROUP_STDIO",
    "PENDING",
    "EVENTS",
    "COUNTERS",
    "CURSORS",
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
    #[error("cannot pin under {dir}: {reason}")]
    Pin { dir: PathBuf, reason: String },
    #[error("cannot attach to raw tracepoint {tracepoint}: {reason}")]
    Attach {
        tracepoint: &'static str,
        reason: String,
    },
}

/// Settings for [`Probes::load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub ring_bytes: u32,
    /// Wake user space once this many bytes wait in the ring.
    pub wakeup_bytes: u64,
    pub log: bool,
    /// A directory on the BPF filesystem to pin the programs' links and maps under, so they
    /// outlive this process; `None` detaches everything when it exits.
    pub pin_dir: Option<PathBuf>,
}

/// The loaded, attached programs and the maps user space uses.
pub struct Probes {
    /// Keeps the programs attached.
    pub ebpf: Ebpf,
    /// The links pinned for the next run (with `pin_dir`).
    pub links: Vec<PinnedLink>,
    /// Whether the maps were pinned by an earlier run, whose programs were still counting.
    pub resumed: bool,
    pub events: RingBuf<MapData>,
    pub watched: HashMap<MapData, u64, u32>,
    pub generation: Array<MapData, u64>,
    pub streams: HashMap<MapData, StreamKey, StreamState>,
    pub stdio: HashMap<MapData, u64, StdioInodes>,
    pub verdicts: HashMap<MapData, u64, Verdict>,
    pub cursors: HashMap<MapData, StreamKey, Cursor>,
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
        // Tells this load's programs from an earlier collector's, which stay attached (through
        // their pinned links) until this one has taken over.
        let instance: u64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (u64::from(self_tgid) << 40);
        // aya-log's level global: 0 turns every log statement into a cheap early return.
        let log_level: u8 = if opts.log { 0xff } else { 0 };
        // Without pins the collector still captures; it only loses the hand-over between runs,
        // so a node without a BPF filesystem where expected is a warning, not a crash loop.
        let pins = opts
            .pin_dir
            .as_deref()
            .and_then(|dir| match Pins::prepare(dir) {
                Ok(pins) => Some(pins),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "Not pinning: capture stops while no collector runs, and the next one \
                         starts every stream afresh."
                    );
                    None
                }
            });
        let resumed = pins.as_ref().is_some_and(|p| p.map("STREAMS").exists());
        let mut loader = EbpfLoader::new();
        loader
            .override_global("SELF_TGID", &self_tgid, true)
            .override_global("INSTANCE", &instance, true)
            .override_global("OFFSETS", &offsets, true)
            .override_global("WAKEUP_BYTES", &opts.wakeup_bytes, true)
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .map_max_entries("EVENTS", opts.ring_bytes);
        let map_paths: Vec<(&str, PathBuf)> = pins
            .iter()
            .flat_map(|p| PINNED_MAPS.map(|name| (name, p.map(name))))
            .collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| Refusal::Load(chain(&e)))?;
        if opts.log {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(logger) => spawn_logger(logger),
                Err(e) => tracing::warn!(error = %e, "eBPF log unavailable."),
            }
        }
        let mut links = Vec::new();
        let mut link_paths = Vec::new();
        // The types of the BTF-typed tracepoints: the same BTF the offsets came from.
        let kernel_btf = Btf::from_sys_fs().map_err(|e| {
            Refusal::Btf(btf::BtfError::Read {
                path: btf::VMLINUX.to_owned(),
                source: e.into(),
            })
        })?;
        for tracepoint in TRACEPOINTS {
            if tracepoint == "io_uring_complete" && !offsets.has_io_uring() {
                tracing::info!(
                    "The kernel has no io_uring: its writes need no capture, and none is attached."
                );
                continue;
            }
            let mut attach = || -> Result<(), String> {
                let program = ebpf
                    .program_mut(tracepoint)
                    .ok_or("program missing from the object")?;
                let link = if BTF_TYPED.contains(&tracepoint) {
                    let program: &mut BtfTracePoint = program.try_into().map_err(|e| chain(&e))?;
                    program
                        .load(tracepoint, &kernel_btf)
                        .map_err(|e| chain(&e))?;
                    let id = program.attach().map_err(|e| chain(&e))?;
                    pins.as_ref()
                        .map(|_| program.take_link(id).map(FdLink::from))
                        .transpose()
                } else {
                    let program: &mut RawTracePoint = program.try_into().map_err(|e| chain(&e))?;
                    program.load().map_err(|e| chain(&e))?;
                    let id = program.attach(tracepoint).map_err(|e| chain(&e))?;
                    pins.as_ref()
                        .map(|_| program.take_link(id).map(FdLink::from))
                        .transpose()
                }
                .map_err(|e| chain(&e))?;
                if let (Some(pins), Some(link)) = (&pins, link) {
                    // No dots: the BPF filesystem reserves names with dots.
                    let path = pins.links.join(format!("{tracepoint}-{}", pins.instance));
                    links.push(link.pin(&path).map_err(|e| chain(&e))?);
                    link_paths.push(path);
                }
                Ok(())
            };
            attach().map_err(|reason| Refusal::Attach { tracepoint, reason })?;
        }
        // Ours capture from here on, an earlier run's no more: one store switches every event
        // from its programs to ours, so each write is captured exactly once across the handover.
        let mut owner: Array<_, u64> = ebpf
            .map_mut("OWNER")
            .ok_or_else(|| Refusal::Load("map OWNER missing from the object".to_owned()))
            .and_then(|m| Array::try_from(m).map_err(|e| Refusal::Load(chain(&e))))?;
        owner
            .set(0, instance, 0)
            .map_err(|e| Refusal::Load(chain(&e)))?;
        if let Some(pins) = &pins {
            // Those of an earlier run detach as their pins go.
            pins.release_others(&link_paths);
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
        let cursors = take("CURSORS")?;
        let conv = |e: aya::maps::MapError| Refusal::Load(chain(&e));
        Ok(Self {
            events: RingBuf::try_from(events).map_err(conv)?,
            watched: HashMap::try_from(watched).map_err(conv)?,
            generation: Array::try_from(generation).map_err(conv)?,
            streams: HashMap::try_from(streams).map_err(conv)?,
            stdio: HashMap::try_from(stdio).map_err(conv)?,
            verdicts: HashMap::try_from(verdicts).map_err(conv)?,
            cursors: HashMap::try_from(cursors).map_err(conv)?,
            counters: PerCpuArray::try_from(counters).map_err(conv)?,
            ebpf,
            links,
            resumed,
        })
    }
}

/// The pin directory of this map layout: `<dir>/v<MAP_LAYOUT>/{maps,links}`.
struct Pins {
    maps: PathBuf,
    links: PathBuf,
    /// Names this run's links apart from an earlier run's.
    instance: String,
}

impl Pins {
    /// Checks that `dir` is on the BPF filesystem, drops the pins of other map layouts (their
    /// programs detach, their maps go) and creates this layout's directories.
    fn prepare(dir: &Path) -> Result<Self, Refusal> {
        let refuse = |reason: String| Refusal::Pin {
            dir: dir.to_owned(),
            reason,
        };
        // The directory itself may not exist yet: its nearest existing ancestor tells.
        let existing = dir
            .ancestors()
            .find(|d| d.exists())
            .unwrap_or(Path::new("/"));
        let fs = nix::sys::statfs::statfs(existing).map_err(|e| refuse(e.to_string()))?;
        if fs.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
            return Err(refuse(format!(
                "{} is not on a BPF filesystem (mount -t bpf bpf {})",
                existing.display(),
                existing.display()
            )));
        }
        fs::create_dir_all(dir).map_err(|e| refuse(e.to_string()))?;
        let ours = format!("v{MAP_LAYOUT}");
        for entry in fs::read_dir(dir)
            .map_err(|e| refuse(e.to_string()))?
            .flatten()
        {
            if entry.file_name() != ours.as_str() {
                tracing::warn!(
                    pins = %entry.path().display(),
                    "Dropping the pinned programs and maps of another map layout: streams of \
                     running containers continue after what is stored, with fresh offsets."
                );
                if let Err(e) = fs::remove_dir_all(entry.path()) {
                    tracing::warn!(error = %e, "Cannot drop them.");
                }
            }
        }
        let base = dir.join(ours);
        let (maps, links) = (base.join("maps"), base.join("links"));
        for d in [&maps, &links] {
            fs::create_dir_all(d).map_err(|e| refuse(e.to_string()))?;
        }
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Self {
            maps,
            links,
            instance: format!("{}-{}", std::process::id(), since_epoch.as_nanos()),
        })
    }

    fn map(&self, name: &str) -> PathBuf {
        self.maps.join(name)
    }

    /// Unpins every link but `ours`.
    fn release_others(&self, ours: &[PathBuf]) {
        let Ok(entries) = fs::read_dir(&self.links) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if ours.contains(&path) {
                continue;
            }
            tracing::info!(link = %path.display(), "Taking over from an earlier run.");
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(link = %path.display(), error = %e, "Cannot unpin an earlier run's link.");
            }
        }
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
    pub cursors: HashMap<MapData, StreamKey, Cursor>,
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
        let _ = self.cursors.remove(key);
    }

    /// Where an earlier run stood in a stream, if it shipped any of it.
    pub fn cursor(&self, key: &StreamKey) -> Option<Cursor> {
        self.cursors.get(key, 0).ok()
    }

    /// Records where this run stands in a stream.
    pub fn set_cursor(&mut self, key: &StreamKey, cursor: Cursor) {
        if let Err(e) = self.cursors.insert(key, cursor, 0) {
            tracing::warn!(error = %e, "Cannot record a stream's position.");
        }
    }

    /// The stdio the kernel noted for a cgroup: its command's, or its first writer's.
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
    pub fn split(self) -> (Loaded, RingBuf<MapData>, Maps, PerCpuArray<MapData, u64>) {
        let Self {
            ebpf,
            links,
            resumed,
            events,
            watched,
            generation,
            streams,
            stdio,
            verdicts,
            cursors,
            counters,
        } = self;
        (
            Loaded {
                _ebpf: ebpf,
                links,
                resumed,
            },
            events,
            Maps {
                watched,
                generation,
                streams,
                stdio,
                verdicts,
                cursors,
            },
            counters,
        )
    }
}

/// The programs, kept attached while this is alive (and after, when their links are pinned).
pub struct Loaded {
    /// Held for its programs and their links.
    pub _ebpf: Ebpf,
    pub links: Vec<PinnedLink>,
    pub resumed: bool,
}

impl Loaded {
    /// Whether the programs outlive this process: the next run takes over.
    pub fn pinned(&self) -> bool {
        !self.links.is_empty()
    }
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("links", &self.links.len())
            .field("resumed", &self.resumed)
            .finish_non_exhaustive()
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
