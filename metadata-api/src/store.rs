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
//! - `streams/{id}/dropped/{start:016x}-{end:016x}`: an empty object per `dropped` marker;
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
    times::TimeIndex,
};

pub use crate::source::Source;

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
    pub dropped: Vec<Span>,
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
    /// Receive time of the earliest-received stored part, ms since the Unix epoch.
    pub first_received_ms: Option<u64>,
    /// Receive time of the latest-received stored part, ms since the Unix epoch.
    pub last_received_ms: Option<u64>,
}

/// A piece of a read plan.
#[derive(Debug, Clone)]
pub enum Piece {
    Data { span: Span, part: Part },
    Dropped(Span),
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

/// The writer epoch now (see [`WRITER_EPOCH_SECS`]).
fn writer_epoch() -> u64 {
    now_ms() / 1000 / WRITER_EPOCH_SECS
}

fn span_name(span: Span) -> String {
    format!("{:016x}-{:016x}", span.start, span.end)
}

/// The name of a part object: its span, and the time its first byte was written when the writer
/// said (`{start:016x}-{end:016x}.{ms}`). The time is part of the name so that a listing, which
/// every reader makes anyway, yields it with no request per part; a writer's retries send the same
/// time, so they still meet their earlier attempt under the same name.
fn part_name(span: Span, written_ms: Option<u64>) -> String {
    match written_ms {
        Some(ms) => format!("{}.{ms}", span_name(span)),
        None => span_name(span),
    }
}

/// A part object's span and write time (see [`part_name`]).
fn parse_part_name(name: &str) -> Option<(Span, Option<u64>)> {
    match name.split_once('.') {
        Some((span, ms)) if !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()) => {
            Some((parse_span_name(span)?, Some(ms.parse().ok()?)))
        }
        Some(_) => None,
        None => Some((parse_span_name(name)?, None)),
    }
}

fn parse_span_name(name: &str) -> Option<Span> {
    let (a, b) = name.split_once('-')?;
    if a.len() != 16 || b.len() != 16 {
        return None;
    }
    let span = Span::new(
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    );
    (!span.is_empty()).then_some(span)
}

/// The objects a write of `span` is stored in: consecutive pieces of at most [`MAX_OBJECT_LEN`].
fn objects(span: Span) -> impl Iterator<Item = Span> {
    (span.start..span.end)
        .step_by(MAX_OBJECT_LEN as usize)
        .map(move |a| Span::new(a, a.saturating_add(MAX_OBJECT_LEN).min(span.end)))
}

/// The part a listed object is, when it is one (`.../parts/{start}-{end}`).
fn part_of(m: object_store::ObjectMeta) -> Option<Part> {
    let mut segs = m.location.parts().collect::<Vec<_>>().into_iter().rev();
    let name = segs.next()?;
    if segs.next()?.as_ref() != "parts" {
        return None;
    }
    let (span, written_ms) = parse_part_name(name.as_ref())?;
    let received_ms = m.last_modified.timestamp_millis().max(0) as u64;
    Some(Part {
        span,
        received_ms,
        written_ms: written_ms.unwrap_or(received_ms),
        key: m.location,
        local: false,
    })
}

/// The parts in the local directory `fs_dir` (object key `dir`) that start at or after `from`:
/// every name is read, and the metadata (for the receive time) of those not in `known`.
async fn list_local_parts_from(
    fs_dir: std::path::PathBuf,
    dir: Path,
    from: u64,
    known: HashMap<(u64, u64), u64>,
) -> Result<Vec<Part>, StoreError> {
    let io = |e: std::io::Error| {
        StoreError::Storage(object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(e),
        })
    };
    let listed = tokio::task::spawn_blocking(move || {
        let entries = match std::fs::read_dir(&fs_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut parts = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            // Staging files of a put in progress are not part names.
            let Some((span, written_ms)) = name.to_str().and_then(parse_part_name) else {
                continue;
            };
            if span.start < from {
                continue;
            }
            let received_ms = match known.get(&key_of(span)) {
                Some(&ms) => ms,
                None => match entry.metadata() {
                    Ok(m) => m
                        .modified()?
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    // Removed since the directory was read (merged into a segment).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                },
            };
            parts.push(Part {
                span,
                key: dir.clone().join(part_name(span, written_ms)),
                received_ms,
                written_ms: written_ms.unwrap_or(received_ms),
                local: false,
            });
        }
        Ok(parts)
    })
    .await
    .map_err(|e| io(std::io::Error::other(e)))?;
    listed.map_err(io)
}

/// The time index of a segment made of `pieces`, when any of them has a time its writer gave.
fn segment_times(cell: Span, pieces: &[Piece]) -> Option<TimeIndex> {
    let data = || {
        pieces.iter().filter_map(|p| match p {
            Piece::Data { span, part } => Some((span, part)),
            Piece::Dropped(_) => None,
        })
    };
    data().any(|(_, p)| p.has_written_time()).then(|| {
        TimeIndex::new(
            cell,
            data().map(|(span, part)| (span.start, part.written_ms)),
        )
    })
}

