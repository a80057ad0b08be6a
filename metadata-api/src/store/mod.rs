//! Log streams on `object_store`.
//!
//! Layout under the configured prefix, one directory-like prefix per stream:
//! - `streams/{id}/meta.json`: context, name and source (written once, `PutMode::Create`);
//! - `streams/{id}/parts/{start:016x}-{end:016x}[.{ms}]`: one object per accepted part (several
//!   consecutive ones when it is longer than `MAX_OBJECT_LEN`), keyed by its byte range, so any
//!   replica can accept any part without a lock, and by the time its first byte was written when
//!   the writer gave one (see [`part_name`]); later merged into segments of [`SEGMENT`] bytes
//!   under the same naming (see [`Store::compact`]);
//! - `streams/{id}/times/{start:016x}-{end:016x}`: the time index of a segment (see
//!   [`crate::times`]);
//! - `streams/{id}/dropped/{start:016x}-{end:016x}.{reason}`: an empty object per `dropped`
//!   marker, its reason in its name (see [`marker_name`]; markers stored before reasons have no
//!   suffix and read as `unspecified`); compaction never touches them;
//! - `streams/{id}/final`: the declared final length (written once);
//! - `streams/{id}/writer-died/{offset:016x}`: an empty object when the stream was settled after
//!   its writer died (see [`Store::settle`]), at the offset where its bytes first went missing;
//! - `streams/{id}/writers/{epoch:016x}-{replica}`: an empty object per process writing the stream
//!   in a two-minute epoch, the latest one kept (see below);
//! - `index/{context}/{source}/{hex(name)}`: an empty object per stream, so a context's streams
//!   can be listed (the capture report); written with the stream's `meta.json`, never on appends.
//!
//! Times need no object per part: a part's receive time is its object's last-modified time, and
//! its write time is in its name.
//!
//! The in-memory state of a stream is a cache rebuilt from a listing. Every write is a conditional
//! put (`PutMode::Create`); a 202 is only given for bytes that no other stored part contradicts.
//! Within one process, overlapping writes wait for each other and are compared with the cached
//! parts. Across replicas, a write costs one request more only when another replica writes the
//! same stream:
//! - Before its first write in an epoch, a process registers under `writers/`, and from time to
//!   time it lists the registrations near the current epoch. A listing that shows it alone vouches
//!   for the writes completed within [`WRITER_WINDOW`] of its start: they are acknowledged with no
//!   further request.
//! - When others are registered, the parts near the written range are listed after the write: a
//!   part another replica stored over the same bytes is compared, and when the bytes differ the
//!   later writer removes its own part and answers 409. The first such listing of a process that
//!   newly registered waits until a quarter more than the window has passed since: a replica that
//!   listed the writers just before the registration, saw itself alone, and acknowledged a write
//!   it completed within its window, has that part stored by then, so the listing finds it.
//! - Of any two conflicting writes, then, one is listed after the other was stored: if both
//!   writers saw themselves alone, each registered before it listed, so the later listing would
//!   have shown the earlier writer. The argument needs no synchronized clocks: the waits are
//!   measured on each process's own monotonic clock, and the epochs only need to agree within
//!   [`WRITER_EPOCHS_SEEN`] epochs.
//! - A process that saw others and later sees itself alone lists the whole stream once before it
//!   trusts its cache again: the others' parts may lie anywhere.
//!
//! The listing after a shared write must stay cheap however many parts a stream has. Part keys
//! sort by start offset, so it starts at the key `MAX_OBJECT_LEN` before the write: no part object
//! is longer, so no part starting earlier can reach the written range. The `final` object and the
//! markers are not part of it: they cannot contradict bytes.

use std::{
    collections::{BTreeMap, HashMap, HashSet, btree_map::Entry},
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, path::Path};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    auth::Context,
    metrics::Metrics,
    range::{RangeSet, Span},
    reason::DropReason,
    times::TimeIndex,
};

