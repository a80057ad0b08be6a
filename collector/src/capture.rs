//! From ring buffer records to shipped streams.
//!
//! The [`Engine`] is owned by the ring buffer reader task. For each chunk it finds the stream
//! (cgroup, file), attributes a new cgroup to a container and log context, decides whether the
//! file is the container's stdout, stderr or some other pipe, and hands the bytes to that stream's
//! [`Shipper`] in offset order. Offsets come from the kernel, so a gap is exact: chunks of one
//! stream written concurrently on two CPUs may arrive out of order and wait briefly for each
//! other; a gap that stays open is a chunk the kernel could not put into the ring, and becomes a
//! `dropped` range. When a container's cgroup has no process left, its streams get their final
//! length from the kernel's offset counter.
//!
//! # Redaction
//!
//! Secret values are redacted as the entrypoint does (the `redact` crate), so both paths store
//! the same bytes at the same offsets. The values come from the container's own environment
//! (`/proc/PID/environ` of its oldest process, read when the cgroup is attributed; no access to
//! Secrets needed): the variables `RELAY_REDACT_ENV` names there, as the operator's webhook set
//! it, and in Kubernetes mode those the pod spec takes from Secrets ([`Target::redact_env`]),
//! for containers the webhook does not wrap. Each stream's redactor sits
//! between the kernel offsets (raw: `Stream::next`, reordering, gaps) and the shipper, whose
//! offsets are redacted ones. A gap (a chunk the kernel could not put into the ring) goes
//! through [`redact::Redactor::gap`]: the raw gap plus a held tail that might start a value is
//! reported as dropped. Offsets after it agree with the entrypoint's unless a value occurred in
//! or across the gap (see the `redact` crate). A container whose processes were all gone before
//! its first chunk was attributed has no environment left to read: its output is shipped
//! unredacted, with a warning.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use client::{Client, ShipConfig, Shipper, StreamSpec};
use collector_common::{ChunkHeader, Cursor, HEADER_BYTES, StreamKey, uncopied};
use contract::{reason::DropReason, source::Source};
use redact::{Redactor, Secrets};

use crate::{
    attribution::cgroups::{self, Role, Stdio},
    ebpf::Maps,
    metrics::Metrics,
};

/// How long a chunk that arrived ahead of its predecessor waits for it before the gap counts as
/// lost. Chunks are reserved in the ring in nearly the order their offsets were taken, so this
/// only has to cover two CPUs racing between the two.
const REORDER_WAIT: Duration = Duration::from_millis(50);
/// Most bytes held waiting for an earlier chunk before the gap counts as lost.
const EARLY_MAX: usize = 4 << 20;
/// How often cgroups with open streams are checked for processes left.
const SWEEP_EVERY: Duration = Duration::from_millis(200);
/// Every this many sweeps, the kernel's streams are checked for cgroups never seen.
const UNSEEN_EVERY: u64 = 25;
/// Most bytes held per cgroup while it waits for attribution.
const HOLD_BYTES: usize = 4 << 20;

/// Where a container cgroup's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub context: String,
    /// Put in front of `stdout`/`stderr` in stream names (empty, or ending in `.`).
    pub prefix: String,
    /// The cgroup directory.
    pub dir: PathBuf,
    /// Variables holding secret values besides those the container's own `RELAY_REDACT_ENV`
    /// names (a `redact::EnvSelector` list; from the pod spec in Kubernetes mode).
    pub redact_env: String,
    /// Why the container has no entrypoint streams, from the pod spec in Kubernetes mode (see
    /// [`entrypoint_absent`]).
    pub entrypoint_absent: Option<&'static str>,
    /// The pod's name in Kubernetes mode, recorded with its streams (reads of a trigger select a
    /// replica by it).
    pub pod: Option<String>,
}

/// The answer to "whose is this cgroup?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attributed {
    Target(Target),
    /// Not known yet (a cgroup created since the last scan, a pod not seen yet); ask again soon.
    NotYet,
    /// Not a container whose output is captured: the kernel is told to pass it over.
    Never,
}

/// Maps cgroup ids to containers: local directories or Kubernetes pods.
pub trait Attributor: Send {
    fn attribute(&mut self, cgroup_id: u64) -> Attributed;
    fn forget(&mut self, cgroup_id: u64);
    /// Whether cgroups that were not attributable may be now (more pods are selected than when
    /// this was last asked), so that the ones the kernel was told to pass over must be looked at
    /// again.
    fn reconsider(&mut self) -> bool {
        false
    }
}