fn key_of(span: Span) -> (u64, u64) {
    (span.start, span.end)
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
            dropped: st.dropped.difference(&st.stored).spans().to_vec(),
            complete: st.final_len.is_some() && pending.is_empty(),
            pending,
            final_length: st.final_len,
            writer_died_at: st.writer_died_at,
            entrypoint_absent: self.meta.entrypoint_absent.clone(),
            namespace: self.meta.namespace.clone(),
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
            let dropped = st
                .dropped
                .spans()
                .iter()
                .find(|d| d.start <= at && at < d.end)
                .copied();
            if let Some(d) = dropped {
                // Stop the dropped piece where stored bytes begin again.
                let next_part = st
                    .parts
                    .range((at, 0)..)
                    .map(|(_, p)| p.span.start)
                    .next()
                    .unwrap_or(u64::MAX);
                let piece_end = d.end.min(span.end).min(next_part);
                out.push(Piece::Dropped(Span::new(at, piece_end)));
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
        for d in listing.dropped {
            if !st.dropped.contains(d) {
                st.dropped.insert(d);
                changed = true;
            }
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
    dropped: Vec<Span>,
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

    fn index_dir(&self, context: &Context) -> Path {
        let mut p = self.prefix.clone().join("index");
        for seg in context.as_str().split('/') {
            p = p.join(seg);
        }
        p
    }

    /// `index/{context}/{source}/{hex(name)}`: names may be `.` or `..`, which are not path segments.
    fn index_key(&self, meta: &StreamMeta) -> Path {
        self.index_dir(&meta.context)
            .join(meta.source.as_str())
            .join(hex::encode(meta.name.as_bytes()))
    }

    /// The streams created in `context` (by this version or later: older streams are indexed when
    /// their writer creates them again), as (source, name), sorted.
    pub async fn context_streams(
        &self,
        context: &Context,
    ) -> Result<Vec<(Source, String)>, StoreError> {
        // The context's own streams only: a context is never a prefix of another stream's.
        let mut out: Vec<(Source, String)> = self
            .indexed(Some(context))
            .await?
            .into_iter()
            .filter(|e| e.context == *context)
            .map(|e| (e.source, e.name))
            .collect();
        out.sort_by(|a, b| (&a.1, a.0.as_str()).cmp(&(&b.1, b.0.as_str())));
        out.dedup();
        Ok(out)
    }

    /// The streams indexed under `under` (every stream when `None`), with when each was indexed.
    pub async fn indexed(&self, under: Option<&Context>) -> Result<Vec<Indexed>, StoreError> {
        let root = self.prefix.clone().join("index");
        let dir = under.map_or_else(|| root.clone(), |c| self.index_dir(c));
        let depth = root.parts().count();
        let metas: Vec<object_store::ObjectMeta> = self
            .timed("list", self.os.list(Some(&dir)).try_collect())
            .await?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let segs: Vec<String> = m
                    .location
                    .parts()
                    .skip(depth)
                    .map(|p| p.as_ref().to_owned())
                    .collect();
                let [context @ .., source, name] = segs.as_slice() else {
                    return None;
                };
                let context = Context::stream(&context.join("/")).ok()?;
                let source = match source.as_str() {
                    "entrypoint" => Source::Entrypoint,
                    "ebpf" => Source::Ebpf,
                    _ => return None,
                };
                let name = String::from_utf8(hex::decode(name).ok()?).ok()?;
                Some(Indexed {
                    context,
                    source,
                    name,
                    indexed_ms: m.last_modified.timestamp_millis().max(0) as u64,
                    key: m.location,
                })
            })
            .collect())
    }

    /// When anything of stream `id` was last stored (ms since the epoch), `None` when nothing is.
    pub async fn last_stored_ms(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let prefix = self.prefix.clone().join("streams").join(id);
        let metas: Vec<object_store::ObjectMeta> = self
            .timed("list", self.os.list(Some(&prefix)).try_collect())
            .await?;
        Ok(metas
            .iter()
            .map(|m| m.last_modified.timestamp_millis().max(0) as u64)
            .max())
    }

    /// The workflows that have indexed streams.
    pub async fn indexed_workflows(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.prefix.clone().join("index").join("workflows");
        let listed = self
            .timed("list", self.os.list_with_delimiter(Some(&dir)))
            .await?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }

    /// Claims run `n` of a periodic `kind` of work among the replicas sharing the storage (a
    /// conditional create of `claims/{kind}/{n:016x}`): true for the one replica that made it.
    /// The claims of earlier runs are removed.
    pub async fn claim(&self, kind: &str, n: u64) -> Result<bool, StoreError> {
        let dir = self.prefix.clone().join("claims").join(kind);
        let key = dir.clone().join(format!("{n:016x}"));
        let create = PutOptions::from(PutMode::Create);
        match self
            .timed("put", self.os.put_opts(&key, PutPayload::new(), create))
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        let old: Vec<Path> = self
            .timed("list", self.os.list(Some(&dir)).try_collect::<Vec<_>>())
            .await?
            .into_iter()
            .map(|m| m.location)
            .filter(|l| *l != key)
            .collect();
        for l in old {
            if let Err(e) = self.timed("delete", self.os.delete(&l)).await {
                tracing::debug!(claim = %l, error = %e, "An old claim stays.");
            }
        }
        Ok(true)
    }

    /// Deletes every object of stream `id` and forgets it here; returns how many were deleted.
    /// Idempotent: deleting a stream that is gone deletes nothing.
    pub async fn delete_stream(&self, id: &str) -> Result<usize, StoreError> {
        let prefix = self.prefix.clone().join("streams").join(id);
        let paths: Vec<Path> = self
            .timed(
                "list",
                self.os
                    .list(Some(&prefix))
                    .map_ok(|m| m.location)
                    .try_collect(),
            )
            .await?;
        let n = paths.len();
        let results: Vec<object_store::Result<Path>> = self
            .os
            .delete_stream(futures::stream::iter(paths.into_iter().map(Ok)).boxed())
            .collect()
            .await;
        for r in results {
            match r {
                // Deleted meanwhile by another replica.
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.streams.remove(id);
        Ok(n)
    }

    /// Deletes the streams of `entries` (from [`Store::indexed`]): each stream's objects first,
    /// then its index entry, so that after a crash halfway the index still names what is left and
    /// deleting again finishes. `id_of` names the stream of (context, name, source).
    pub async fn delete_indexed(
        &self,
        entries: &[Indexed],
        id_of: &(dyn Fn(&Context, &str, Source) -> String + Sync),
    ) -> Result<Deleted, StoreError> {
        let mut out = Deleted::default();
        for e in entries {
            out.objects += self
                .delete_stream(&id_of(&e.context, &e.name, e.source))
                .await?;
            match self.timed("delete", self.os.delete(&e.key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            out.streams += 1;
        }
        Ok(out)
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
                (Some("dropped"), n) => out.dropped.extend(parse_span_name(n)),
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

    /// Reads `span` (inside `part`) of `stream`. A part removed since it was planned (merged into
    /// a segment, here or by another replica) is read from the objects that hold its bytes now,
    /// and the stream forgets it.
    pub async fn read_piece(
        &self,
        stream: &Stream,
        span: Span,
        part: &Part,
    ) -> Result<Bytes, StoreError> {
        match self.get_piece(span, part).await {
            Err(StoreError::Storage(object_store::Error::NotFound { .. })) => {
                self.read_moved(stream, span, part).await
            }
            r => r,
        }
    }

    /// Reads `span` (inside `part`) of the object of a stored part.
    async fn get_piece(&self, span: Span, part: &Part) -> Result<Bytes, StoreError> {
        let range = (span.start - part.span.start)..(span.end - part.span.start);
        Ok(self
            .timed("get", self.os.get_range(&part.key, range))
            .await?)
    }

    /// [`Store::read_piece`] of a part that is gone: read from a known object that holds all of
    /// `span` now (the segment it was merged into, when this process merged it or learnt of it);
    /// else the objects that can hold its bytes are listed (a segment is no longer than
    /// [`MAX_OBJECT_LEN`], so from that far before) and read.
    async fn read_moved(
        &self,
        stream: &Stream,
        span: Span,
        part: &Part,
    ) -> Result<Bytes, StoreError> {
        let holder = {
            let st = lock(&stream.state);
            let from = span.start.saturating_sub(MAX_OBJECT_LEN.max(st.longest));
            st.parts
                .range((from, 0)..=(span.start, u64::MAX))
                .map(|(_, p)| p)
                .find(|p| p.key != part.key && p.span.start <= span.start && span.end <= p.span.end)
                .cloned()
        };
        if let Some(holder) = holder {
            match self.get_piece(span, &holder).await {
                Ok(b) => {
                    stream.forget(&[key_of(part.span)]);
                    return Ok(b);
                }
                Err(StoreError::Storage(object_store::Error::NotFound { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        let listed = self
            .list_parts_from(stream, span.start.saturating_sub(MAX_OBJECT_LEN))
            .await?;
        let mut out = BytesMut::with_capacity(span.len() as usize);
        let mut at = span.start;
        while at < span.end {
            let holder = listed
                .iter()
                .filter(|p| p.key != part.key && p.span.start <= at && at < p.span.end)
                .max_by_key(|p| p.span.end);
            let Some(holder) = holder else {
                return Err(StoreError::Storage(object_store::Error::NotFound {
                    path: part.key.to_string(),
                    source: "removed, and no stored object holds its bytes".into(),
                }));
            };
            let end = holder.span.end.min(span.end);
            out.extend_from_slice(&self.get_piece(Span::new(at, end), holder).await?);
            at = end;
        }
        stream.absorb(Listing {
            parts: listed,
            ..Listing::default()
        });
        stream.forget(&[key_of(part.span)]);
        Ok(out.freeze())
    }

    /// Checks `data` (bytes at `start`) against the stored parts in `parts` that overlap it.
    /// Returns the keys of the parts that are gone from storage.
    async fn compare(
        &self,
        parts: &[Part],
        start: u64,
        data: &[u8],
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let mine = Span::new(start, start + data.len() as u64);
        let mut gone = Vec::new();
        for p in parts {
            if !p.span.overlaps(&mine) {
                continue;
            }
            let ov = Span::new(p.span.start.max(mine.start), p.span.end.min(mine.end));
            let theirs = match self.get_piece(ov, p).await {
                Ok(b) => b,
                // Removed since the listing: its writer lost a race and never acknowledged it.
                Err(StoreError::Storage(object_store::Error::NotFound { .. })) => {
                    gone.push(key_of(p.span));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let ours = &data[(ov.start - start) as usize..(ov.end - start) as usize];
            if theirs.as_ref() != ours {
                return Err(StoreError::Conflict { span: ov });
            }
        }
        Ok(gone)
    }

    /// Stores `data` at `start`; when `total` is given, also declares the final length.
    ///
    /// With `start` of `None` the bytes are appended after everything stored, dropped or being
    /// written now.
    pub async fn write(
        &self,
        stream: &Stream,
        start: Option<u64>,
        data: Bytes,
        total: Option<u64>,
    ) -> Result<Written, StoreError> {
        self.write_timed(stream, start, data, total, None).await
    }

    /// [`Store::write`] of bytes whose first one was written at `written_ms` (ms since the Unix
    /// epoch), as their writer says: the time goes into the names of the part's objects (see
    /// [`part_name`]). `None`: the receive time stands in for it, and the names carry none.
    pub async fn write_timed(
        &self,
        stream: &Stream,
        start: Option<u64>,
        data: Bytes,
        total: Option<u64>,
        written_ms: Option<u64>,
    ) -> Result<Written, StoreError> {
        let len = data.len() as u64;
        // Reserve the range against concurrent writers in this process, then see what overlaps.
        let (reservation, overlapping) = loop {
            let mut rx = stream.subscribe();
            {
                let mut st = lock(&stream.state);
                let start = start.unwrap_or_else(|| {
                    let inflight = st.inflight.iter().map(|s| s.end).max().unwrap_or(0);
                    st.stored.max_end().max(st.dropped.max_end()).max(inflight)
                });
                let span = Span::new(start, start + len);
                if let Some(n) = st.final_len {
                    if span.end > n {
                        return Err(StoreError::BeyondFinal {
                            end: span.end,
                            length: n,
                        });
                    }
                    if total.is_some_and(|t| t != n) {
                        return Err(StoreError::FinalLength {
                            wanted: total.unwrap_or(n),
                            reason: format!("the declared final length {n}"),
                        });
                    }
                }
                if let Some(t) = total {
                    let max = st.stored.max_end();
                    if t < max {
                        return Err(StoreError::FinalLength {
                            wanted: t,
                            reason: format!("bytes stored up to {max}"),
                        });
                    }
                }
                if span.is_empty() || !st.inflight.iter().any(|s| s.overlaps(&span)) {
                    let overlapping: Vec<Part> = st
                        .parts
                        .values()
                        .filter(|p| p.span.overlaps(&span))
                        .cloned()
                        .collect();
                    let fully = st.stored.contains(span);
                    if !span.is_empty() {
                        st.inflight.push(span);
                    }
                    break (Reservation { stream, span }, (overlapping, fully));
                }
            }
            // Wait for the overlapping write in flight to finish.
            let _ = rx.changed().await;
        };
        let span = reservation.span;
        let result = self
            .write_reserved(stream, span, data, overlapping, written_ms)
            .await;
        drop(reservation);
        let written = result?;
        if let Some(t) = total {
            self.declare_final(stream, t).await?;
        }
        Ok(written)
    }

    async fn write_reserved(
        &self,
        stream: &Stream,
        span: Span,
        data: Bytes,
        (overlapping, fully): (Vec<Part>, bool),
        written_ms: Option<u64>,
    ) -> Result<Written, StoreError> {
        if span.is_empty() {
            return Ok(Written::Unchanged);
        }
        let gone = self.compare(&overlapping, span.start, &data).await?;
        // A part that vanished no longer holds its bytes: they must be written again.
        stream.forget(&gone);
        if fully && gone.is_empty() {
            return Ok(Written::Unchanged);
        }
        self.register_writer(stream).await?;
        self.before_put(stream).await?;
        let objects: Vec<Span> = objects(span).collect();
        // The futures are made before they are streamed: a closure inside the stream's type
        // would make the handler's future lose `Send`.
        let puts: Vec<_> = objects
            .iter()
            .map(|&o| {
                let bytes =
                    data.slice((o.start - span.start) as usize..(o.end - span.start) as usize);
                self.put_part(&stream.id, o, written_ms, bytes)
            })
            .collect();
        let puts: Vec<Result<Written, StoreError>> = futures::stream::iter(puts)
            .buffered(PUT_CONCURRENCY)
            .collect()
            .await;
        let stored_at = Instant::now();
        let mine: HashMap<(u64, u64), Path> = objects
            .iter()
            .map(|&o| (key_of(o), self.part_key(&stream.id, o, written_ms)))
            .collect();
        // Objects of this write whose bytes another writer stored first under another name.
        let mut twins: HashMap<(u64, u64), Part> = HashMap::new();
        let mut created: Vec<Span> = objects
            .iter()
            .zip(&puts)
            .filter(|(_, r)| matches!(r, Ok(Written::Stored)))
            .map(|(o, _)| *o)
            .collect();
        // A write that is not acknowledged leaves none of its objects behind unchecked.
        let withdraw = |created: &[Span]| {
            let keys: Vec<Path> = created
                .iter()
                .map(|&o| self.part_key(&stream.id, o, written_ms))
                .collect();
            async move { self.withdraw(&stream.id, &keys).await }
        };
        if let Some(e) = puts.into_iter().find_map(Result::err) {
            withdraw(&created).await;
            return Err(e);
        }
        let check = match self.check_for(stream, stored_at).await {
            Ok(check) => check,
            Err(e) => {
                withdraw(&created).await;
                return Err(e);
            }
        };
        if check != Check::Alone {
            if let Check::Shared { wait_until } = check {
                tokio::time::sleep_until(wait_until.into()).await;
            }
            // Another replica may have stored different bytes over part of this range since our
            // snapshot: list the parts that can reach it again and compare with those we did not know.
            let reach = MAX_OBJECT_LEN.max(lock(&stream.state).longest);
            let from = span.start.saturating_sub(reach);
            let listed = match self.list_parts_from(stream, from).await {
                Ok(listed) => listed,
                Err(e) => {
                    withdraw(&created).await;
                    return Err(e);
                }
            };
            // Known by name, not by span: another writer's part of the same span under another
            // write time is another object, and its bytes must be compared all the same.
            let known: HashSet<&Path> = overlapping
                .iter()
                .filter(|p| !gone.contains(&key_of(p.span)))
                .map(|p| &p.key)
                .chain(mine.values())
                .collect();
            let unknown: Vec<Part> = listed
                .iter()
                .filter(|p| p.span.overlaps(&span) && !known.contains(&p.key))
                .cloned()
                .collect();
            match self.compare(&unknown, span.start, &data).await {
                Ok(gone) => {
                    // The same bytes under two names (two writers' times): the name that sorts
                    // first stays, and the other's writer removes its own once it sees it. One
                    // that does not see the other keeps its own, so never both go.
                    let mut dominated: HashSet<Path> = HashSet::new();
                    for p in listed.iter().filter(|p| !gone.contains(&key_of(p.span))) {
                        match mine.get(&key_of(p.span)) {
                            Some(k) if p.key != *k && p.key.as_ref() < k.as_ref() => {
                                twins.insert(key_of(p.span), p.clone());
                            }
                            Some(k) if p.key != *k => {
                                dominated.insert(p.key.clone());
                            }
                            _ => {}
                        }
                    }
                    let yielded: Vec<Span> = created
                        .iter()
                        .copied()
                        .filter(|o| twins.contains_key(&key_of(*o)))
                        .collect();
                    withdraw(&yielded).await;
                    created.retain(|o| !twins.contains_key(&key_of(*o)));
                    stream.absorb(Listing {
                        parts: listed
                            .into_iter()
                            .filter(|p| {
                                !gone.contains(&key_of(p.span)) && !dominated.contains(&p.key)
                            })
                            .collect(),
                        complete_from: Some(from),
                        ..Listing::default()
                    });
                }
                Err(e) => {
                    // Ours lost the race (or could not be checked): remove it so readers never see
                    // two versions.
                    withdraw(&created).await;
                    let created: HashSet<(u64, u64)> = created.into_iter().map(key_of).collect();
                    stream.absorb(Listing {
                        parts: listed
                            .into_iter()
                            .filter(|p| !created.contains(&key_of(p.span)))
                            .collect(),
                        ..Listing::default()
                    });
                    return Err(e);
                }
            }
            if let Check::Rejoined { listed_at } = check {
                // The others' parts anywhere in the stream, before its cache is trusted alone.
                // This write is checked already: a failure only leaves the next one to retry.
                match self.refresh(stream).await {
                    Ok(_) => {
                        let mut st = lock(&stream.state);
                        if st.writers.listed == Some((listed_at, true)) {
                            st.writers.others_seen = false;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(stream = %stream.id, error = %e, "Relisting the stream failed.");
                    }
                }
            }
        }
        let now = now_ms();
        {
            let mut st = lock(&stream.state);
            for o in objects {
                let part = match twins.remove(&key_of(o)) {
                    Some(twin) => twin,
                    None => Part {
                        span: o,
                        key: mine
                            .get(&key_of(o))
                            .cloned()
                            .unwrap_or_else(|| self.part_key(&stream.id, o, written_ms)),
                        received_ms: now,
                        written_ms: written_ms.unwrap_or(now),
                        local: true,
                    },
                };
                match st.parts.entry(key_of(o)) {
                    Entry::Occupied(mut e) if e.get().key == part.key => e.get_mut().local = true,
                    Entry::Occupied(mut e) => {
                        e.insert(part);
                    }
                    Entry::Vacant(e) => {
                        e.insert(part);
                    }
                }
                st.stored.insert(o);
                st.longest = st.longest.max(o.len());
            }
            if !created.is_empty() {
                note_received(&mut st.received, now);
            }
        }
        let new_bytes: u64 = created.iter().map(Span::len).sum();
        self.metrics.bytes_stored.inc_by(new_bytes);
        self.metrics
            .workflow_bytes(&stream.meta, crate::metrics::Kind::Stored, new_bytes);
        Ok(if created.is_empty() {
            Written::Unchanged
        } else {
            Written::Stored
        })
    }

    /// Registers this process as a writer of `stream` in the current epoch, unless it is already.
    async fn register_writer(&self, stream: &Stream) -> Result<(), StoreError> {
        let epoch = writer_epoch();
        let last = lock(&stream.state).writers.registered.map(|(e, _)| e);
        if last == Some(epoch) {
            return Ok(());
        }
        let key = self.writer_key(&stream.id, epoch);
        let create = PutOptions::from(PutMode::Create);
        match self
            .timed("put", self.os.put_opts(&key, PutPayload::new(), create))
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let done = Instant::now();
        {
            let mut st = lock(&stream.state);
            let w = &mut st.writers;
            let since = match w.registered {
                // The previous registration is of the epoch before (or after, when the clock
                // was set back a little): every other writer still sees one of the two.
                Some((e, since)) if e.abs_diff(epoch) <= 1 => since,
                _ => done,
            };
            w.registered = Some((epoch, since));
        }
        // The new registration covers the old one: a stream written for a year keeps one.
        if let Some(prev) = last.filter(|&e| e < epoch) {
            let old = self.writer_key(&stream.id, prev);
            if let Err(e) = self.timed("delete", self.os.delete(&old)).await {
                tracing::debug!(stream = %stream.id, error = %e, "An old writer registration stays.");
            }
        }
        Ok(())
    }

    fn writer_key(&self, id: &str, epoch: u64) -> Path {
        self.key(id, &format!("writers/{epoch:016x}-{}", self.replica))
    }

    /// Lists the writers registered in the epochs around now: whether this process is the only
    /// one, and when the listing began. A name it cannot read counts as another writer.
    async fn list_writers(&self, stream: &Stream) -> Result<(bool, Instant), StoreError> {
        let epoch = writer_epoch();
        let dir = self.key(&stream.id, "writers");
        // Every key of the epochs seen sorts after this one (the epoch is a strict prefix).
        let first = epoch.saturating_sub(WRITER_EPOCHS_SEEN);
        let from = dir.clone().join(format!("{first:016x}"));
        let started = Instant::now();
        let metas: Vec<object_store::ObjectMeta> = self
            .timed(
                "list",
                self.os.list_with_offset(Some(&dir), &from).try_collect(),
            )
            .await?;
        let alone = metas.iter().all(|m| {
            let Some((e, who)) = m.location.filename().and_then(|n| n.split_once('-')) else {
                return false;
            };
            match u64::from_str_radix(e, 16) {
                Ok(e) => who == self.replica || e > epoch + WRITER_EPOCHS_SEEN,
                Err(_) => false,
            }
        });
        let mut st = lock(&stream.state);
        let w = &mut st.writers;
        if w.listed.is_none_or(|(t, _)| t <= started) {
            w.listed = Some((started, alone));
        }
        w.others_seen |= !alone;
        Ok((alone, started))
    }

    /// Before a write's objects are stored: lists the writers unless a listing within the window
    /// did, and when others write the stream, waits until this process's run of registrations is
    /// a quarter more than the window old (see the module's notes). Waiting here rather than
    /// between the store and the check after it means that a request given up meanwhile leaves
    /// nothing stored unchecked.
    async fn before_put(&self, stream: &Stream) -> Result<(), StoreError> {
        let (listed, since) = {
            let st = lock(&stream.state);
            (st.writers.listed, st.writers.registered.map(|(_, s)| s))
        };
        let alone = match listed {
            Some((t, alone)) if Instant::now() < t + self.writer_window => alone,
            _ => self.list_writers(stream).await?.0,
        };
        if let (false, Some(since)) = (alone, since) {
            tokio::time::sleep_until((since + self.writer_window * 5 / 4).into()).await;
        }
        Ok(())
    }

    /// How a write whose objects were all stored by `stored_at` is checked against the parts of
    /// other replicas (see the module's notes).
    async fn check_for(&self, stream: &Stream, stored_at: Instant) -> Result<Check, StoreError> {
        let (listed, others_seen, since) = {
            let st = lock(&stream.state);
            let w = &st.writers;
            (w.listed, w.others_seen, w.registered.map(|(_, s)| s))
        };
        let (alone, listed_at) = match listed {
            Some((t, alone)) if stored_at < t + self.writer_window => (alone, t),
            _ => self.list_writers(stream).await?,
        };
        Ok(match (alone, others_seen) {
            (true, false) => Check::Alone,
            (true, true) => Check::Rejoined { listed_at },
            (false, _) => Check::Shared {
                wait_until: since.unwrap_or(listed_at) + self.writer_window * 5 / 4,
            },
        })
    }

    /// Stores one object of a part with a conditional create: `Unchanged` when the same bytes
    /// were stored under its key before (a retry, or another replica), a conflict when others were.
    async fn put_part(
        &self,
        id: &str,
        span: Span,
        written_ms: Option<u64>,
        data: Bytes,
    ) -> Result<Written, StoreError> {
        let key = self.part_key(id, span, written_ms);
        let put = |data: Bytes| {
            self.timed(
                "put",
                self.os.put_opts(
                    &key,
                    PutPayload::from_bytes(data),
                    PutOptions::from(PutMode::Create),
                ),
            )
        };
        match put(data.clone()).await {
            Ok(_) => Ok(Written::Stored),
            Err(object_store::Error::AlreadyExists { .. }) => {
                match self.timed("get", self.os.get(&key)).await {
                    Ok(existing) => {
                        if existing.bytes().await? == data {
                            Ok(Written::Unchanged)
                        } else {
                            Err(StoreError::Conflict { span })
                        }
                    }
                    // It lost a race and was removed: ours may take its place.
                    Err(object_store::Error::NotFound { .. }) => match put(data).await {
                        Ok(_) => Ok(Written::Stored),
                        Err(object_store::Error::AlreadyExists { .. }) => {
                            Err(StoreError::Conflict { span })
                        }
                        Err(e) => Err(e.into()),
                    },
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The segment holding offsets from `k * segment`: cut at the final length, empty past it.
    fn cell(&self, k: u64, final_len: Option<u64>) -> Span {
        let start = k.saturating_mul(self.segment);
        let end = start.saturating_add(self.segment);
        Span::new(start, final_len.map_or(end, |n| end.min(n).max(start)))
    }

    /// Whether an object of `span` is a segment: it covers one cell exactly.
    fn is_segment(&self, span: Span, final_len: Option<u64>) -> bool {
        span.start.is_multiple_of(self.segment)
            && span == self.cell(span.start / self.segment, final_len)
    }

    /// Whether the stream has bytes to merge that no compaction of this process is merging:
    /// a whole segment stored (or dropped) past what is merged, or the last bytes of a complete
    /// stream.
    /// Cheap: callers ask after every write.
    pub fn wants_compaction(&self, stream: &Stream) -> bool {
        let st = lock(&stream.state);
        if st.compacting || st.compact_after.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        self.next_cell(&st).is_some()
    }

    /// The first cell not merged yet, when nothing of it is pending: every byte stored or
    /// dropped. Most writes end before that cell does, which is answered without building the
    /// union of the two.
    fn next_cell(&self, st: &State) -> Option<Span> {
        let cell = self.cell(st.segmented_to.div_ceil(self.segment), st.final_len);
        if cell.is_empty() || st.stored.max_end().max(st.dropped.max_end()) < cell.end {
            return None;
        }
        (st.stored.contains(cell) || st.stored.union(&st.dropped).contains(cell)).then_some(cell)
    }

    /// Merges the stream's stored bytes into segments (see [`SEGMENT`]), cell by cell from the
    /// first not merged yet, up to the first cell with bytes still pending: one conditional put
    /// of the segment, then the removal of every object it and its neighbours cover. A cell with
    /// a dropped range keeps its parts.
    ///
    /// Safe beside writers and readers on any replica, and at every crash point: a segment holds
    /// bytes that were stored and acknowledged (parts of other replicas only once
    /// [`SETTLED_AFTER`] old, so never one that loses a conflict), objects are removed only once
    /// segments that cover them are stored, and a reader that planned a removed object reads its
    /// bytes again from the segment ([`Store::read_piece`]). A segment is no longer than any part
    /// may be, so the check after each write still finds it.
    pub async fn compact(&self, stream: &Stream) -> Result<Compacted, StoreError> {
        self.compact_limited(stream, usize::MAX).await
    }

    /// [`Store::compact`], stopping after `mutations` storage writes and removals as a process
    /// killed there would: the crash points of the model test.
    #[doc(hidden)]
    pub async fn compact_limited(
        &self,
        stream: &Stream,
        mutations: usize,
    ) -> Result<Compacted, StoreError> {
        {
            let mut st = lock(&stream.state);
            if st.compacting {
                return Ok(Compacted::default());
            }
            st.compacting = true;
        }
        let _running = CompactionRunning(stream);
        let result = self.compact_cells(stream, mutations).await;
        if result.is_err() {
            // A storage that keeps failing (a bucket policy without deletes, say) must not cost
            // a merge's reads on every write.
            lock(&stream.state).compact_after = Some(Instant::now() + COMPACT_RETRY);
        }
        result
    }

    async fn compact_cells(
        &self,
        stream: &Stream,
        mutations: usize,
    ) -> Result<Compacted, StoreError> {
        let mut left = mutations;
        let mut out = Compacted::default();
        loop {
            let (cell, objects, final_len) = {
                let st = lock(&stream.state);
                let Some(cell) = self.next_cell(&st) else {
                    break;
                };
                if st.inflight.iter().any(|s| s.overlaps(&cell)) {
                    break;
                }
                if !st.stored.contains(cell) {
                    // Bytes of it were lost (dropped): its parts stay as they are, and the
                    // cells after it are merged all the same.
                    drop(st);
                    lock(&stream.state).segmented_to = cell.end;
                    continue;
                }
                let from = (cell.start.saturating_sub(st.longest), 0);
                let objects: Vec<Part> = st
                    .parts
                    .range(from..(cell.end, 0))
                    .map(|(_, p)| p)
                    .filter(|p| p.span.overlaps(&cell))
                    .cloned()
                    .collect();
                (cell, objects, st.final_len)
            };
            if objects.len() <= self.merge_above {
                // Few objects, large ones: merging would copy every byte again (on a file system
                // it doubled the CPU a GB of 1 MiB parts costs) to save no more than a few.
                lock(&stream.state).segmented_to = cell.end;
                continue;
            }
            if !objects.iter().any(|p| p.span == cell) {
                let settled = now_ms().saturating_sub(self.settled_after.as_millis() as u64);
                if objects.iter().any(|p| !p.local && p.received_ms > settled) {
                    lock(&stream.state).compact_after = Some(Instant::now() + self.settled_after);
                    break;
                }
                let (pieces, _) = stream.plan(cell);
                let times = segment_times(cell, &pieces);
                let data = self.read_all(stream, cell).await?;
                if data.len() as u64 != cell.len() {
                    // Bytes went missing under the read (another replica's removals): next time.
                    break;
                }
                // The segment's name carries the time of its first byte, and the times of the
                // rest go in its index, stored first: a segment is never without its index
                // (rewritten whole by a compaction that crashed in between).
                let first_ms = times.as_ref().and_then(|t| t.entries.first()).map(|e| e.1);
                if let Some(times) = &times {
                    if left == 0 {
                        return Ok(out);
                    }
                    left -= 1;
                    let key = self.key(&stream.id, &format!("times/{}", span_name(cell)));
                    let put = self.os.put(&key, PutPayload::from(times.encode()));
                    self.timed("put", put).await?;
                    lock(&stream.state).indexed.insert(key_of(cell));
                }
                if left == 0 {
                    return Ok(out);
                }
                left -= 1;
                let written = self.put_part(&stream.id, cell, first_ms, data).await?;
                let received_ms = objects.iter().map(|p| p.received_ms).max().unwrap_or(0);
                lock(&stream.state)
                    .parts
                    .entry(key_of(cell))
                    .or_insert_with(|| Part {
                        span: cell,
                        key: self.part_key(&stream.id, cell, first_ms),
                        received_ms,
                        written_ms: first_ms.unwrap_or(received_ms),
                        local: true,
                    });
                if written == Written::Stored {
                    out.segments += 1;
                    self.metrics.segments_stored.inc();
                }
            }
            // Every object of the cell that segments cover (a part reaching into the next cell
            // goes with that cell's segment).
            let removable: Vec<Part> = {
                let st = lock(&stream.state);
                let mut segments = RangeSet::new();
                for p in st.parts.values() {
                    if self.is_segment(p.span, final_len) {
                        segments.insert(p.span);
                    }
                }
                objects
                    .into_iter()
                    .filter(|p| !self.is_segment(p.span, final_len) && segments.contains(p.span))
                    .collect()
            };
            let removing: Vec<Part> = removable.into_iter().take(left).collect();
            left -= removing.len();
            let paths: Vec<Result<Path, object_store::Error>> =
                removing.iter().map(|p| Ok(p.key.clone())).collect();
            let t = Instant::now();
            let removed: Vec<Result<Path, object_store::Error>> = self
                .os
                .delete_stream(futures::stream::iter(paths).boxed())
                .collect()
                .await;
            self.metrics.storage_latency("delete", t.elapsed(), true);
            // One answer per path, perhaps in another order (S3 deletes in batches); a path not
            // found is gone as surely as a deleted one, and names itself in the error in a
            // backend's own way, so only the paths confirmed deleted count when others failed.
            let mut deleted: HashSet<String> = HashSet::new();
            let mut failed = None;
            for r in removed {
                match r {
                    Ok(path) => {
                        deleted.insert(path.to_string());
                    }
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => failed = Some(e),
                }
            }
            let gone: Vec<(u64, u64)> = removing
                .iter()
                .filter(|p| failed.is_none() || deleted.contains(p.key.as_ref()))
                .map(|p| key_of(p.span))
                .collect();
            out.removed += gone.len();
            self.metrics.objects_merged.inc_by(gone.len() as u64);
            let next = {
                let mut st = lock(&stream.state);
                st.remove_parts(&gone);
                let all_gone = gone.len() == removing.len();
                if all_gone && left > 0 {
                    st.segmented_to = cell.end;
                }
                all_gone && left > 0
            };
            if let Some(e) = failed {
                return Err(e.into());
            }
            if !next {
                break;
            }
        }
        Ok(out)
    }

    /// Removes the objects a failed write created; best effort, as a part left behind is still
    /// found and compared by the next writer of its range.
    async fn withdraw(&self, id: &str, keys: &[Path]) {
        for key in keys {
            if let Err(e) = self.timed("delete", self.os.delete(key)).await {
                tracing::warn!(stream = id, part = %key, error = %e, "Cannot remove a part of a failed write.");
            }
        }
    }

    /// The key of the object of a part.
    fn part_key(&self, id: &str, span: Span, written_ms: Option<u64>) -> Path {
        self.key(id, &format!("parts/{}", part_name(span, written_ms)))
    }

    /// Declares the final length of the stream.
    pub async fn declare_final(&self, stream: &Stream, total: u64) -> Result<(), StoreError> {
        {
            let st = lock(&stream.state);
            match st.final_len {
                Some(n) if n == total => return Ok(()),
                Some(n) => {
                    return Err(StoreError::FinalLength {
                        wanted: total,
                        reason: format!("the declared final length {n}"),
                    });
                }
                None => {}
            }
            let covered = st.stored.union(&st.dropped).max_end();
            if total < covered {
                return Err(StoreError::FinalLength {
                    wanted: total,
                    reason: format!("bytes stored or dropped up to {covered}"),
                });
            }
        }
        let key = self.key(&stream.id, "final");
        let put = self.os.put_opts(
            &key,
            PutPayload::from(total.to_string()),
            PutOptions::from(PutMode::Create),
        );
        match self.timed("put", put).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                let b = self.timed("get", self.os.get(&key)).await?.bytes().await?;
                let n: Option<u64> = std::str::from_utf8(&b).ok().and_then(|s| s.parse().ok());
                if n != Some(total) {
                    return Err(StoreError::FinalLength {
                        wanted: total,
                        reason: format!("the declared final length {}", n.unwrap_or_default()),
                    });
                }
            }
            Err(e) => return Err(e.into()),
        }
        lock(&stream.state).final_len = Some(total);
        stream.notify();
        Ok(())
    }

    /// Records a `dropped` range. Never refused for load: it is what lets readers move on.
    pub async fn mark_dropped(&self, stream: &Stream, span: Span) -> Result<(), StoreError> {
        {
            let st = lock(&stream.state);
            if let Some(n) = st.final_len
                && span.end > n
            {
                return Err(StoreError::BeyondFinal {
                    end: span.end,
                    length: n,
                });
            }
            if st.dropped.contains(span) {
                return Ok(());
            }
        }
        self.put_marker(&stream.id, &format!("dropped/{}", span_name(span)))
            .await?;
        let new = {
            let mut st = lock(&stream.state);
            let mut only = RangeSet::new();
            only.insert(span);
            let new = only.difference(&st.dropped).covered();
            st.dropped.insert(span);
            new
        };
        self.metrics.bytes_dropped.inc_by(span.len());
        self.metrics
            .workflow_bytes(&stream.meta, crate::metrics::Kind::Dropped, new);
        stream.notify();
        Ok(())
    }

    /// Settles a stream whose writer died (its container is gone) without declaring its end:
    /// every range below `total` (the length the other capture path saw; at least what is stored
    /// or dropped) that is neither stored nor dropped becomes dropped, `total` becomes its final
    /// length, and the first such offset is recorded as where the writer died. Returns that
    /// offset; `None` when nothing was pending, or when the stream had ended after all.
    pub async fn settle(&self, stream: &Stream, total: u64) -> Result<Option<u64>, StoreError> {
        self.refresh(stream).await?;
        let (pending, total) = {
            let st = lock(&stream.state);
            if st.final_len.is_some() {
                return Ok(None);
            }
            let covered = st.stored.union(&st.dropped);
            let total = total.max(covered.max_end());
            (covered.gaps(Span::new(0, total)), total)
        };
        let died_at = pending.first().map(|s| s.start);
        if let Some(at) = died_at {
            self.put_marker(&stream.id, &format!("writer-died/{at:016x}"))
                .await?;
            let mut st = lock(&stream.state);
            st.writer_died_at = Some(st.writer_died_at.map_or(at, |known| known.min(at)));
        }
        for span in pending {
            self.mark_dropped(stream, span).await?;
        }
        self.declare_final(stream, total).await?;
        Ok(died_at)
    }

    /// Creates the empty marker object `name` of stream `id`; one there already is the same
    /// marker (another replica, or a retry, wrote it).
    async fn put_marker(&self, id: &str, name: &str) -> Result<(), StoreError> {
        let key = self.key(id, name);
        let put = self
            .os
            .put_opts(&key, PutPayload::new(), PutOptions::from(PutMode::Create));
        match self.timed("put", put).await {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The write times of the bytes of `part`: from its index when it is a segment that has one
    /// (one small GET; the stream's listing says which have), else its own time for all of it.
    pub async fn times(&self, stream: &Stream, part: &Part) -> Result<TimeIndex, StoreError> {
        let single = TimeIndex::single(part.span, part.written_ms);
        if !lock(&stream.state).indexed.contains(&key_of(part.span)) {
            return Ok(single);
        }
        let key = self.key(&stream.id, &format!("times/{}", span_name(part.span)));
        match self.timed("get", self.os.get(&key)).await {
            Ok(r) => Ok(TimeIndex::decode(part.span, &r.bytes().await?).unwrap_or(single)),
            Err(object_store::Error::NotFound { .. }) => Ok(single),
            Err(e) => Err(e.into()),
        }
    }

    /// The first offset of the stream's stored bytes written at or after `ms` (ms since the Unix
    /// epoch), or its readable end when none were: where a read `since` a time starts. Write
    /// times rise with the offset on one stream (one writer reads one pipe in order), so the
    /// objects are searched by the time of their first byte, which their names carry, and only the
    /// index of the one found is read.
    pub async fn offset_since(&self, stream: &Stream, ms: u64) -> Result<u64, StoreError> {
        let (objects, length) = {
            let st = lock(&stream.state);
            let covered = st.stored.union(&st.dropped);
            let length = covered.prefix_end();
            let (pieces, _) = stream.plan_locked(&st, Span::new(0, length));
            let objects: Vec<Part> = pieces
                .into_iter()
                .filter_map(|p| match p {
                    Piece::Data { part, .. } => Some(part),
                    Piece::Dropped(_) => None,
                })
                .collect();
            (objects, length)
        };
        // The last object whose first byte is older than `ms` may hold the first newer one.
        let i = objects.partition_point(|p| p.written_ms < ms);
        if i > 0 {
            let candidate = &objects[i - 1];
            let index = self.times(stream, candidate).await?;
            if let Some(at) = index.first_written_since(ms) {
                return Ok(at.max(candidate.span.start));
            }
        }
        Ok(objects.get(i).map_or(length, |p| p.span.start))
    }

    /// Where the last `lines` lines of the stream's readable bytes begin: the objects are read
    /// backwards from the end, one at a time, until they hold that many line ends, so the cost is
    /// the tail's size, not the stream's. A final line without its newline counts as a line.
    pub async fn offset_of_last_lines(
        &self,
        stream: &Stream,
        lines: u64,
    ) -> Result<u64, StoreError> {
        let (pieces, _) = {
            let st = lock(&stream.state);
            let length = st.stored.union(&st.dropped).prefix_end();
            stream.plan_locked(&st, Span::new(0, length))
        };
        let Some(end) = pieces.last().map(|p| match p {
            Piece::Data { span, .. } | Piece::Dropped(span) => span.end,
        }) else {
            return Ok(0);
        };
        if lines == 0 {
            return Ok(end);
        }
        // Newlines to find: one per line, and one more for the line before the first, except
        // that a last line without its newline has none.
        let mut wanted = lines;
        let mut last_byte_seen = false;
        for piece in pieces.iter().rev() {
            let Piece::Data { span, part } = piece else {
                continue;
            };
            let data = self.read_piece(stream, *span, part).await?;
            let mut tail = data.as_ref();
            if !last_byte_seen {
                last_byte_seen = true;
                if span.end == end && tail.last() == Some(&b'\n') {
                    tail = &tail[..tail.len() - 1];
                }
            }
            for i in memchr::memrchr_iter(b'\n', tail) {
                wanted -= 1;
                if wanted == 0 {
                    return Ok(span.start + i as u64 + 1);
                }
            }
        }
        Ok(0)
    }

    /// Reads `span` of the stream into memory (for tests and small reads).
    pub async fn read_all(&self, stream: &Stream, span: Span) -> Result<Bytes, StoreError> {
        let (pieces, _) = stream.plan(span);
        let mut out = BytesMut::new();
        let mut fetched = futures::stream::iter(pieces.into_iter().filter_map(|p| match p {
            Piece::Data { span, part } => {
                Some(async move { self.read_piece(stream, span, &part).await })
            }
            Piece::Dropped(_) => None,
        }))
        .buffered(8);
        while let Some(b) = fetched.next().await {
            out.extend_from_slice(&b?);
        }
        Ok(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn store() -> Store {
        Store::new(
            Arc::new(InMemory::new()),
            Path::from("t"),
            Arc::new(Metrics::new()),
        )
    }

    #[tokio::test]
    async fn the_cache_keeps_what_is_in_use_and_forgets_the_rest() {
        let store = store().cache_capacity(50);
        let held = store.create("held".into(), meta()).await.unwrap();
        held_write(&store, &held).await;
        for i in 0..1000 {
            store.create(format!("s{i}"), meta()).await.unwrap();
        }
        // Bounded by the capacity (quick_cache may keep a few more while it settles).
        assert!(store.cached_streams() <= 60, "{}", store.cached_streams());
        // The stream held all along is the one the store still hands out: a write through the
        // store reaches whoever follows the held copy.
        let again = store.open("held").await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&held, &again));
        // An evicted one is loaded again from storage, whole.
        drop((held, again));
        let s0 = store.open("s0").await.unwrap().unwrap();
        assert_eq!(s0.status().length, 0);
        let reloaded = store.open("held").await.unwrap().unwrap();
        assert_eq!(reloaded.status().length, 5);
    }

    async fn held_write(store: &Store, s: &Stream) {
        store
            .write(s, Some(0), Bytes::from_static(b"hello"), None)
            .await
            .unwrap();
    }

    #[test]
    fn the_tenant_is_the_namespace_where_known_else_the_workflow() {
        let mut m = meta();
        assert_eq!(m.tenant(), format!("workflow/{}", m.context.workflow()));
        m.namespace = Some(m.context.workflow().to_owned());
        // The same name as a namespace is another tenant.
        assert_eq!(m.tenant(), format!("namespace/{}", m.context.workflow()));
    }

    fn meta() -> StreamMeta {
        StreamMeta {
            context: Context::stream("workflows/w/triggers/t").unwrap(),
            name: "stdout".into(),
            source: Source::Entrypoint,
            entrypoint_absent: None,
            namespace: None,
        }
    }

    #[tokio::test]
    async fn out_of_order_parts_resend_and_conflict() {
        let s = store();
        let st = s.create("a".into(), meta()).await.unwrap();
        assert_eq!(
            s.write(&st, Some(5), Bytes::from_static(b"world"), None)
                .await
                .unwrap(),
            Written::Stored
        );
        assert_eq!(st.status().length, 0);
        assert_eq!(st.status().pending, vec![Span::new(0, 5)]);
        s.write(&st, Some(0), Bytes::from_static(b"hello"), None)
            .await
            .unwrap();
        assert_eq!(
            s.write(&st, Some(2), Bytes::from_static(b"llowo"), None)
                .await
                .unwrap(),
            Written::Unchanged
        );
        assert!(matches!(
            s.write(&st, Some(2), Bytes::from_static(b"XXXXX"), None)
                .await,
            Err(StoreError::Conflict { .. })
        ));
        s.write(&st, Some(10), Bytes::new(), Some(10))
            .await
            .unwrap();
        let status = st.status();
        assert!(status.complete);
        assert_eq!(
            s.read_all(&st, Span::new(0, 10)).await.unwrap(),
            &b"helloworld"[..]
        );
        assert!(matches!(
            s.write(&st, Some(10), Bytes::from_static(b"!"), None).await,
            Err(StoreError::BeyondFinal { .. })
        ));
    }

    #[tokio::test]
    async fn dropped_ranges_are_skipped_and_survive_reload() {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let m = Arc::new(Metrics::new());
        let s = Store::new(os.clone(), Path::from("t"), m.clone());
        let st = s.create("a".into(), meta()).await.unwrap();
        s.write(&st, Some(0), Bytes::from_static(b"abc"), None)
            .await
            .unwrap();
        s.mark_dropped(&st, Span::new(3, 6)).await.unwrap();
        s.write(&st, Some(6), Bytes::from_static(b"ghi"), Some(9))
            .await
            .unwrap();
        assert!(st.status().complete);
        let fresh = Store::new(os, Path::from("t"), m);
        let st2 = fresh.open("a").await.unwrap().unwrap();
        let status = st2.status();
        assert!(status.complete);
        assert_eq!(status.dropped, vec![Span::new(3, 6)]);
        assert_eq!(
            fresh.read_all(&st2, Span::new(0, 9)).await.unwrap(),
            &b"abcghi"[..]
        );
        assert!(fresh.open("missing").await.unwrap().is_none());
    }

    fn pattern(seed: u8, n: usize) -> Bytes {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>()
            .into()
    }

    async fn part_keys(os: &Arc<dyn ObjectStore>) -> Vec<String> {
        let mut keys: Vec<String> = os
            .list(Some(&Path::from("t")))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.retain(|k| k.contains("/parts/"));
        keys.sort();
        keys
    }

    #[tokio::test]
    async fn long_writes_are_stored_as_bounded_objects() {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let s = Store::new(os.clone(), Path::from("t"), Arc::new(Metrics::new()));
        let st = s.create("a".into(), meta()).await.unwrap();
        let max = MAX_OBJECT_LEN as usize;
        let data = pattern(1, 2 * max + 10);
        assert_eq!(
            s.write(&st, Some(7), data.clone(), None).await.unwrap(),
            Written::Stored
        );
        let keys = part_keys(&os).await;
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert!(keys[0].ends_with(&span_name(Span::new(7, 7 + max as u64))));
        assert_eq!(
            s.read_all(&st, Span::new(7, 7 + data.len() as u64))
                .await
                .unwrap(),
            data
        );
        // A fresh process reads the same objects back and knows the re-send.
        let fresh = Store::new(os.clone(), Path::from("t"), Arc::new(Metrics::new()))
            .writer_window(Duration::from_millis(1));
        let st2 = fresh.open("a").await.unwrap().unwrap();
        assert_eq!(
            fresh
                .write(&st2, Some(7), data.clone(), None)
                .await
                .unwrap(),
            Written::Unchanged
        );
        // Differing bytes in the last object only: nothing of the write is kept.
        let mut other = data.to_vec();
        other.truncate(max + 20);
        other.extend_from_slice(&pattern(2, 2 * max));
        let other = Bytes::from(other);
        assert!(matches!(
            fresh.write(&st2, Some(7), other, None).await,
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(part_keys(&os).await, keys);
        // A part another replica stored inside the second object, unknown to this one: the check
        // after the puts finds it and every object of the write is removed again.
        let st3 = fresh.create("b".into(), meta()).await.unwrap();
        register_other(&os, "b").await;
        let theirs = Span::new(MAX_OBJECT_LEN + 5, MAX_OBJECT_LEN + 9);
        let key = Path::from(format!("t/streams/b/parts/{}", span_name(theirs)));
        os.put(&key, Bytes::from_static(b"zzzz").into())
            .await
            .unwrap();
        assert!(matches!(
            fresh.write(&st3, Some(0), data.clone(), None).await,
            Err(StoreError::Conflict { .. })
        ));
        let left: Vec<String> = part_keys(&os)
            .await
            .into_iter()
            .filter(|k| k.contains("/b/"))
            .collect();
        assert_eq!(left, vec![key.to_string()]);
    }

    #[tokio::test]
    async fn a_part_longer_than_the_object_bound_is_still_checked() {
        // Parts written before the bound existed (or by an older replica) may be longer; a stream
        // that holds one widens the check after each write to its length.
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let m = Arc::new(Metrics::new());
        let max = MAX_OBJECT_LEN;
        let put_raw = |span: Span, seed: u8| {
            let os = os.clone();
            async move {
                let key = Path::from(format!("t/streams/x/parts/{}", span_name(span)));
                let body = pattern(seed, span.len() as usize);
                os.put(&key, body.into()).await.unwrap();
            }
        };
        put_raw(Span::new(0, max + 100), 1).await;
        let b = Store::new(os.clone(), Path::from("t"), m).writer_window(Duration::from_millis(1));
        let sb = b.create("x".into(), meta()).await.unwrap();
        // Stored by another replica after b listed the stream: b does not know it.
        register_other(&os, "x").await;
        let long = Span::new(max + 200, 2 * max + 300);
        put_raw(long, 3).await;
        let at = 2 * max + 250;
        let theirs = pattern(3, long.len() as usize).slice((at - long.start) as usize..);
        assert!(matches!(
            b.write(&sb, Some(at), Bytes::from(vec![0xff; 10]), None)
                .await,
            Err(StoreError::Conflict { .. })
        ));
        // The check taught b their part: the same bytes are already stored.
        assert_eq!(
            b.write(&sb, Some(at), theirs.slice(..10), None)
                .await
                .unwrap(),
            Written::Unchanged
        );
    }

    /// Registers a writer of stream `id` other than any store, as another replica does before
    /// its parts (see [`Store::write`]).
    async fn register_other(os: &Arc<dyn ObjectStore>, id: &str) {
        let key = format!("t/streams/{id}/writers/{:016x}-other", writer_epoch());
        os.put(&Path::from(key), PutPayload::new()).await.unwrap();
    }

    #[tokio::test]
    async fn a_known_part_removed_from_storage_is_written_again() {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let m = Arc::new(Metrics::new());
        let a = Store::new(os.clone(), Path::from("t"), m.clone());
        let b = Store::new(os.clone(), Path::from("t"), m);
        let sa = a.create("x".into(), meta()).await.unwrap();
        let sb = b.create("x".into(), meta()).await.unwrap();
        b.write(&sb, Some(0), Bytes::from_static(b"0123456789"), None)
            .await
            .unwrap();
        a.refresh(&sa).await.unwrap();
        // b's part loses a race and is removed; a still has it in its state.
        for k in part_keys(&os).await {
            os.delete(&Path::from(k)).await.unwrap();
        }
        assert_eq!(
            a.write(&sa, Some(2), Bytes::from_static(b"23456"), None)
                .await
                .unwrap(),
            Written::Stored
        );
        assert_eq!(part_keys(&os).await.len(), 1);
        assert_eq!(
            a.read_all(&sa, Span::new(2, 7)).await.unwrap(),
            &b"23456"[..]
        );
    }

    #[tokio::test]
    async fn two_stores_on_one_backend_do_not_diverge() {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let m = Arc::new(Metrics::new());
        let window = Duration::from_millis(50);
        let a = Store::new(os.clone(), Path::from("t"), m.clone()).writer_window(window);
        let b = Store::new(os, Path::from("t"), m).writer_window(window);
        let sa = a.create("x".into(), meta()).await.unwrap();
        let sb = b.create("x".into(), meta()).await.unwrap();
        a.write(&sa, Some(0), Bytes::from_static(b"0123456789"), None)
            .await
            .unwrap();
        // b does not know a's part yet; a different overlapping range must still be refused.
        assert!(matches!(
            b.write(&sb, Some(5), Bytes::from_static(b"XXXXXXXXXX"), None)
                .await,
            Err(StoreError::Conflict { .. })
        ));
        b.write(&sb, Some(5), Bytes::from_static(b"56789abcde"), None)
            .await
            .unwrap();
        a.refresh(&sa).await.unwrap();
        assert_eq!(
            a.read_all(&sa, Span::new(0, 15)).await.unwrap(),
            &b"0123456789abcde"[..]
        );
    }
    #[tokio::test]
    async fn a_lone_writer_pays_one_request_per_part() {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let m = Arc::new(Metrics::new());
        let s = Store::new(os, Path::from("t"), m.clone());
        let st = s.create("x".into(), meta()).await.unwrap();
        let (puts, lists) = (m.storage_calls("put"), m.storage_calls("list"));
        let n = 200u64;
        for i in 0..n {
            s.write_timed(&st, Some(i * 10), pattern(1, 10), None, Some(1_000 + i))
                .await
                .unwrap();
        }
        let (puts, lists) = (
            m.storage_calls("put") - puts,
            m.storage_calls("list") - lists,
        );
        // The parts, one registration, and one listing of the writers.
        assert_eq!((puts, lists), (n + 1, 1));
        assert_eq!(
            s.read_all(&st, Span::new(0, n * 10)).await.unwrap().len() as u64,
            n * 10
        );
    }

    /// Replicas over one storage (one slow to store, one slow to list, one quick) write
    /// conflicting bytes over overlapping ranges of fresh streams in pairs, the second starting at
    /// staggered times, so that one replica registers at every moment of the other's write,
    /// including one that a check of the writers before it vouches for. At most one write is acknowledged, and what it acknowledged is
    /// what any replica reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_replicas_never_both_acknowledge_conflicting_bytes() {
        use object_store::throttle::{ThrottleConfig, ThrottledStore};
        let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let lag = Duration::from_millis(15);
        let slow_put: Arc<dyn ObjectStore> = Arc::new(ThrottledStore::new(
            Arc::clone(&mem),
            ThrottleConfig {
                wait_put_per_call: lag,
                ..ThrottleConfig::default()
            },
        ));
        let slow_list: Arc<dyn ObjectStore> = Arc::new(ThrottledStore::new(
            Arc::clone(&mem),
            ThrottleConfig {
                wait_list_per_call: lag,
                ..ThrottleConfig::default()
            },
        ));
        // Longer than a slow write's two storage calls, so that a check before them vouches for it.
        let window = Duration::from_millis(60);
        let store = |os: &Arc<dyn ObjectStore>| {
            Store::new(os.clone(), Path::from("t"), Arc::new(Metrics::new())).writer_window(window)
        };
        let (p, l, q) = (store(&slow_put), store(&slow_list), store(&mem));
        let pairs = [(&p, &q), (&q, &p), (&p, &l), (&l, &p)];
        let rounds = 4 * 16;
        let mut acknowledged = 0;
        for round in 0..rounds {
            let id = format!("r{round}");
            let (first, second) = pairs[round as usize % pairs.len()];
            let s1 = first.create(id.clone(), meta()).await.unwrap();
            let s2 = second.create(id.clone(), meta()).await.unwrap();
            // The first replica has written the stream alone just before: its next write is
            // vouched for by that check, and costs no listing.
            first
                .write(&s1, Some(100), Bytes::from_static(b"z"), None)
                .await
                .unwrap();
            let delay = Duration::from_millis(5 * (round / 4));
            let ours = Bytes::from(vec![b'a'; 10]);
            let theirs = Bytes::from(vec![b'b'; 10]);
            // Every other round over the same span, under other write times: two names, which
            // a conditional create does not tell apart.
            let at = if round % 2 == 0 { 5 } else { 0 };
            let (r1, r2) = tokio::join!(
                first.write_timed(&s1, Some(0), ours.clone(), None, Some(1)),
                async {
                    tokio::time::sleep(delay).await;
                    second
                        .write_timed(&s2, Some(at), theirs.clone(), None, Some(2))
                        .await
                }
            );
            assert!(
                !(r1.is_ok() && r2.is_ok()),
                "round {round}: both conflicting writes were acknowledged"
            );
            for r in [&r1, &r2] {
                assert!(
                    matches!(r, Ok(Written::Stored) | Err(StoreError::Conflict { .. })),
                    "round {round}: {r:?}"
                );
            }
            let fresh = store(&mem);
            let st = fresh.open(&id).await.unwrap().unwrap();
            if r1.is_ok() {
                acknowledged += 1;
                assert_eq!(fresh.read_all(&st, Span::new(0, 10)).await.unwrap(), ours);
            }
            if r2.is_ok() {
                acknowledged += 1;
                let span = Span::new(at, at + 10);
                assert_eq!(fresh.read_all(&st, span).await.unwrap(), theirs);
            }
        }
        // Not a test that refuses everything.
        assert!(
            acknowledged >= rounds / 2,
            "{acknowledged} of {rounds} rounds acknowledged a write"
        );
    }
    #[tokio::test]
    async fn reads_planned_before_a_merge_read_the_segment_without_listing() {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let m = Arc::new(Metrics::new());
        let s = Store::new(os, Path::from("t"), m.clone())
            .segment_size(1000)
            .settled_after(Duration::ZERO);
        let st = s.create("x".into(), meta()).await.unwrap();
        for i in 0..100u64 {
            s.write(&st, Some(i * 10), pattern(i as u8, 10), None)
                .await
                .unwrap();
        }
        let (planned, _) = st.plan(Span::new(0, 1000));
        assert_eq!(planned.len(), 100);
        assert_eq!(s.compact(&st).await.unwrap().segments, 1);
        let (lists, gets) = (m.storage_calls("list"), m.storage_calls("get"));
        for p in planned {
            let Piece::Data { span, part } = p else {
                panic!("{p:?}")
            };
            let i = span.start / 10;
            assert_eq!(
                s.read_piece(&st, span, &part).await.unwrap(),
                pattern(i as u8, 10)
            );
            assert!(!st.holds(&part), "{part:?} is merged");
        }
        // Each piece is tried where it was, then read from the segment this process merged.
        assert_eq!(m.storage_calls("list") - lists, 0);
        assert_eq!(m.storage_calls("get") - gets, 200);
    }
    #[tokio::test]
    async fn cells_of_few_large_objects_are_left_as_they_are() {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let s = Store::new(os.clone(), Path::from("t"), Arc::new(Metrics::new()))
            .segment_size(100)
            .settled_after(Duration::ZERO);
        let st = s.create("x".into(), meta()).await.unwrap();
        // Cell 0 in four parts, cell 1 in five.
        for (start, len) in [(0, 25), (25, 25), (50, 25), (75, 25)]
            .into_iter()
            .chain((0..5).map(|i| (100 + i * 20, 20)))
        {
            s.write(&st, Some(start), pattern(start as u8, len), None)
                .await
                .unwrap();
        }
        s.declare_final(&st, 200).await.unwrap();
        let done = s.compact(&st).await.unwrap();
        assert_eq!((done.segments, done.removed), (1, 5));
        let keys = part_keys(&os).await;
        assert_eq!(keys.len(), 5, "{keys:?}");
        assert!(
            keys[4].ends_with(&span_name(Span::new(100, 200))),
            "{keys:?}"
        );
        assert_eq!(s.read_all(&st, Span::new(0, 200)).await.unwrap().len(), 200);
    }

    fn timed_pattern(i: u64) -> (u64, Bytes, u64) {
        (i * 10, pattern(i as u8, 10), 1_000 + i / 3 * 7)
    }

    #[tokio::test]
    async fn write_times_outlive_the_merge_and_reach_a_fresh_replica() {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let s = Store::new(os.clone(), Path::from("t"), Arc::new(Metrics::new()))
            .segment_size(1000)
            .settled_after(Duration::ZERO);
        let st = s.create("x".into(), meta()).await.unwrap();
        for i in 0..100 {
            let (at, data, ms) = timed_pattern(i);
            s.write_timed(&st, Some(at), data, None, Some(ms))
                .await
                .unwrap();
        }
        let keys = part_keys(&os).await;
        assert!(
            keys[3].ends_with(".1007"),
            "the name carries the time: {keys:?}"
        );
        let before: Vec<(u64, u64)> = st
            .plan(Span::new(0, 1000))
            .0
            .iter()
            .map(|p| match p {
                Piece::Data { span, part } => (span.start, part.written_ms),
                Piece::Dropped(_) => panic!("{p:?}"),
            })
            .collect();
        assert_eq!(s.compact(&st).await.unwrap().segments, 1);
        let keys = part_keys(&os).await;
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(keys[0].ends_with(&format!("{}.1000", span_name(Span::new(0, 1000)))));

        let m = Arc::new(Metrics::new());
        let fresh = Store::new(os.clone(), Path::from("t"), m.clone());
        let st = fresh.open("x").await.unwrap().unwrap();
        let (pieces, _) = st.plan(Span::new(0, 1000));
        let [Piece::Data { part, .. }] = pieces.as_slice() else {
            panic!("{pieces:?}")
        };
        assert_eq!(part.written_ms, 1000);
        let index = fresh.times(&st, part).await.unwrap();
        // One entry per run of equal times: the parts' own, as before the merge.
        let mut runs = before.clone();
        runs.dedup_by_key(|e| e.1);
        assert_eq!(index.entries, runs);
        for &(offset, ms) in &before {
            assert_eq!(index.at(offset), ms);
        }
        // A read from a time: the index of the one segment holding it.
        let gets = m.storage_calls("get");
        assert_eq!(fresh.offset_since(&st, 1007).await.unwrap(), 30);
        assert_eq!(fresh.offset_since(&st, 1008).await.unwrap(), 60);
        assert_eq!(fresh.offset_since(&st, 0).await.unwrap(), 0);
        assert_eq!(fresh.offset_since(&st, 99_999).await.unwrap(), 1000);
        assert_eq!(m.storage_calls("get") - gets, 3);

        // A segment whose index is gone (a crash before it, from an older version) still has
        // the time of its first byte.
        os.delete(&Path::from(
            "t/streams/x/times/0000000000000000-00000000000003e8",
        ))
        .await
        .unwrap();
        let index = fresh.times(&st, part).await.unwrap();
        assert_eq!(index.entries, vec![(0, 1000)]);
    }

    #[tokio::test]
    async fn the_last_lines_are_found_reading_only_the_tail() {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let m = Arc::new(Metrics::new());
        let s = Store::new(os.clone(), Path::from("t"), m.clone())
            .segment_size(1000)
            .settled_after(Duration::ZERO);
        let st = s.create("x".into(), meta()).await.unwrap();
        // 2,000 lines of 10 bytes, in parts of 20 lines, merged into 20 segments.
        let lines: Vec<u8> = (0..2000u32)
            .flat_map(|i| format!("line {i:04}\n").into_bytes())
            .collect();
        for chunk in lines.chunks(200) {
            s.write(&st, None, Bytes::copy_from_slice(chunk), None)
                .await
                .unwrap();
        }
        s.compact(&st).await.unwrap();
        assert_eq!(part_keys(&os).await.len(), 20);
        let gets = m.storage_calls("get");
        assert_eq!(s.offset_of_last_lines(&st, 3).await.unwrap(), 19_970);
        assert_eq!(m.storage_calls("get") - gets, 1, "one segment read");
        assert_eq!(s.offset_of_last_lines(&st, 150).await.unwrap(), 18_500);
        assert_eq!(s.offset_of_last_lines(&st, 0).await.unwrap(), 20_000);
        assert_eq!(s.offset_of_last_lines(&st, 5_000).await.unwrap(), 0);
        // A last line still without its newline is a line.
        s.write(&st, None, Bytes::from_static(b"partial"), None)
            .await
            .unwrap();
        assert_eq!(s.offset_of_last_lines(&st, 1).await.unwrap(), 20_000);
        assert_eq!(s.offset_of_last_lines(&st, 2).await.unwrap(), 19_990);
    }

    #[tokio::test]
    async fn the_same_bytes_under_two_times_are_kept_once() {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let store = || {
            Store::new(os.clone(), Path::from("t"), Arc::new(Metrics::new()))
                .writer_window(Duration::from_millis(20))
        };
        let (a, b) = (store(), store());
        let sa = a.create("x".into(), meta()).await.unwrap();
        let data = Bytes::from_static(b"0123456789");
        a.write_timed(&sa, Some(0), data.clone(), None, Some(1))
            .await
            .unwrap();
        let sb = b.open("x").await.unwrap().unwrap();
        // The second writer does not know the first's part (another replica's, stored after
        // it listed): it finds it when it checks, and withdraws its own copy.
        sb.forget(&[(0, 10)]);
        b.write_timed(&sb, Some(0), data.clone(), None, Some(2))
            .await
            .unwrap();
        let keys = part_keys(&os).await;
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(keys[0].ends_with(".1"), "{keys:?}");
        assert_eq!(b.read_all(&sb, Span::new(0, 10)).await.unwrap(), data);
        // Other bytes under another time are a conflict.
        let c = store();
        let sc = c.open("x").await.unwrap().unwrap();
        sc.forget(&[(0, 10)]);
        let other = Bytes::from_static(b"9876543210");
        assert!(matches!(
            c.write_timed(&sc, Some(0), other, None, Some(3)).await,
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(part_keys(&os).await, keys);
    }
}