pub use crate::reason::DroppedSpan;
pub use crate::source::Source;

use dropped::Reasons;
use keys::*;

mod compact;
mod dropped;
mod index;
mod keys;
mod read;
mod write;

#[cfg(test)]
mod tests;

/// What identifies a stream; stored once as `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    pub context: Context,
    pub name: String,
    pub source: Source,
    /// On an `ebpf` stream, the collector's word on why the container has no `entrypoint`
    /// stream of the same name (it is not wrapped, or is a Tekton hermetic step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint_absent: Option<String>,
    /// The Kubernetes namespace of the pod whose output the stream holds, when the API knows it
    /// (`--auth kubernetes`: from the pod's token, or from the pod index for a collector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The name of the pod whose output the stream holds, when known (see
    /// [`contract::wire::CreateStream::pod`]); reads of a trigger select replicas by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl StreamMeta {
    /// The tenant whose budget the stream's writes count against: its namespace where known,
    /// else its workflow. Prefixed, so a namespace and a workflow of the same name stay apart.
    pub fn tenant(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("namespace/{ns}"),
            None => format!("workflow/{}", self.context.workflow()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bytes {span} differ from bytes already stored")]
    Conflict { span: Span },
    #[error("range ends at {end}, beyond the declared final length {length}")]
    BeyondFinal { end: u64, length: u64 },
    #[error("final length {wanted} conflicts with {reason}")]
    FinalLength { wanted: u64, reason: String },
    #[error("stream {id} metadata is corrupt")]
    Corrupt { id: String },
    #[error("storage failed")]
    Storage(#[from] object_store::Error),
}

/// One stored part.
#[derive(Debug, Clone)]
pub struct Part {
    pub span: Span,
    pub key: Path,
    /// Receive time, milliseconds since the Unix epoch.
    pub received_ms: u64,
    /// When its first byte was written (read from the container's pipe, or seen by the kernel),
    /// as its writer said; the receive time when it did not. For a segment, the time of its first
    /// byte: [`Store::times`] has the rest.
    pub written_ms: u64,
    /// Written by this process (as opposed to learnt from a listing).
    local: bool,
}

/// Longest object one part is stored in; a longer write is stored as consecutive objects of this
/// size. The check after each write lists the part keys from this far before the written range,
/// which finds every part overlapping it only because no part object is longer. Parts stored
/// before this bound existed may be longer: [`State::longest`] widens the listing for them.
const MAX_OBJECT_LEN: u64 = 4 << 20;

/// How many objects of one long write are put at once.
const PUT_CONCURRENCY: usize = 4;

/// Segment size: a stream's stored bytes are merged into objects covering
/// `[k * SEGMENT, (k + 1) * SEGMENT)` (the last one ending at the final length). At most
/// [`MAX_OBJECT_LEN`], so the check after each write still finds every object overlapping it; at
/// that size a stream's object count is its bytes over 4 MiB, and a read of it a GET per 4 MiB.
pub const SEGMENT: u64 = MAX_OBJECT_LEN;

/// How old a part another replica stored must be before it is merged into a segment: by then the
/// write that stored it has answered, so a part that lost a conflict has been withdrawn and is
/// never copied into a segment.
const SETTLED_AFTER: Duration = Duration::from_secs(60);

/// A cell held by at most this many objects is left as it is (see [`Store::merge_above`]): with
/// 4 MiB segments, when its parts average 1 MiB or more.
const MERGE_ABOVE: usize = 4;

/// How long after a failed compaction a stream's next one may start.
const COMPACT_RETRY: Duration = Duration::from_secs(30);

/// A writer registers under `writers/` once per epoch of this length (wall clock) in which it
/// writes a stream (see [`Store::write`]).
const WRITER_EPOCH_SECS: u64 = 120;

/// A registration counts for this many epochs either side of its own: replicas' clocks may differ
/// by up to this much, and a replica that stopped writing a stream is forgotten this long after.
const WRITER_EPOCHS_SEEN: u64 = 2;

/// How long a listing of a stream's writers vouches for the writes completed after it (see the
/// module's notes): a process writing a stream lists its writers about this often. A quarter more
/// than this is what the first write a process shares with another may wait, kept below the
/// shippers' 10-s request timeout. Tests use less.
pub const WRITER_WINDOW: Duration = Duration::from_secs(6);

#[derive(Debug, Default)]
struct State {
    /// Keyed by (start, end); identical parts from several replicas may overlap.
    parts: BTreeMap<(u64, u64), Part>,
    /// Length of the longest part known in the stream.
    longest: u64,
    stored: RangeSet,
    dropped: RangeSet,
    /// The markers behind `dropped`, with their reasons.
    reasons: Reasons,
    final_len: Option<u64>,
    /// Where the bytes of a writer that died first went missing (see [`Store::settle`]).
    writer_died_at: Option<u64>,
    /// Ranges this process is writing now; an overlapping write waits for them.
    inflight: Vec<Span>,
    /// Earliest and latest receive time of the known parts (ms since the epoch).
    received: Option<(u64, u64)>,
    /// Segments below this offset are merged (as far as this process knows).
    segmented_to: u64,
    /// A compaction of the stream is running in this process.
    compacting: bool,
    /// Parts too fresh to merge were met: no compaction is asked for before this.
    compact_after: Option<Instant>,
    /// What this process knows of the stream's other writers.
    writers: Writers,
    /// The spans of the segments that have a time index (see [`crate::times`]).
    indexed: HashSet<(u64, u64)>,
}

/// A process's view of who writes a stream (see [`Store::write`]).
#[derive(Debug, Default)]
struct Writers {
    /// The last epoch this process registered in, and since when it has been registered without
    /// a break (the completion of the registration that began the run).
    registered: Option<(u64, Instant)>,
    /// When the latest listing of the writers began, and whether it showed this process alone.
    listed: Option<(Instant, bool)>,
    /// Another writer was seen since the stream's parts were last listed whole: the cached parts
    /// may lack theirs.
    others_seen: bool,
}

/// How a write's bytes are checked against other replicas' parts once stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// No other replica writes the stream: nothing to check.
    Alone,
    /// Others write it: list the parts near the write once `wait_until` has passed.
    Shared { wait_until: Instant },
    /// Others wrote it and are gone: list near the write and then the whole stream once.
    Rejoined { listed_at: Instant },
}

/// A snapshot of what a stream holds.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub id: String,
    pub name: String,
    pub source: Source,
    pub context: Context,
    /// End of the prefix that is stored or dropped: readers can read this far without waiting.
    pub length: u64,
    /// Highest offset stored or dropped: a restarted writer continues here.
    pub end: u64,
    pub stored: Vec<Span>,
    /// Ranges dropped and not stored, each with its reason (neighbours of different reasons
    /// listed apart).
    pub dropped: Vec<DroppedSpan>,
    /// Gaps neither stored nor dropped, up to the final length (or `end`).
    pub pending: Vec<Span>,
    pub final_length: Option<u64>,
    pub complete: bool,
    /// Set when the stream was settled after its writer died: the first offset it never sent
    /// (every range it left pending is dropped, and its final length came from the other path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writer_died_at: Option<u64>,
    /// See [`StreamMeta::entrypoint_absent`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint_absent: Option<String>,
    /// See [`StreamMeta::namespace`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// See [`StreamMeta::pod`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Receive time of the earliest-received stored part, ms since the Unix epoch.
    pub first_received_ms: Option<u64>,
    /// Receive time of the latest-received stored part, ms since the Unix epoch.
    pub last_received_ms: Option<u64>,
}