/// One container stream being shipped.
#[derive(Debug)]
struct Stream {
    shipper: Shipper,
    /// Between the kernel's raw bytes and the shipper's redacted ones.
    redactor: Redactor,
    /// Kernel offset of the next byte to hand to the redactor.
    next: u64,
    /// Chunks that arrived before their predecessors, by offset.
    early: BTreeMap<u64, Piece<'static>>,
    /// Bytes of data in `early`.
    early_bytes: usize,
    gap_since: Option<Instant>,
    /// The position last recorded in the kernel's cursor map.
    cursor: Option<Cursor>,
    /// Set when the stream ends because its container is gone (not because we stop): the API is
    /// then asked to settle the other path's stream of it, whose writer died with the container.
    gone: Arc<AtomicBool>,
}

impl Stream {
    /// Where this stream stands: kernel bytes up to the redactor's held tail, and the stream
    /// offset they were shipped to. `None` until the shipper knows its base.
    fn position(&self) -> Option<Cursor> {
        Some(Cursor {
            raw: self.next - self.redactor.held() as u64,
            shipped: self.shipper.base()? + self.shipper.offset(),
        })
    }
}

/// A cgroup the engine has seen.
#[derive(Debug)]
struct Cgroup {
    target: Target,
    stdio: Option<Stdio>,
    /// The container's secret values.
    secrets: Arc<Secrets>,
    /// Files seen, and what they are.
    files: HashMap<u64, Role>,
}

/// Chunks of a cgroup waiting for attribution.
#[derive(Debug)]
struct Held {
    since: Instant,
    bytes: usize,
    chunks: Vec<(ChunkHeader, Vec<u8>)>,
}

/// Settings of the [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub ship: ShipConfig,
    pub grace: Duration,
    pub hold: Duration,
    /// On shutdown, leave the streams of running containers open for the next run to continue
    /// (the programs stay attached, pinned); otherwise end them at their kernel offsets.
    pub leave_open: bool,
}

#[derive(Debug)]
pub struct Engine<A> {
    cfg: EngineConfig,
    maps: Maps,
    attributor: A,
    client: Arc<Client>,
    metrics: Arc<Metrics>,
    cgroups: HashMap<u64, Cgroup>,
    streams: HashMap<StreamKey, Stream>,
    held: HashMap<u64, Held>,
    last_sweep: Instant,
    sweeps: u64,
    shippers: tokio::task::JoinSet<()>,
}

/// What one record puts at its offset in a stream: borrowed from the ring, or owned while it
/// waits for its predecessors.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Bytes(Cow<'a, [u8]>),
    /// `len` bytes the kernel moved from another file or pipe (`uncopied::*` says how): they
    /// are in the container's output, but not in the ring, and are reported as dropped.
    Uncopied {
        len: u64,
        reason: u32,
    },
}

impl<'a> Piece<'a> {
    fn of(h: &ChunkHeader, data: &'a [u8]) -> Self {
        if h.uncopied == uncopied::NONE {
            Self::Bytes(Cow::Borrowed(data))
        } else {
            Self::Uncopied {
                len: u64::from(h.len),
                reason: h.uncopied,
            }
        }
    }

    /// Stream bytes it covers.
    fn len(&self) -> u64 {
        match self {
            Self::Bytes(b) => b.len() as u64,
            Self::Uncopied { len, .. } => *len,
        }
    }

    /// Memory it holds.
    fn held(&self) -> usize {
        match self {
            Self::Bytes(b) => b.len(),
            Self::Uncopied { .. } => 0,
        }
    }

    fn into_owned(self) -> Piece<'static> {
        match self {
            Self::Bytes(b) => Piece::Bytes(Cow::Owned(b.into_owned())),
            Self::Uncopied { len, reason } => Piece::Uncopied { len, reason },
        }
    }
}