impl Status {
    /// The dropped ranges without their reasons.
    pub fn dropped_spans(&self) -> Vec<Span> {
        self.dropped.iter().map(DroppedSpan::span).collect()
    }
}

/// A piece of a read plan.
#[derive(Debug, Clone)]
pub enum Piece {
    Data { span: Span, part: Part },
    Dropped(Span, DropReason),
}

/// A log stream: its identity, cached state and a change signal for followers.
pub struct Stream {
    pub id: String,
    pub meta: StreamMeta,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream").field("id", &self.id).finish()
    }
}

/// A range of a stream this process is writing now (in [`State::inflight`]): an overlapping write
/// waits until it is released. Released on drop, so also when the write's future is dropped
/// midway, as when the client of the request that made it disconnects (or gives up waiting on a
/// stalled storage call) and the server drops its handler: a range left reserved then would make
/// every later write over it (the client's own re-send) wait forever.
struct Reservation<'a> {
    stream: &'a Stream,
    span: Span,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.span.is_empty() {
            let mut st = lock(&self.stream.state);
            if let Some(i) = st.inflight.iter().position(|s| *s == self.span) {
                st.inflight.swap_remove(i);
            }
        }
        self.stream.notify();
    }
}

/// Outcome of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// New bytes stored.
    Stored,
    /// Every byte was already stored, identical.
    Unchanged,
}

/// What one compaction did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Segments stored.
    pub segments: usize,
    /// Objects removed because segments cover them.
    pub removed: usize,
}

/// Marks a stream's compaction as running until dropped (also when its future is dropped).
struct CompactionRunning<'a>(&'a Stream);

impl Drop for CompactionRunning<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).compacting = false;
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn stream_cache(capacity: usize) -> StreamCache {
    StreamCache::with(
        capacity,
        capacity as u64,
        quick_cache::UnitWeighter,
        quick_cache::DefaultHashBuilder::default(),
        InUse,
    )
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave State half-updated in a way that matters more
    // than losing the process; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Part {
    /// Whether its writer said when its first byte was written (the name carries the time).
    pub fn has_written_time(&self) -> bool {
        self.key.filename().is_some_and(|n| n.contains('.'))
    }
}

impl Stream {
    fn new(id: String, meta: StreamMeta) -> Self {
        Self {
            id,
            meta,
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
        }
    }

    /// A receiver that wakes when the stream changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn status(&self) -> Status {
        let st = lock(&self.state);
        let covered = st.stored.union(&st.dropped);
        let end = covered.max_end().max(st.final_len.unwrap_or(0));
        let pending = covered.gaps(Span::new(0, end));
        Status {
            id: self.id.clone(),
            name: self.meta.name.clone(),
            source: self.meta.source,
            context: self.meta.context.clone(),
            length: covered.prefix_end(),
            end: covered.max_end(),
            stored: st.stored.spans().to_vec(),
            dropped: st.reasons.except(&st.stored),
            complete: st.final_len.is_some() && pending.is_empty(),
            pending,
            final_length: st.final_len,
            writer_died_at: st.writer_died_at,
            entrypoint_absent: self.meta.entrypoint_absent.clone(),
            namespace: self.meta.namespace.clone(),
            pod: self.meta.pod.clone(),
            first_received_ms: st.received.map(|r| r.0),
            last_received_ms: st.received.map(|r| r.1),
        }
    }

    /// Plans a read of `span`: stored bytes, and dropped ranges where nothing is stored, in offset
    /// order, stopping at the first pending gap. Returns the pieces and the offset reached.
    pub fn plan(&self, span: Span) -> (Vec<Piece>, u64) {
        let st = lock(&self.state);
        self.plan_locked(&st, span)
    }

    fn plan_locked(&self, st: &State, span: Span) -> (Vec<Piece>, u64) {
        let mut at = span.start;
        let mut out = Vec::new();
        while at < span.end {
            // A stored part covering `at`, the one reaching furthest.
            let part = st
                .parts
                .range(..=(at, u64::MAX))
                .filter(|(_, p)| p.span.end > at)
                .max_by_key(|(_, p)| p.span.end)
                .map(|(_, p)| p.clone());
            if let Some(part) = part {
                let piece_end = part.span.end.min(span.end);
                out.push(Piece::Data {
                    span: Span::new(at, piece_end),
                    part,
                });
                at = piece_end;
                continue;
            }
            // One piece per reason: neighbouring ranges of different reasons stay apart.
            if let Some(d) = st.reasons.at(at) {
                // Stop the dropped piece where stored bytes begin again.
                let next_part = st
                    .parts
                    .range((at, 0)..)
                    .map(|(_, p)| p.span.start)
                    .next()
                    .unwrap_or(u64::MAX);
                let piece_end = d.end.min(span.end).min(next_part);
                out.push(Piece::Dropped(Span::new(at, piece_end), d.reason));
                at = piece_end;
                continue;
            }
            break;
        }
        (out, at)
    }

    /// Whether `part` is still one of the stream's objects as far as this process knows: false
    /// once it was merged into a segment, so a plan that holds it is better made again.
    pub fn holds(&self, part: &Part) -> bool {
        lock(&self.state).parts.contains_key(&key_of(part.span))
    }

    /// Whether the stream is complete and `offset` is at its end.
    pub fn finished_at(&self, offset: u64) -> bool {
        let st = lock(&self.state);
        st.final_len.is_some_and(|n| offset >= n)
    }

    fn absorb(&self, listing: Listing) -> bool {
        let mut st = lock(&self.state);
        let mut changed = false;
        if let Some(from) = listing.complete_from {
            // A part another replica stored and then removed (it lost a race): forget it. Parts
            // this process wrote are always in a listing taken after their write.
            let listed: HashSet<(u64, u64)> =
                listing.parts.iter().map(|p| key_of(p.span)).collect();
            let gone: Vec<(u64, u64)> = st
                .parts
                .range((from, 0)..)
                .filter(|(k, p)| !p.local && !listed.contains(k))
                .map(|(k, _)| *k)
                .collect();
            changed |= st.remove_parts(&gone);
        }
        let State {
            parts,
            stored,
            longest,
            received,
            ..
        } = &mut *st;
        for p in listing.parts {
            if let Entry::Vacant(e) = parts.entry(key_of(p.span)) {
                stored.insert(p.span);
                *longest = (*longest).max(p.span.len());
                note_received(received, p.received_ms);
                e.insert(p);
                changed = true;
            }
        }
        for (d, reason) in listing.dropped {
            st.dropped.insert(d);
            changed |= st.reasons.insert(d, reason);
        }
        st.indexed.extend(listing.indexed.into_iter().map(key_of));
        if st.final_len.is_none() && listing.final_len.is_some() {
            st.final_len = listing.final_len;
            changed = true;
        }
        if st.writer_died_at.is_none() && listing.writer_died_at.is_some() {
            st.writer_died_at = listing.writer_died_at;
            changed = true;
        }
        drop(st);
        if changed {
            self.notify();
        }
        changed
    }

    /// Forgets parts found missing from storage (removed by a replica that lost a race).
    fn forget(&self, keys: &[(u64, u64)]) {
        if lock(&self.state).remove_parts(keys) {
            self.notify();
        }
    }
}