/// Splits a ring buffer record into its header and data (none for an uncopied range).
pub fn parse(record: &[u8]) -> Option<(ChunkHeader, &[u8])> {
    let u64_at = |i: usize| {
        record
            .get(i..i + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    let u32_at = |i: usize| {
        record
            .get(i..i + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    let header = ChunkHeader {
        cgroup_id: u64_at(0)?,
        ino: u64_at(8)?,
        offset: u64_at(16)?,
        tgid: u32_at(24)?,
        len: u32_at(28)?,
        fd: u32_at(32)?,
        kind: u32_at(36)?,
        uncopied: u32_at(40)?,
        reserved: u32_at(44)?,
    };
    let data = if header.uncopied == uncopied::NONE {
        record.get(HEADER_BYTES..HEADER_BYTES + header.len as usize)?
    } else {
        &[]
    };
    Some((header, data))
}

impl<A: Attributor> Engine<A> {
    pub fn new(
        cfg: EngineConfig,
        maps: Maps,
        attributor: A,
        client: Arc<Client>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            cfg,
            maps,
            attributor,
            client,
            metrics,
            cgroups: HashMap::new(),
            streams: HashMap::new(),
            held: HashMap::new(),
            last_sweep: Instant::now(),
            sweeps: 0,
            shippers: tokio::task::JoinSet::new(),
        }
    }

    /// Watches a cgroup (and everything below it) in the kernel.
    pub fn watch(&mut self, cgroup_id: u64) -> Result<(), aya::maps::MapError> {
        self.maps.watch(cgroup_id)
    }

    /// Takes one ring buffer record.
    pub fn record(&mut self, record: &[u8]) {
        match parse(record) {
            Some((header, data)) => self.chunk(header, data),
            None => tracing::warn!(len = record.len(), "Malformed ring buffer record."),
        }
    }

    fn chunk(&mut self, h: ChunkHeader, data: &[u8]) {
        let key = StreamKey {
            cgroup_id: h.cgroup_id,
            ino: h.ino,
        };
        let piece = Piece::of(&h, data);
        if let Some(stream) = self.streams.get_mut(&key) {
            feed(stream, h.offset, piece);
            return;
        }
        if let Some(held) = self.held.get_mut(&h.cgroup_id) {
            hold(held, h, data, &self.metrics);
            return;
        }
        if !self.cgroups.contains_key(&h.cgroup_id) {
            match self.attributor.attribute(h.cgroup_id) {
                Attributed::Target(target) => self.adopt(h.cgroup_id, target),
                Attributed::Never => {
                    self.pass_over(h.cgroup_id, piece.len() as usize, [h.ino]);
                    return;
                }
                Attributed::NotYet => {
                    let held = self.held.entry(h.cgroup_id).or_insert_with(|| Held {
                        since: Instant::now(),
                        bytes: 0,
                        chunks: Vec::new(),
                    });
                    hold(held, h, data, &self.metrics);
                    return;
                }
            }
        }
        if self.role(key, h.fd) == Role::Other {
            self.metrics.other_pipe_bytes.inc_by(piece.len());
            self.maps.ignore(&key);
            return;
        }
        if let Some(stream) = self.open(key) {
            feed(stream, h.offset, piece);
        }
    }

    /// Starts following an attributed cgroup.
    fn adopt(&mut self, cgroup_id: u64, mut target: Target) {
        let stdio = cgroups::container_stdio(&target.dir);
        let environ = cgroups::container_environ(&target.dir);
        let secrets = container_secrets(cgroup_id, &target, environ.as_deref());
        // The pod spec tells in Kubernetes mode; otherwise the environment of a process still
        // running, if any.
        if target.entrypoint_absent.is_none() {
            target.entrypoint_absent = environ
                .as_deref()
                .and_then(|e| entrypoint_absent(redact::environ_vars(e)));
        }
        self.cgroups.insert(
            cgroup_id,
            Cgroup {
                target,
                stdio,
                secrets,
                files: HashMap::new(),
            },
        );
    }

    /// What file `key` is to its (adopted) container, deciding it on first sight.
    fn role(&mut self, key: StreamKey, fd: u32) -> Role {
        let Some(cgroup) = self.cgroups.get_mut(&key.cgroup_id) else {
            return Role::Other;
        };
        if let Some(role) = cgroup.files.get(&key.ino) {
            return *role;
        }
        let taken: Vec<Role> = cgroup.files.values().copied().collect();
        // The kernel's record of the command's stdio, taken at its exec, is exact; the oldest
        // process's fds come next (a command started before the collector); the first writer's
        // last (all of them may be gone).
        let kernel = self.maps.cgroup_stdio(key.cgroup_id);
        let stdio = kernel
            .filter(|s| s.exact())
            .map(|s| Stdio {
                stdout: s.stdout,
                stderr: s.stderr,
            })
            .or(cgroup.stdio)
            .or_else(|| {
                kernel.filter(|s| s.stdout != s.stderr).map(|s| Stdio {
                    stdout: s.stdout,
                    stderr: s.stderr,
                })
            });
        let role = role_of(stdio, &taken, key.ino, fd);
        tracing::debug!(
            cgroup_id = key.cgroup_id,
            ino = key.ino,
            fd,
            ?role,
            "New file."
        );
        cgroup.files.insert(key.ino, role);
        role
    }

    /// Opens the stream of a container's stdout or stderr and starts shipping it.
    fn open(&mut self, key: StreamKey) -> Option<&mut Stream> {
        let cgroup = self.cgroups.get(&key.cgroup_id)?;
        let role = *cgroup.files.get(&key.ino)?;
        let spec = StreamSpec {
            name: format!("{}{}", cgroup.target.prefix, role.stream_name()),
            source: Some(Source::Ebpf),
            context: Some(cgroup.target.context.clone()),
            entrypoint_absent: cgroup.target.entrypoint_absent.map(str::to_owned),
            pod: cgroup.target.pod.clone(),
        };
        let redactor = Redactor::new(cgroup.secrets.clone());
        let shipper = Shipper::new(self.cfg.ship.clone());
        // A stream an earlier run shipped continues where the bytes it can account for end;
        // what it held beyond that is reported as dropped, by it (the gap up to our first
        // chunk) and by the shipper (what the API never got below our base).
        let cursor = self.maps.cursor(&key);
        if let Some(c) = cursor {
            tracing::info!(
                cgroup_id = key.cgroup_id,
                stream = %spec.name,
                raw = c.raw,
                shipped = c.shipped,
                "Continuing a stream an earlier run shipped."
            );
            shipper.resume_at(c.shipped);
        }
        let gone = Arc::new(AtomicBool::new(false));
        {
            let shipper = shipper.clone();
            let client = self.client.clone();
            let metrics = self.metrics.clone();
            let gone = gone.clone();
            self.metrics.streams_open.inc();
            self.shippers.spawn(async move {
                let report = shipper.run(client.clone(), spec).await;
                if gone.load(Ordering::Relaxed)
                    && report.final_declared
                    && let Some(id) = &report.id
                    && let Err(e) = client.settle(id).await
                {
                    tracing::warn!(
                        stream = %report.name,
                        error = %e,
                        "Cannot have the entrypoint's stream of a finished container settled."
                    );
                }
                tracing::info!(
                    stream = %report.name,
                    stored = report.stored,
                    dropped = report.dropped,
                    lost = report.lost(),
                    "Stream finished."
                );
                metrics.finished(&report);
            });
        }
        Some(self.streams.entry(key).or_insert(Stream {
            shipper,
            redactor,
            next: cursor.map_or(0, |c| c.raw),
            early: BTreeMap::new(),
            early_bytes: 0,
            gap_since: None,
            cursor,
            gone,
        }))
    }

    /// Adopts cgroups the kernel has streams for but user space never saw a chunk of (the ring
    /// was full for all of them), so that their losses are reported too.
    fn adopt_unseen(&mut self) {
        let unseen: Vec<(u64, Vec<u64>)> = self
            .maps
            .streams_by_cgroup()
            .into_iter()
            .filter(|(id, _)| !self.cgroups.contains_key(id) && !self.held.contains_key(id))
            .collect();
        for (cgroup_id, inos) in unseen {
            match self.attributor.attribute(cgroup_id) {
                Attributed::Target(target) => self.adopt(cgroup_id, target),
                Attributed::Never => self.pass_over(cgroup_id, 0, inos),
                Attributed::NotYet => {}
            }
        }
    }

    /// Timers: gaps that stayed open, held cgroups, finished containers; and a selection that
    /// grew.
    pub fn tick(&mut self, now: Instant) {
        if self.attributor.reconsider() {
            tracing::debug!("More containers may be attributable: the kernel looks at all again.");
            self.maps.reconsider();
        }
        for stream in self.streams.values_mut() {
            if stream.gap_since.is_some_and(|t| now >= t + REORDER_WAIT) {
                close_gap(stream);
            }
            // The ring was just drained: what the redactor holds back waits for nothing but the
            // rest of a possible value.
            if stream.redactor.held() > 0 {
                let shipper = &stream.shipper;
                stream.redactor.flush_idle(|b| {
                    shipper.write(b);
                });
            }
        }
        self.record_positions();
        let waiting: Vec<u64> = self.held.keys().copied().collect();
        for cgroup_id in waiting {
            match self.attributor.attribute(cgroup_id) {
                Attributed::NotYet => {
                    let expired = self
                        .held
                        .get(&cgroup_id)
                        .is_some_and(|h| now >= h.since + self.cfg.hold);
                    if expired && let Some(held) = self.held.remove(&cgroup_id) {
                        tracing::warn!(
                            cgroup_id,
                            bytes = held.bytes,
                            "cgroup not attributed in time; its bytes are dropped."
                        );
                        self.pass_over(cgroup_id, held.bytes, held.inos());
                    }
                }
                Attributed::Never => {
                    if let Some(held) = self.held.remove(&cgroup_id) {
                        self.pass_over(cgroup_id, held.bytes, held.inos());
                    }
                }
                Attributed::Target(_) => {
                    // Replay: with the hold gone, `chunk` attributes the cgroup again.
                    if let Some(held) = self.held.remove(&cgroup_id) {
                        for (h, data) in held.chunks {
                            self.chunk(h, &data);
                        }
                    }
                }
            }
        }
        if now >= self.last_sweep + SWEEP_EVERY {
            self.last_sweep = now;
            self.sweeps += 1;
            if self.sweeps.is_multiple_of(UNSEEN_EVERY) {
                self.adopt_unseen();
            }
            self.sweep();
        }
    }

    /// Drops `bytes` of a cgroup that is not (or could not be) attributed, and has the kernel pass
    /// it over from now on and forget its streams `inos`: should the cgroup become attributable
    /// (its namespace selected later), its streams start afresh at offset 0.
    fn pass_over(&mut self, cgroup_id: u64, bytes: usize, inos: impl IntoIterator<Item = u64>) {
        self.metrics.attribution_miss_bytes.inc_by(bytes as u64);
        self.maps.pass_over(cgroup_id, inos);
    }

    /// Finishes the streams of containers that have no process left. The caller drained the ring
    /// buffer just before, and a cgroup with no process cannot write any more: every chunk of it
    /// has been seen, and the kernel's offset counter is the final length.
    fn sweep(&mut self) {
        let gone: Vec<u64> = self
            .cgroups
            .iter()
            .filter(|(_, c)| !cgroups::populated(&c.target.dir))
            .map(|(id, _)| *id)
            .collect();
        if gone.is_empty() {
            return;
        }
        let mut kernel = self.maps.streams_by_cgroup();
        for cgroup_id in gone {
            let inos = kernel.remove(&cgroup_id).unwrap_or_default();
            self.finish_cgroup(cgroup_id, &inos, true);
        }
    }

    /// Closes the streams of a container; `kernel_inos` are the files the kernel counted for it.
    /// `gone`: it has no process left (rather than: we are stopping).
    fn finish_cgroup(&mut self, cgroup_id: u64, kernel_inos: &[u64], gone: bool) {
        // Streams of the cgroup whose every chunk was lost have no file entry yet.
        for &ino in kernel_inos {
            let key = StreamKey { cgroup_id, ino };
            if self
                .cgroups
                .get(&cgroup_id)
                .is_some_and(|c| !c.files.contains_key(&ino))
                && let Some(state) = self.maps.stream(&key)
                && self.role(key, state.fd) != Role::Other
            {
                self.open(key);
            }
        }
        let Some(cgroup) = self.cgroups.remove(&cgroup_id) else {
            return;
        };
        let deadline = Instant::now() + self.cfg.grace;
        for ino in cgroup.files.keys() {
            let key = StreamKey {
                cgroup_id,
                ino: *ino,
            };
            let Some(mut stream) = self.streams.remove(&key) else {
                continue;
            };
            while !stream.early.is_empty() {
                close_gap(&mut stream);
            }
            if let Some(state) = self.maps.stream(&key)
                && state.offset > stream.next
            {
                // The kernel counted these bytes but the ring (drained just before) never held
                // them.
                let missing = state.offset - stream.next;
                skip(&mut stream, missing, DropReason::KernelLost);
            }
            let shipper = &stream.shipper;
            stream.redactor.finish(|b| {
                shipper.write(b);
            });
            stream.gone.store(gone, Ordering::Relaxed);
            stream.shipper.close(deadline);
        }
        self.maps
            .forget_cgroup(cgroup_id, cgroup.files.keys().copied());
        self.attributor.forget(cgroup_id);
        tracing::debug!(cgroup_id, dir = %cgroup.target.dir.display(), "Container finished.");
    }

    /// Records in the kernel's cursor map where each stream stands, for a run after this one.
    fn record_positions(&mut self) {
        for (key, stream) in &mut self.streams {
            let Some(at) = stream.position() else {
                continue;
            };
            if stream.cursor != Some(at) {
                self.maps.set_cursor(key, at);
                stream.cursor = Some(at);
            }
        }
    }

    /// The collector is stopping: ends the streams of finished containers and, unless they are
    /// left open for the next run, of running ones too; then waits for the shippers until the
    /// grace period ends.
    pub async fn shutdown(mut self) {
        let mut kernel = self.maps.streams_by_cgroup();
        let ids: Vec<u64> = self.cgroups.keys().copied().collect();
        let deadline = Instant::now() + self.cfg.grace;
        for id in ids {
            let running = self
                .cgroups
                .get(&id)
                .is_some_and(|c| cgroups::populated(&c.target.dir));
            if self.cfg.leave_open && running {
                self.leave_cgroup(id, deadline);
                continue;
            }
            let inos = kernel.remove(&id).unwrap_or_default();
            self.finish_cgroup(id, &inos, !running);
        }
        self.record_positions();
        let wait = async { while self.shippers.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(self.cfg.grace + Duration::from_secs(1), wait).await;
    }

    /// Stops shipping a running container's streams without ending them: bytes waiting behind
    /// a gap go out (the gap is reported), what the redactor holds back does not (the next run
    /// reports it with the rest of its gap: it may be the start of a secret value).
    fn leave_cgroup(&mut self, cgroup_id: u64, deadline: Instant) {
        let Some(cgroup) = self.cgroups.get(&cgroup_id) else {
            return;
        };
        for ino in cgroup.files.keys() {
            let key = StreamKey {
                cgroup_id,
                ino: *ino,
            };
            let Some(stream) = self.streams.get_mut(&key) else {
                continue;
            };
            while !stream.early.is_empty() {
                close_gap(stream);
            }
            stream.shipper.leave_open(deadline);
        }
    }

    /// Reaps finished shipper tasks.
    pub fn reap(&mut self) {
        while self.shippers.try_join_next().is_some() {}
    }
}

/// What the file `ino` is to a container whose stdio is `stdio` (when known: from its oldest
/// process, or else from its first writer as the kernel saw it), given the roles its other files
/// have. Without stdio the fd of the write decides, and a role already taken makes the file an
/// "other" pipe.
fn role_of(stdio: Option<Stdio>, taken: &[Role], ino: u64, fd: u32) -> Role {
    let role = match stdio {
        Some(s) => s.role(ino),
        None if fd == 2 => Role::Stderr,
        None => Role::Stdout,
    };
    if role != Role::Other && taken.contains(&role) {
        Role::Other
    } else {
        role
    }
}

/// The secret values of the container in an attributed cgroup, from its environment.
fn container_secrets(cgroup_id: u64, target: &Target, environ: Option<&[u8]>) -> Arc<Secrets> {
    let Some(environ) = environ else {
        tracing::warn!(
            cgroup_id,
            dir = %target.dir.display(),
            secret_env = %target.redact_env,
            "No process left to read the container's environment from; its output is not redacted."
        );
        return Arc::new(Secrets::none());
    };
    let extra = redact::EnvSelector::parse(&target.redact_env);
    match Secrets::from_environ_with(environ, &extra) {
        Ok(s) => {
            if !s.is_empty() {
                tracing::debug!(cgroup_id, values = s.len(), "Redacting secret values.");
            }
            Arc::new(s)
        }
        Err(e) => {
            tracing::warn!(cgroup_id, error = %e, "Cannot redact; the container's output is not redacted.");
            Arc::new(Secrets::none())
        }
    }
}

/// Why a container whose variables are `vars` (name, value) has no entrypoint streams, when they
/// tell: a Tekton hermetic step, which the webhook leaves alone because Tekton runs its command
/// without a network (`TEKTON_HERMETIC=1`, tektoncd/pipeline `cmd/entrypoint/runner.go`), or a
/// container without the variable the webhook gives every container it wraps.
pub fn entrypoint_absent<'a>(
    mut vars: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
) -> Option<&'static str> {
    if vars
        .clone()
        .any(|(name, value)| name == b"TEKTON_HERMETIC" && value == b"1")
    {
        return Some(
            "a Tekton hermetic step: its command runs without a network, so it is not wrapped \
             and the collector is its only capture path",
        );
    }
    let wrapped = vars.any(|(name, _)| name == contract::env::METADATA_API_URL.as_bytes());
    (!wrapped).then_some(
        "the container does not run under the entrypoint (a sidecar, an init container, a pod \
         admitted without injection, or a container the webhook skipped: see its \
         skipped_containers metric)",
    )
}

impl Held {
    /// The files the held chunks were written to.
    fn inos(&self) -> Vec<u64> {
        let mut inos: Vec<u64> = self.chunks.iter().map(|(h, _)| h.ino).collect();
        inos.sort_unstable();
        inos.dedup();
        inos
    }
}

fn hold(held: &mut Held, h: ChunkHeader, data: &[u8], metrics: &Metrics) {
    if held.bytes + data.len() > HOLD_BYTES {
        metrics.attribution_miss_bytes.inc_by(data.len() as u64);
        return;
    }
    held.bytes += data.len();
    held.chunks.push((h, data.to_vec()));
}

/// Hands a chunk to the stream in offset order.
fn feed(stream: &mut Stream, offset: u64, piece: Piece<'_>) {
    if offset == stream.next {
        place(stream, piece);
        while let Some(entry) = stream.early.first_entry() {
            if *entry.key() != stream.next {
                break;
            }
            let early = entry.remove();
            stream.early_bytes -= early.held();
            place(stream, early);
        }
        stream.gap_since = if stream.early.is_empty() {
            None
        } else {
            stream.gap_since.or(Some(Instant::now()))
        };
    } else if offset > stream.next {
        let early = piece.into_owned();
        stream.early_bytes += early.held();
        stream.early.insert(offset, early);
        stream.gap_since.get_or_insert_with(Instant::now);
        // A chunk this far behind the ones arriving is lost, not late: stop holding them.
        if stream.early_bytes > EARLY_MAX {
            close_gap(stream);
        }
    } else {
        tracing::warn!(
            offset,
            next = stream.next,
            "Chunk behind the stream; ignored."
        );
    }
}

/// Puts the piece at the stream's next offset.
fn place(stream: &mut Stream, piece: Piece<'_>) {
    match piece {
        Piece::Bytes(data) => put(stream, &data),
        Piece::Uncopied { len, reason } => {
            tracing::debug!(
                bytes = len,
                syscall = uncopied::syscall(reason),
                "Bytes moved into the container's output by the kernel, not copied: dropped."
            );
            skip(stream, len, DropReason::NotCopied);
        }
    }
}

fn put(stream: &mut Stream, data: &[u8]) {
    let shipper = &stream.shipper;
    stream.redactor.feed(data, |b| {
        shipper.write(b);
    });
    stream.next += data.len() as u64;
}

/// Accounts for `raw` bytes the collector never got at the stream's end: a dropped range of their
/// redacted length (see the module docs), for `reason`.
fn skip(stream: &mut Stream, raw: u64, reason: DropReason) {
    let shipper = &stream.shipper;
    let dropped = stream.redactor.gap(raw, |b| {
        shipper.write(b);
    });
    stream.shipper.skip(dropped, reason);
    stream.next += raw;
}

/// Gives up on the bytes before the first early chunk: they are reported as dropped.
fn close_gap(stream: &mut Stream) {
    let Some((&offset, _)) = stream.early.first_key_value() else {
        stream.gap_since = None;
        return;
    };
    // The chunks in between never arrived: the kernel could not put them into the ring.
    skip(stream, offset - stream.next, DropReason::KernelLost);
    if let Some(early) = stream.early.remove(&offset) {
        stream.early_bytes -= early.held();
        feed(stream, offset, early);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_tells_why_a_container_has_no_entrypoint_streams() {
        let absent = |environ: &[u8]| entrypoint_absent(redact::environ_vars(environ));
        let wrapped = b"PATH=/bin\0RELAY_METADATA_API_URL=http://api\0HOME=/";
        assert_eq!(absent(wrapped), None);
        let hermetic = b"RELAY_METADATA_API_URL=http://api\0TEKTON_HERMETIC=1\0";
        assert!(absent(hermetic).is_some_and(|w| w.contains("hermetic")));
        // Only the exact value 1 makes Tekton drop the network.
        let not_hermetic = b"RELAY_METADATA_API_URL=x\0TEKTON_HERMETIC=0";
        assert_eq!(absent(not_hermetic), None);
        let plain = b"PATH=/bin\0XRELAY_METADATA_API_URL=x";
        assert!(absent(plain).is_some_and(|w| w.contains("does not run under")));
    }

    #[test]
    fn records_parse_and_short_ones_do_not() {
        let h = ChunkHeader {
            cgroup_id: 7,
            ino: 9,
            offset: 100,
            tgid: 42,
            len: 3,
            fd: 2,
            kind: 1,
            uncopied: uncopied::NONE,
            reserved: 0,
        };
        let encode = |h: &ChunkHeader| {
            let mut rec = Vec::new();
            for v in [h.cgroup_id, h.ino, h.offset] {
                rec.extend_from_slice(&v.to_ne_bytes());
            }
            for v in [h.tgid, h.len, h.fd, h.kind, h.uncopied, h.reserved] {
                rec.extend_from_slice(&v.to_ne_bytes());
            }
            rec
        };
        let mut rec = encode(&h);
        assert_eq!(rec.len(), HEADER_BYTES);
        rec.extend_from_slice(b"abcdef");
        let (got, data) = parse(&rec).unwrap();
        assert_eq!(got, h);
        assert_eq!(data, b"abc");
        assert!(parse(&rec[..HEADER_BYTES + 2]).is_none());
        assert!(parse(&rec[..10]).is_none());
        // A range the kernel could not copy: a header alone, whatever its length says.
        let moved = ChunkHeader {
            len: 1 << 30,
            uncopied: uncopied::SENDFILE,
            ..h
        };
        let rec = encode(&moved);
        let (got, data) = parse(&rec).unwrap();
        assert_eq!((got, data), (moved, &[][..]));
        assert_eq!(
            Piece::of(&got, data),
            Piece::Uncopied {
                len: 1 << 30,
                reason: uncopied::SENDFILE
            }
        );
    }

    #[test]
    fn a_known_stdio_decides_roles() {
        let s = Some(Stdio {
            stdout: 1,
            stderr: 2,
        });
        assert_eq!(role_of(s, &[], 2, 1), Role::Stderr);
        assert_eq!(role_of(s, &[], 3, 1), Role::Other);
        // Without stdio the fd decides, and a role is given once.
        assert_eq!(role_of(None, &[], 5, 2), Role::Stderr);
        assert_eq!(role_of(None, &[Role::Stdout], 6, 1), Role::Other);
    }

    #[tokio::test]
    async fn chunks_are_handed_over_in_offset_order_and_gaps_become_drops() {
        let shipper = Shipper::new(ShipConfig::default());
        let mut s = Stream {
            shipper: shipper.clone(),
            redactor: Redactor::new(Arc::new(Secrets::none())),
            next: 0,
            early: BTreeMap::new(),
            early_bytes: 0,
            gap_since: None,
            cursor: None,
            gone: Arc::default(),
        };
        fn bytes(b: &[u8]) -> Piece<'_> {
            Piece::Bytes(Cow::Borrowed(b))
        }
        feed(&mut s, 3, bytes(b"def"));
        assert_eq!(shipper.offset(), 0);
        assert!(s.gap_since.is_some());
        feed(&mut s, 0, bytes(b"abc"));
        assert_eq!((shipper.offset(), s.next), (6, 6));
        assert!(s.gap_since.is_none());
        feed(&mut s, 10, bytes(b"kl"));
        close_gap(&mut s);
        assert_eq!((shipper.offset(), s.next), (12, 12));
        assert!(s.early.is_empty());
        // Past EARLY_MAX waiting behind a gap, the gap is given up at once.
        let big = vec![0; EARLY_MAX];
        feed(&mut s, 20, bytes(&big));
        assert_eq!(s.next, 12, "one chunk waits");
        feed(&mut s, 20 + EARLY_MAX as u64, bytes(b"x"));
        assert_eq!(s.next, 21 + EARLY_MAX as u64);
        assert_eq!((s.early.len(), s.early_bytes), (0, 0));
        // An uncopied range takes its place in order, early or not, and holds no memory.
        let at = s.next;
        feed(&mut s, at + 1000, bytes(b"after"));
        let moved = Piece::Uncopied {
            len: 999,
            reason: uncopied::SPLICE,
        };
        feed(&mut s, at + 1, moved);
        assert_eq!(s.early_bytes, 5);
        feed(&mut s, at, bytes(b"b"));
        assert_eq!(s.next, at + 1005);
        assert!(s.gap_since.is_none(), "no gap is left: nothing waits");
        assert_eq!(shipper.offset(), at + 1005);
        // Chunks that never came are the kernel's loss; moved bytes were never copied.
        assert_eq!(
            shipper.unsent_drops(),
            vec![
                (contract::range::Span::new(6, 10), DropReason::KernelLost),
                (contract::range::Span::new(12, 20), DropReason::KernelLost),
                (
                    contract::range::Span::new(at + 1, at + 1000),
                    DropReason::NotCopied
                ),
            ]
        );
    }
}