impl State {
    /// Removes parts and recomputes what is stored; whether any was removed.
    fn remove_parts(&mut self, keys: &[(u64, u64)]) -> bool {
        let before = self.parts.len();
        for k in keys {
            self.parts.remove(k);
        }
        if self.parts.len() == before {
            return false;
        }
        let mut stored = RangeSet::new();
        self.received = None;
        for p in self.parts.values() {
            stored.insert(p.span);
            note_received(&mut self.received, p.received_ms);
        }
        self.stored = stored;
        true
    }
}

/// Widens the (first, last) receive times by `ms`.
fn note_received(received: &mut Option<(u64, u64)>, ms: u64) {
    *received = Some(match *received {
        None => (ms, ms),
        Some((a, b)) => (a.min(ms), b.max(ms)),
    });
}

#[derive(Debug, Default)]
struct Listing {
    parts: Vec<Part>,
    dropped: Vec<(Span, DropReason)>,
    final_len: Option<u64>,
    writer_died_at: Option<u64>,
    /// Segments with a time index.
    indexed: Vec<Span>,
    /// The listing holds every part that starts at or after this offset.
    complete_from: Option<u64>,
}

/// A stream as the index names it (see [`Store::indexed`]).
#[derive(Debug, Clone)]
pub struct Indexed {
    pub context: Context,
    pub source: Source,
    pub name: String,
    /// When the stream was created (its index entry's time), ms since the epoch.
    pub indexed_ms: u64,
    key: Path,
}

/// What a deletion removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Deleted {
    pub streams: usize,
    pub objects: usize,
}

/// Streams kept in memory by default (see [`Store::cache_capacity`]).
pub const STREAM_CACHE: usize = 10_000;

/// Keeps a cached stream while anyone but the cache holds it: a request writing to it, a
/// follower waiting on it. Evicting it then would let a second copy be loaded beside it, and
/// writes to one would not wake the followers of the other.
#[derive(Debug, Clone, Copy, Default)]
struct InUse;

impl quick_cache::Lifecycle<String, Arc<Stream>> for InUse {
    type RequestState = ();

    fn is_pinned(&self, _: &String, stream: &Arc<Stream>) -> bool {
        Arc::strong_count(stream) > 1
    }

    fn on_evict(&self, _: &mut (), _: String, _: Arc<Stream>) {}
}

type StreamCache = quick_cache::sync::Cache<
    String,
    Arc<Stream>,
    quick_cache::UnitWeighter,
    quick_cache::DefaultHashBuilder,
    InUse,
>;

/// The stream store.
pub struct Store {
    os: Arc<dyn ObjectStore>,
    prefix: Path,
    /// What the store knows of streams touched lately, at most [`Store::cache_capacity`] of
    /// them beyond those in use: memory follows the streams being written and read, not every
    /// stream ever seen. An evicted stream is loaded again from storage when next touched.
    streams: StreamCache,
    metrics: Arc<Metrics>,
    segment: u64,
    settled_after: Duration,
    /// The directory of a local file system store (see [`Store::local_dir`]).
    local_dir: Option<std::path::PathBuf>,
    /// This process's name among the stream's writers (see [`Store::replica`]).
    replica: String,
    writer_window: Duration,
    merge_above: usize,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.os.to_string())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Store {
    pub fn new(os: Arc<dyn ObjectStore>, prefix: Path, metrics: Arc<Metrics>) -> Self {
        Self {
            os,
            prefix,
            streams: stream_cache(STREAM_CACHE),
            metrics,
            segment: SEGMENT,
            settled_after: SETTLED_AFTER,
            local_dir: None,
            replica: format!("{:016x}", rand::random::<u64>()),
            writer_window: WRITER_WINDOW,
            merge_above: MERGE_ABOVE,
        }
    }

    /// Merges a cell only when more than `objects` objects hold its bytes (see [`MERGE_ABOVE`]);
    /// tests that check every cell merged use zero.
    pub fn merge_above(mut self, objects: usize) -> Self {
        self.merge_above = objects;
        self
    }

    /// Names this process among the writers of the streams it writes: unique among the processes
    /// sharing the storage, stable across restarts where it can be (a pod's name). A restarted
    /// process with a new name waits for its old one to be forgotten before it writes alone.
    /// Characters outside `[A-Za-z0-9._-]` are replaced. Random by default.
    pub fn replica(mut self, name: &str) -> Self {
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if !name.is_empty() {
            self.replica = name;
        }
        self
    }

    /// See [`WRITER_WINDOW`]; a shared write's first check waits a quarter longer than this.
    pub fn writer_window(mut self, window: Duration) -> Self {
        self.writer_window = window;
        self
    }

    /// Says that the store is the local file system rooted at `dir`, so that the check after
    /// each write lists a stream's parts by reading the names in its directory and the metadata of
    /// the few it needs: `object_store`'s local listing reads the metadata of every file (several
    /// `statx` each), which made a write's cost grow with the parts of its stream.
    pub fn local_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.local_dir = Some(dir);
        self
    }

    /// Merges parts into segments of `bytes` (at most 4 MiB, see [`SEGMENT`]); tests use small
    /// ones.
    pub fn segment_size(mut self, bytes: u64) -> Self {
        self.segment = bytes.clamp(1, MAX_OBJECT_LEN);
        self
    }

    /// Merges parts of other replicas once they are `age` old (see [`SETTLED_AFTER`]); a single
    /// writer's tests use zero.
    pub fn settled_after(mut self, age: Duration) -> Self {
        self.settled_after = age;
        self
    }

    /// Keeps at most `capacity` streams cached beyond those in use.
    pub fn cache_capacity(mut self, capacity: usize) -> Self {
        self.streams = stream_cache(capacity);
        self
    }

    fn key(&self, id: &str, rest: &str) -> Path {
        let mut p = self.prefix.clone().join("streams").join(id);
        for seg in rest.split('/') {
            p = p.join(seg);
        }
        p
    }

    /// The cached stream `id`, or the one `load` makes (`None`: there is none), cached. Callers
    /// asking for the same stream meanwhile wait for this load rather than make their own.
    async fn cached_or(
        &self,
        id: &str,
        load: impl Future<Output = Result<Option<Stream>, StoreError>>,
    ) -> Result<Option<Arc<Stream>>, StoreError> {
        let guard = match self.streams.get_value_or_guard_async(id).await {
            Ok(stream) => return Ok(Some(stream)),
            Err(guard) => guard,
        };
        let Some(stream) = load.await? else {
            return Ok(None);
        };
        let stream = Arc::new(stream);
        // Only fails when the entry was filled meanwhile, which the guard rules out.
        let _ = guard.insert(Arc::clone(&stream));
        self.metrics.streams_open.set(self.streams.len() as i64);
        Ok(Some(stream))
    }

    /// Streams in memory now.
    pub fn cached_streams(&self) -> usize {
        self.streams.len()
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, object_store::Error>>,
    ) -> Result<T, object_store::Error> {
        let t = Instant::now();
        let r = f.await;
        self.metrics.storage_latency(op, t.elapsed(), r.is_ok());
        r
    }

    /// Creates the stream if it does not exist (idempotent) and returns it with its current state.
    pub async fn create(&self, id: String, meta: StreamMeta) -> Result<Arc<Stream>, StoreError> {
        let load = async {
            let key = self.key(&id, "meta.json");
            let body =
                serde_json::to_vec(&meta).map_err(|_| StoreError::Corrupt { id: id.clone() })?;
            let opts = PutOptions::from(PutMode::Create);
            let index = self.index_key(&meta);
            let (made, indexed) = futures::join!(
                self.timed("put", self.os.put_opts(&key, body.into(), opts)),
                self.timed(
                    "put",
                    self.os
                        .put_opts(&index, PutPayload::new(), PutOptions::from(PutMode::Create))
                )
            );
            for r in [made, indexed] {
                match r {
                    Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let stream = Stream::new(id.clone(), meta.clone());
            stream.absorb(self.list(&stream.id, false).await?);
            Ok(Some(stream))
        };
        self.cached_or(&id, load)
            .await?
            .ok_or_else(|| StoreError::Corrupt { id: id.clone() })
    }

    /// Finds a stream by id, loading it from storage when it is not cached.
    pub async fn open(&self, id: &str) -> Result<Option<Arc<Stream>>, StoreError> {
        let load = async {
            let key = self.key(id, "meta.json");
            let meta = match self.timed("get", self.os.get(&key)).await {
                Ok(r) => r.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let meta: StreamMeta = serde_json::from_slice(&meta)
                .map_err(|_| StoreError::Corrupt { id: id.to_owned() })?;
            let stream = Stream::new(id.to_owned(), meta);
            stream.absorb(self.list(id, false).await?);
            Ok(Some(stream))
        };
        self.cached_or(id, load).await
    }

    /// Re-reads the stream's objects, picking up what other replicas stored.
    pub async fn refresh(&self, stream: &Stream) -> Result<bool, StoreError> {
        let final_known = lock(&stream.state).final_len.is_some();
        Ok(stream.absorb(self.list(&stream.id, final_known).await?))
    }

    /// Lists everything the stream holds; the `final` object is read only when `final_known` is
    /// false (once declared, it never changes).
    async fn list(&self, id: &str, final_known: bool) -> Result<Listing, StoreError> {
        let prefix = self.prefix.clone().join("streams").join(id);
        let t = Instant::now();
        let metas: Vec<object_store::ObjectMeta> =
            self.os.list(Some(&prefix)).try_collect().await?;
        self.metrics.storage_latency("list", t.elapsed(), true);
        let mut out = Listing {
            complete_from: Some(0),
            ..Listing::default()
        };
        for m in metas {
            let mut segs = m.location.parts().collect::<Vec<_>>().into_iter().rev();
            let Some(name) = segs.next() else { continue };
            let parent = segs.next();
            match (parent.as_ref().map(|p| p.as_ref()), name.as_ref()) {
                (Some("parts"), _) => out.parts.extend(part_of(m)),
                (Some("dropped"), n) => out.dropped.extend(parse_marker_name(n)),
                (Some("times"), n) => out.indexed.extend(parse_span_name(n)),
                (Some("writer-died"), n) => {
                    out.writer_died_at = out
                        .writer_died_at
                        .into_iter()
                        .chain(u64::from_str_radix(n, 16).ok())
                        .min();
                }
                (_, "final") if !final_known => {
                    let b = self.timed("get", self.os.get(&m.location)).await?;
                    let b = b.bytes().await?;
                    out.final_len = std::str::from_utf8(&b)
                        .ok()
                        .and_then(|s| s.trim().parse().ok());
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Lists the parts that start at or after `from`. Keys sort by start offset, so backends that
    /// list after a key (S3's `start-after`, GCS's `startOffset`) return only those; the local
    /// file system still reads the whole directory but skips the metadata of earlier keys. The
    /// listing is consumed to its end: `object_store` does not promise any order.
    async fn list_parts_from(&self, stream: &Stream, from: u64) -> Result<Vec<Part>, StoreError> {
        let id = &stream.id;
        let dir = self.key(id, "parts");
        if let Some(root) = &self.local_dir {
            // The receive times of the parts known already: only new ones need their metadata.
            let known: HashMap<(u64, u64), u64> = lock(&stream.state)
                .parts
                .range((from, 0)..)
                .map(|(k, p)| (*k, p.received_ms))
                .collect();
            let t = Instant::now();
            let parts = list_local_parts_from(root.join(dir.as_ref()), dir, from, known).await;
            self.metrics
                .storage_latency("list", t.elapsed(), parts.is_ok());
            return parts;
        }
        // Every key of a part starting at `from` or later sorts after this one: `{from:016x}` is a
        // strict prefix of those starting at `from`, and a greater number for the later ones.
        let offset = dir.clone().join(format!("{from:016x}"));
        let t = Instant::now();
        let metas: Vec<object_store::ObjectMeta> = self
            .os
            .list_with_offset(Some(&dir), &offset)
            .try_collect()
            .await?;
        self.metrics.storage_latency("list", t.elapsed(), true);
        Ok(metas.into_iter().filter_map(part_of).collect())
    }
}
