//! Shipping one byte stream to the metadata API.
//!
//! Producers (a pipe reader thread, the collector's ring buffer reader) hand bytes to a
//! [`Shipper`] and never wait: bytes go into a bounded buffer, and when it is full they are dropped
//! and their exact range is remembered. [`Shipper::run`] opens the stream, ships batches with
//! `PATCH` at their offsets (several in flight, gzip or zstd, retries with backoff and
//! `Retry-After`), reports dropped ranges with markers, and after [`Shipper::close`] declares the
//! final length.
//! Every byte handed over ends up stored, reported as dropped, or listed in
//! [`ShipReport::unreported`] (the API could not be told before the deadline).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    future::Future,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use rand::Rng;
use tokio::{
    sync::Notify,
    task::{AbortHandle, Id, JoinSet},
    time::Instant,
};

use contract::{
    coding::Coding,
    range::{RangeSet, Span},
    reason::DropReason,
};

use crate::{Client, ClientError, Created, Payload, StreamSpec, compress_into};

/// Most generations tried when earlier ones of a stream are already complete.
const MAX_GENERATIONS: u32 = 1000;
/// Marker requests in flight at once.
const MAX_MARKERS_IN_FLIGHT: usize = 2;

/// Tuning of a [`Shipper`].
#[derive(Debug, Clone)]
pub struct ShipConfig {
    /// A batch is sent once it holds this many bytes...
    pub batch_bytes: usize,
    /// ...or once its oldest byte waited this long.
    pub batch_interval: Duration,
    /// Bytes held (queued and in flight) before new bytes are dropped.
    pub buffer_limit: usize,
    /// Append requests in flight at once.
    pub max_in_flight: usize,
    /// `Content-Encoding` of request bodies ([`Coding::Identity`]: uncompressed)...
    pub compression: Coding,
    /// ...at this level (see [`compress_into`]; 0: the coding's default).
    pub compression_level: u32,
    /// First retry delay; it doubles up to `backoff_max` (with jitter).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for ShipConfig {
    fn default() -> Self {
        Self {
            batch_bytes: 1 << 20,
            batch_interval: Duration::from_millis(200),
            buffer_limit: 8 << 20,
            max_in_flight: 4,
            compression: Coding::Gzip,
            compression_level: 1,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// What happened to the bytes of one stream.
#[derive(Debug, Clone, Default)]
pub struct ShipReport {
    /// The stream name used: the requested one, or `name.N` when earlier generations were
    /// already complete (a restarted container).
    pub name: String,
    pub id: Option<String>,
    /// Stream offset of this writer's first byte (after what a previous writer left).
    pub base: u64,
    /// Bytes handed to the shipper, including skipped ones.
    pub written: u64,
    /// Bytes acknowledged as stored.
    pub stored: u64,
    /// Bytes acknowledged as dropped (buffer overflow, skipped upstream, given up).
    pub dropped: u64,
    /// `dropped` by the reason each range was reported with.
    pub dropped_by_reason: BTreeMap<DropReason, u64>,
    /// Ranges (relative to `base`) neither stored nor acknowledged as dropped.
    pub unreported: RangeSet,
    /// Gaps a previous writer left, reported as dropped by this one.
    pub prior_dropped: u64,
    /// Of `dropped`, bytes the API stored all the same: a request given up on (its answer lost,
    /// or its deadline passed) had gone through. Known once the final length is declared.
    pub dropped_stored: u64,
    /// Bytes handed over after `close`, ignored.
    pub late: u64,
    pub final_declared: bool,
    /// The last error the API gave, for a diagnostic.
    pub last_error: Option<String>,
}

impl ShipReport {
    /// Bytes lost without the API knowing.
    pub fn lost(&self) -> u64 {
        self.unreported.covered()
    }
}

/// Now, in milliseconds since the Unix epoch (0 for a clock before it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A contiguous run of queued bytes starting at `start` (offsets relative to the writer's base),
/// at most one batch long: each segment is shipped as one batch.
#[derive(Debug)]
struct Seg {
    start: u64,
    data: Vec<u8>,
    /// When its first byte was handed over (ms since the Unix epoch): the part's write time.
    written_ms: u64,
}

/// Batch-sized buffers kept for reuse. A fresh large allocation costs page faults and zeroing
/// for every page (musl's allocator returns large blocks to the kernel at once); reusing them
/// makes the producer's copy the only cost per byte.
#[derive(Debug)]
struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl Pool {
    fn get(&self, capacity: usize) -> Vec<u8> {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match reused {
            Some(mut v) => {
                v.clear();
                v.reserve_exact(capacity);
                v
            }
            None => Vec::with_capacity(capacity),
        }
    }

    fn put(&self, v: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.keep {
            free.push(v);
        }
    }

    /// `data` as `Bytes` whose buffer comes back to the pool when the last clone is dropped.
    fn share(self: &Arc<Self>, data: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            data,
            pool: self.clone(),
        })
    }
}

#[derive(Debug)]
struct Pooled {
    data: Vec<u8>,
    pool: Arc<Pool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.data));
    }
}

#[derive(Debug, Default)]
struct Buf {
    /// Offset of the next byte a producer hands over.
    next: u64,
    segs: VecDeque<Seg>,
    /// Bytes in `segs`.
    queued: usize,
    /// Bytes queued or in flight: what `buffer_limit` bounds.
    held: usize,
    /// Set when the buffer overflowed; cleared once it drained to half, so a slow API gives a few
    /// large dropped ranges rather than many small ones.
    overflowing: bool,
    /// Dropped ranges not yet sent as markers.
    lost: Lost,
    /// When the oldest queued byte arrived.
    oldest: Option<Instant>,
    closed: bool,
    /// Closed without declaring the final length: another writer continues the stream.
    leave_open: bool,
    /// Stream offset of the first byte, when the writer knows it (see [`Shipper::resume_at`]).
    resume: Option<u64>,
    /// Stream offset of the first byte, once the stream is open.
    base: Option<u64>,
    /// After this, queued and in-flight bytes are given up as dropped.
    data_deadline: Option<Instant>,
    /// After this, nothing more is attempted.
    deadline: Option<Instant>,
    late: u64,
}

/// Dropped ranges not yet reported, by reason: ranges of one reason merge as they grow (an
/// overflow's gap is one marker), ranges of different reasons stay apart, each reported for its
/// own reason.
#[derive(Debug, Default)]
struct Lost(BTreeMap<DropReason, RangeSet>);

impl Lost {
    fn insert(&mut self, span: Span, reason: DropReason) {
        self.0.entry(reason).or_default().insert(span);
    }

    fn is_empty(&self) -> bool {
        self.0.values().all(RangeSet::is_empty)
    }

    /// The range starting lowest, with its reason.
    fn first(&self) -> Option<(Span, DropReason)> {
        self.0
            .iter()
            .filter_map(|(r, set)| set.spans().first().map(|s| (*s, *r)))
            .min_by_key(|(s, _)| s.start)
    }

    /// Removes and returns the range starting lowest, with its reason.
    fn pop_first(&mut self) -> Option<(Span, DropReason)> {
        let (_, reason) = self.first()?;
        let set = self.0.get_mut(&reason)?;
        let span = set.pop_first()?;
        if set.is_empty() {
            self.0.remove(&reason);
        }
        Some((span, reason))
    }
}

#[derive(Debug)]
struct Shared {
    buf: Mutex<Buf>,
    wake: Notify,
    cfg: ShipConfig,
    pool: Arc<Pool>,
    /// The API refused the configured coding (`415`, an API older than it): the bytes go
    /// uncompressed from then on.
    coding_refused: std::sync::atomic::AtomicBool,
}

/// The producer's handle on one shipped stream. Cheap to clone; [`Shipper::write`] never blocks
/// on the network.
#[derive(Debug, Clone)]
pub struct Shipper {
    shared: Arc<Shared>,
}

impl Shipper {
    pub fn new(cfg: ShipConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                buf: Mutex::new(Buf::default()),
                wake: Notify::new(),
                pool: Arc::new(Pool {
                    free: Mutex::new(Vec::new()),
                    // Queued and in-flight batches, and a compressed copy of each in flight.
                    keep: cfg.buffer_limit / cfg.batch_bytes.max(1) + 2 * cfg.max_in_flight + 2,
                }),
                cfg,
                coding_refused: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    fn buf(&self) -> MutexGuard<'_, Buf> {
        self.shared
            .buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands over the next bytes of the stream. Returns how many were queued; the rest were
    /// dropped (and will be reported as such).
    pub fn write(&self, data: &[u8]) -> usize {
        if data.is_empty() {
            return 0;
        }
        let cfg = &self.shared.cfg;
        let mut b = self.buf();
        if b.closed {
            b.late += data.len() as u64;
            return 0;
        }
        let mut wake = false;
        if b.overflowing && b.held <= cfg.buffer_limit / 2 {
            b.overflowing = false;
            // The gap is closed now: its marker can go.
            wake |= !b.lost.is_empty();
        }
        let room = if b.overflowing {
            0
        } else {
            cfg.buffer_limit.saturating_sub(b.held)
        };
        let take = room.min(data.len());
        if take > 0 {
            let block = cfg.batch_bytes.max(1);
            let buf = &mut *b;
            let mut rest = &data[..take];
            while !rest.is_empty() {
                let at = buf.next;
                let open = buf
                    .segs
                    .back_mut()
                    .filter(|s| s.start + s.data.len() as u64 == at && s.data.len() < block);
                let seg = match open {
                    Some(s) => s,
                    None => {
                        buf.segs.push_back(Seg {
                            start: at,
                            data: self.shared.pool.get(block),
                            written_ms: unix_ms(),
                        });
                        match buf.segs.back_mut() {
                            Some(s) => s,
                            None => break,
                        }
                    }
                };
                let n = (block - seg.data.len()).min(rest.len());
                seg.data.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                buf.next += n as u64;
            }
            if b.queued == 0 {
                b.oldest = Some(Instant::now());
                wake = true;
            }
            let before = b.queued;
            b.queued += take;
            b.held += take;
            wake |= before < cfg.batch_bytes && b.queued >= cfg.batch_bytes;
        }
        if take < data.len() {
            b.overflowing = true;
            wake |= b.lost.is_empty();
            let n = (data.len() - take) as u64;
            let at = b.next;
            b.lost.insert(Span::new(at, at + n), DropReason::BufferFull);
            b.next += n;
        }
        drop(b);
        if wake {
            self.shared.wake.notify_one();
        }
        take
    }

    /// Accounts for `n` bytes of the stream that were lost before reaching the shipper (the
    /// collector's kernel-side losses): they are reported as dropped for `reason`.
    pub fn skip(&self, n: u64, reason: DropReason) {
        if n == 0 {
            return;
        }
        let mut b = self.buf();
        if b.closed {
            b.late += n;
            return;
        }
        let at = b.next;
        b.lost.insert(Span::new(at, at + n), reason);
        b.next += n;
        drop(b);
        self.shared.wake.notify_one();
    }

    /// Dropped ranges not reported yet (relative to the writer's base), with their reasons, in
    /// offset order: what the producer's accounting has handed over so far.
    pub fn unsent_drops(&self) -> Vec<(Span, DropReason)> {
        let b = self.buf();
        let mut out: Vec<(Span, DropReason)> = b
            .lost
            .0
            .iter()
            .flat_map(|(r, set)| set.spans().iter().map(move |s| (*s, *r)))
            .collect();
        out.sort_unstable_by_key(|(s, _)| s.start);
        out
    }

    /// Offset of the next byte (relative to the writer's base).
    pub fn offset(&self) -> u64 {
        self.buf().next
    }

    /// Stream offset of the writer's first byte, once the stream is open; with
    /// [`Shipper::offset`], the stream offset of the next byte.
    pub fn base(&self) -> Option<u64> {
        self.buf().base
    }

    /// Places this writer's first byte at stream offset `offset` instead of after what is stored
    /// (the default): for a writer that takes over from one that stopped, knowing where it
    /// stopped. Whatever an earlier writer left neither stored nor dropped below `offset` is
    /// reported as dropped; bytes it stored at or past `offset` must be the same bytes (a
    /// re-send of identical bytes is accepted). Call before [`Shipper::run`].
    pub fn resume_at(&self, offset: u64) {
        self.buf().resume = Some(offset);
    }

    /// Ends the stream: what is queued is shipped, then the final length is declared, all by
    /// `deadline`. Near the deadline (the last quarter, at most 2 s) bytes still not stored are
    /// given up and reported as dropped. Closing again changes nothing.
    pub fn close(&self, deadline: std::time::Instant) {
        self.end(deadline, false);
    }

    /// Stops writing without ending the stream: as [`Shipper::close`], but no final length is
    /// declared, so a later writer can continue it (see [`Shipper::resume_at`]).
    pub fn leave_open(&self, deadline: std::time::Instant) {
        self.end(deadline, true);
    }

    fn end(&self, deadline: std::time::Instant, leave_open: bool) {
        let mut b = self.buf();
        if b.closed {
            return;
        }
        b.leave_open = leave_open;
        let deadline = Instant::from_std(deadline);
        let now = Instant::now();
        let reserve = (deadline.saturating_duration_since(now) / 4).min(Duration::from_secs(2));
        b.closed = true;
        b.deadline = Some(deadline);
        b.data_deadline = Some(deadline - reserve);
        drop(b);
        self.shared.wake.notify_one();
    }

    /// Takes the next dropped range to report. The range still growing at the end of an overflow
    /// waits until the overflow ends (or the stream is closed): one marker for the whole gap
    /// rather than one per write.
    fn take_lost(&self) -> Option<(Span, DropReason)> {
        let mut b = self.buf();
        let (first, _) = b.lost.first()?;
        if b.overflowing && !b.closed && first.end == b.next {
            return None;
        }
        b.lost.pop_first()
    }

    /// Takes the next batch when one is due.
    fn take_batch(&self, now: Instant) -> Option<(u64, Bytes, u64)> {
        let cfg = &self.shared.cfg;
        let mut b = self.buf();
        let due = b.closed
            || b.segs.len() > 1
            || b.queued >= cfg.batch_bytes
            || b.oldest.is_some_and(|t| now >= t + cfg.batch_interval);
        if !due {
            return None;
        }
        let Seg {
            start,
            data,
            written_ms,
        } = b.segs.pop_front()?;
        b.queued -= data.len();
        b.oldest = (b.queued > 0).then_some(now);
        Some((start, self.shared.pool.share(data), written_ms))
    }

    /// Ships the stream until it is closed and finished (or its deadline passed). Run it once,
    /// on any tokio runtime.
    pub async fn run(&self, client: Arc<Client>, spec: StreamSpec) -> ShipReport {
        self.runner(client, spec).run().await
    }

    fn runner(&self, client: Arc<Client>, spec: StreamSpec) -> Run {
        Run {
            shipper: self.clone(),
            client,
            spec: spec.clone(),
            report: ShipReport {
                name: spec.name,
                ..ShipReport::default()
            },
            opened: None,
            generation: 0,
            create_at: Some(Instant::now()),
            create_backoff: Backoff::new(&self.shared.cfg),
            pause: Arc::new(Pause::default()),
            jobs: JoinSet::new(),
            running: HashMap::new(),
            prior: Vec::new(),
            given_up: false,
            finished: false,
        }
    }
}

#[derive(Debug, Clone)]
struct Opened {
    id: String,
    base: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    Create,
    Status,
    /// Bytes at a local span.
    Data(Span),
    /// A marker for a local span of ours.
    Mark(Span, DropReason),
    /// A marker for an absolute span a previous writer left pending.
    MarkPrior(Span),
    Final,
    /// After the final length: which of our dropped bytes the API holds as dropped.
    Reconcile,
}

#[derive(Debug)]
enum Done {
    Created(Result<Created, ClientError>),
    Status(Result<Vec<Span>, ClientError>),
    Dropped(Result<Vec<Span>, ClientError>),
    Unit(Result<(), ClientError>),
}

struct Run {
    shipper: Shipper,
    client: Arc<Client>,
    spec: StreamSpec,
    report: ShipReport,
    opened: Option<Opened>,
    generation: u32,
    /// When to (re)try creating the stream; `None` while a try runs or after giving up.
    create_at: Option<Instant>,
    create_backoff: Backoff,
    /// Shared by the stream's data requests (see [`Pause`]).
    pause: Arc<Pause>,
    jobs: JoinSet<Done>,
    running: HashMap<Id, (AbortHandle, Job)>,
    prior: Vec<Span>,
    given_up: bool,
    finished: bool,
}

impl Run {
    fn count(&self, f: impl Fn(&Job) -> bool) -> usize {
        self.running.values().filter(|(_, j)| f(j)).count()
    }

    fn spawn<F>(&mut self, job: Job, fut: F)
    where
        F: Future<Output = Done> + Send + 'static,
    {
        let h = self.jobs.spawn(fut);
        self.running.insert(h.id(), (h, job));
    }

    async fn run(mut self) -> ShipReport {
        let cfg = self.shipper.shared.cfg.clone();
        loop {
            let now = Instant::now();
            let (closed, data_deadline, deadline, oldest) = {
                let b = self.shipper.buf();
                (b.closed, b.data_deadline, b.deadline, b.oldest)
            };
            if deadline.is_some_and(|d| now >= d) {
                return self.abandon().await;
            }
            if !self.given_up && data_deadline.is_some_and(|d| now >= d) {
                self.give_up_data();
            }
            self.start_jobs(now, closed);
            if self.finished {
                return self.into_report();
            }
            let mut timer = [data_deadline, deadline, self.create_at]
                .into_iter()
                .flatten()
                .min();
            let data_slots = self.count(|j| matches!(j, Job::Data(_))) < cfg.max_in_flight;
            if let (Some(t), true, Some(_)) = (oldest, data_slots, &self.opened) {
                let due = t + cfg.batch_interval;
                timer = Some(timer.map_or(due, |x| x.min(due)));
            }
            let sleep = async {
                match timer {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                Some(res) = self.jobs.join_next_with_id() => self.finish_job(res),
                () = self.shipper.shared.wake.notified() => {}
                () = sleep => {}
            }
        }
    }

    fn start_jobs(&mut self, now: Instant, closed: bool) {
        if self.opened.is_none() {
            if self.create_at.is_some_and(|t| now >= t) {
                self.create_at = None;
                let client = self.client.clone();
                let mut spec = self.spec.clone();
                if self.generation > 0 {
                    spec.name = format!("{}.{}", self.spec.name, self.generation);
                }
                self.report.name = spec.name.clone();
                self.spawn(Job::Create, async move {
                    Done::Created(client.create(&spec).await)
                });
            }
            return;
        }
        let Some(Opened { id, base }) = self.opened.clone() else {
            return;
        };
        let cfg = self.shipper.shared.cfg.clone();
        while self.count(|j| matches!(j, Job::Mark(..) | Job::MarkPrior(_))) < MAX_MARKERS_IN_FLIGHT
        {
            let (job, abs, reason) = if let Some(s) = self.prior.pop() {
                // The writer before us stopped without sending these bytes.
                (Job::MarkPrior(s), s, DropReason::WriterDied)
            } else if let Some((s, reason)) = self.shipper.take_lost() {
                let abs = Span::new(base + s.start, base + s.end);
                (Job::Mark(s, reason), abs, reason)
            } else {
                break;
            };
            let (client, id) = (self.client.clone(), id.clone());
            let cfg = cfg.clone();
            self.spawn(job, async move {
                Done::Unit(
                    retry(&cfg, || client.mark_dropped(&id, abs, reason))
                        .await
                        .map(drop),
                )
            });
        }
        if !self.given_up {
            while self.count(|j| matches!(j, Job::Data(_))) < cfg.max_in_flight {
                let Some((start, data, written_ms)) = self.shipper.take_batch(now) else {
                    break;
                };
                let span = Span::new(start, start + data.len() as u64);
                let (client, id) = (self.client.clone(), id.clone());
                let cfg = cfg.clone();
                let pool = self.shipper.shared.pool.clone();
                let pause = Arc::clone(&self.pause);
                let shared = Arc::clone(&self.shipper.shared);
                self.spawn(Job::Data(span), async move {
                    let refused = &shared.coding_refused;
                    let payload = if cfg.compression == Coding::Identity
                        || refused.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        Payload::plain(data.clone())
                    } else {
                        let (coding, level) = (cfg.compression, cfg.compression_level);
                        let raw = data.clone();
                        let out = pool.get(data.len());
                        // Milliseconds of CPU per batch: off the runtime's threads.
                        let packed = tokio::task::spawn_blocking(move || {
                            compress_into(coding, &raw, level, out)
                        })
                        .await;
                        match packed {
                            Ok(Ok(body)) => Payload {
                                body: pool.share(body),
                                len: data.len() as u64,
                                coding,
                            },
                            // Incompressible (zstd), or the task failed: the bytes still go.
                            _ => Payload::plain(data.clone()),
                        }
                    };
                    let mut sent = retry_paused(&cfg, Some(&pause), || {
                        client.append(&id, base + start, &payload, Some(written_ms))
                    })
                    .await;
                    if payload.coding != Coding::Identity
                        && sent.as_ref().err().and_then(ClientError::status) == Some(415)
                    {
                        // An API older than the coding: every API takes the bytes as they are.
                        if !refused.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            tracing::warn!(coding = %payload.coding, "The metadata API refuses this coding: sending uncompressed.");
                        }
                        let plain = Payload::plain(data);
                        sent = retry_paused(&cfg, Some(&pause), || {
                            client.append(&id, base + start, &plain, Some(written_ms))
                        })
                        .await;
                    }
                    Done::Unit(sent.map(drop))
                });
            }
        }
        let idle = self.running.is_empty() && self.prior.is_empty() && {
            let b = self.shipper.buf();
            b.queued == 0 && b.lost.is_empty()
        };
        if closed && idle && self.shipper.buf().leave_open {
            self.finished = true;
            return;
        }
        if closed && idle {
            let total = base + self.shipper.offset();
            let client = self.client.clone();
            self.spawn(Job::Final, async move {
                Done::Unit(retry(&cfg, || client.finish(&id, total)).await.map(drop))
            });
        }
    }

    fn finish_job(&mut self, res: Result<(Id, Done), tokio::task::JoinError>) {
        let (id, done) = match res {
            Ok((id, done)) => (id, Some(done)),
            Err(e) => (e.id(), None),
        };
        let Some((_, job)) = self.running.remove(&id) else {
            return;
        };
        let err = |r: &mut ShipReport, e: &ClientError| r.last_error = Some(error_chain(e));
        match (job, done) {
            (Job::Create, Some(Done::Created(Ok(c)))) => {
                if c.complete {
                    // A previous run of this container finished the stream: write the next
                    // generation rather than lose this run's output.
                    self.generation += 1;
                    if self.generation <= MAX_GENERATIONS {
                        self.create_at = Some(Instant::now());
                    } else {
                        self.report.last_error =
                            Some(format!("{MAX_GENERATIONS} generations are complete"));
                    }
                    return;
                }
                let resume = self.shipper.buf().resume;
                let base = resume.unwrap_or(c.end);
                self.shipper.buf().base = Some(base);
                self.report.id = Some(c.id.clone());
                self.report.base = base;
                // What an earlier writer left between its last stored byte and our first.
                if let Some(b) = resume
                    && c.end < b
                {
                    self.prior.push(Span::new(c.end, b));
                }
                if c.end > c.length {
                    let (client, id) = (self.client.clone(), c.id.clone());
                    let cfg = self.shipper.shared.cfg.clone();
                    self.spawn(Job::Status, async move {
                        Done::Status(retry(&cfg, || client.status(&id)).await.map(|s| s.pending))
                    });
                }
                self.opened = Some(Opened { id: c.id, base });
            }
            (Job::Create, Some(Done::Created(Err(e)))) => {
                err(&mut self.report, &e);
                let wait = self.create_backoff.next(e.retry_after());
                self.create_at = Some(Instant::now() + wait);
            }
            (Job::Create, _) => self.create_at = Some(Instant::now()),
            (Job::Status, Some(Done::Status(Ok(pending)))) => {
                // Gaps below our base are nobody's but ours to report; from the base on, our
                // own bytes fill them.
                let base = self.report.base;
                self.prior.extend(
                    pending
                        .into_iter()
                        .map(|s| Span::new(s.start, s.end.min(base)))
                        .filter(|s| s.start < s.end),
                );
            }
            (Job::Status, Some(Done::Status(Err(e)))) => err(&mut self.report, &e),
            (Job::Data(span), Some(Done::Unit(Ok(())))) => {
                self.report.stored += span.len();
                self.release(span.len());
            }
            (Job::Data(span), outcome) => {
                // A request ends unanswered only when it was aborted at the data deadline; one
                // that failed had an error no retry changes.
                let reason = if let Some(Done::Unit(Err(e))) = &outcome {
                    err(&mut self.report, e);
                    DropReason::Rejected
                } else {
                    DropReason::GaveUp
                };
                self.shipper.buf().lost.insert(span, reason);
                self.release(span.len());
            }
            (Job::Mark(span, reason), Some(Done::Unit(Ok(())))) => {
                self.report.dropped += span.len();
                *self.report.dropped_by_reason.entry(reason).or_default() += span.len();
            }
            (Job::Mark(span, _), outcome) => {
                if let Some(Done::Unit(Err(e))) = &outcome {
                    err(&mut self.report, e);
                }
                self.report.unreported.insert(span);
            }
            (Job::MarkPrior(span), Some(Done::Unit(Ok(())))) => {
                self.report.prior_dropped += span.len();
            }
            (Job::MarkPrior(_), outcome) => {
                if let Some(Done::Unit(Err(e))) = &outcome {
                    err(&mut self.report, e);
                }
            }
            (Job::Final, Some(Done::Unit(Ok(())))) => {
                self.report.final_declared = true;
                if self.report.dropped == 0 {
                    self.finished = true;
                    return;
                }
                let Some(id) = self.report.id.clone() else {
                    self.finished = true;
                    return;
                };
                let client = self.client.clone();
                let cfg = self.shipper.shared.cfg.clone();
                self.spawn(Job::Reconcile, async move {
                    Done::Dropped(retry(&cfg, || client.status(&id)).await.map(|s| s.dropped))
                });
            }
            (Job::Reconcile, Some(Done::Dropped(Ok(dropped)))) => {
                // The API lists as dropped only what is not stored.
                let ours = Span::new(self.report.base, self.report.base + self.shipper.offset());
                let still: u64 = dropped
                    .iter()
                    .map(|s| s.end.min(ours.end).saturating_sub(s.start.max(ours.start)))
                    .sum();
                self.report.dropped_stored = self.report.dropped.saturating_sub(still);
                self.finished = true;
            }
            (Job::Reconcile, outcome) => {
                if let Some(Done::Dropped(Err(e))) = &outcome {
                    err(&mut self.report, e);
                }
                self.finished = true;
            }
            (Job::Final, outcome) => {
                if let Some(Done::Unit(Err(e))) = &outcome {
                    err(&mut self.report, e);
                }
                self.finished = true;
            }
            (Job::Status, _) => {}
        }
    }

    fn release(&self, n: u64) {
        let limit = self.shipper.shared.cfg.buffer_limit;
        let mut b = self.shipper.buf();
        b.held = b.held.saturating_sub(n as usize);
        // Drained enough: the overflow is over and its gap can be reported.
        if b.overflowing && b.held <= limit / 2 {
            b.overflowing = false;
        }
    }

    /// The data deadline passed: bytes not stored yet become dropped ranges, reported while
    /// there is time.
    fn give_up_data(&mut self) {
        self.given_up = true;
        for (h, job) in self.running.values() {
            if matches!(job, Job::Data(_)) {
                h.abort();
            }
        }
        let mut b = self.shipper.buf();
        while let Some(seg) = b.segs.pop_front() {
            let span = Span::new(seg.start, seg.start + seg.data.len() as u64);
            b.lost.insert(span, DropReason::GaveUp);
            b.held = b.held.saturating_sub(seg.data.len());
        }
        b.queued = 0;
        b.oldest = None;
    }

    /// The deadline passed: stop everything and account for what was not reported.
    async fn abandon(mut self) -> ShipReport {
        self.give_up_data();
        for (h, _) in self.running.values() {
            h.abort();
        }
        while let Some(res) = self.jobs.join_next_with_id().await {
            self.finish_job(res);
        }
        let mut b = self.shipper.buf();
        while let Some((s, _)) = b.lost.pop_first() {
            self.report.unreported.insert(s);
        }
        drop(b);
        self.into_report()
    }

    fn into_report(mut self) -> ShipReport {
        let b = self.shipper.buf();
        self.report.written = b.next;
        self.report.late = b.late;
        drop(b);
        self.report
    }
}

/// `e` and its sources on one line.
fn error_chain(e: &ClientError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Exponential backoff with jitter, never shorter than what the server asked for.
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(cfg: &ShipConfig) -> Self {
        Self {
            next: cfg.backoff_min,
            max: cfg.backoff_max.max(cfg.backoff_min),
        }
    }

    fn next(&mut self, retry_after: Option<Duration>) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // Half fixed, half random: writers that failed together do not retry together.
        let jittered = base / 2 + base.mul_f64(rand::rng().random::<f64>() / 2.0);
        jittered.max(retry_after.unwrap_or_default())
    }
}

/// When a stream's data may be sent again: the end of the latest `Retry-After` any of its
/// requests was given. Its other requests wait for it too, before a retry and before a first
/// try, so none goes back early (the server refuses those again, unread).
#[derive(Debug, Default)]
struct Pause(Mutex<Option<Instant>>);

impl Pause {
    fn until(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hold(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut at = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *at = Some(at.map_or(until, |t| t.max(until)));
    }
}

/// Calls `f` until it succeeds or fails for good.
async fn retry<T, F, Fut>(cfg: &ShipConfig, f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    retry_paused(cfg, None, f).await
}

/// [`retry`], keeping to the stream's `pause` when given one.
async fn retry_paused<T, F, Fut>(
    cfg: &ShipConfig,
    pause: Option<&Pause>,
    mut f: F,
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut backoff = Backoff::new(cfg);
    loop {
        if let Some(until) = pause.and_then(Pause::until) {
            tokio::time::sleep_until(until).await;
        }
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() => {
                if let (Some(pause), Some(wait)) = (pause, e.retry_after()) {
                    pause.hold(wait);
                }
                tokio::time::sleep(backoff.next(e.retry_after())).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(limit: usize) -> ShipConfig {
        ShipConfig {
            batch_bytes: 4,
            buffer_limit: limit,
            ..ShipConfig::default()
        }
    }

    #[test]
    fn overflow_drops_exact_ranges_until_half_drained() {
        let s = Shipper::new(cfg(10));
        assert_eq!(s.write(b"0123456"), 7);
        assert_eq!(s.write(b"789ab"), 3, "only the room left is queued");
        assert_eq!(s.write(b"cd"), 0, "still overflowing");
        assert_eq!(
            s.buf().lost.first(),
            Some((Span::new(10, 14), DropReason::BufferFull)),
            "an overflow is one range, for a full buffer"
        );
        // Ship 8 bytes: held drops to 2, below half the limit, so bytes are taken again.
        let now = Instant::now();
        let (a, b1, _) = s.take_batch(now).expect("due: a full batch");
        let (b, b2, _) = s.take_batch(now).expect("due: a full batch");
        assert_eq!((a, &b1[..], b, &b2[..]), (0, &b"0123"[..], 4, &b"4567"[..]));
        s.buf().held -= 8;
        assert_eq!(s.write(b"ef"), 2);
        assert_eq!(s.offset(), 16);
        let segs: Vec<(u64, Vec<u8>)> = s
            .buf()
            .segs
            .iter()
            .map(|g| (g.start, g.data.to_vec()))
            .collect();
        assert_eq!(segs, vec![(8, b"89".to_vec()), (14, b"ef".to_vec())]);
    }

    #[test]
    fn partial_batches_wait_for_the_interval_unless_a_gap_or_close_ends_them() {
        let s = Shipper::new(cfg(100));
        s.write(b"ab");
        let now = Instant::now();
        assert!(s.take_batch(now).is_none(), "not full, not old");
        let later = now + Duration::from_secs(1);
        assert_eq!(
            s.take_batch(later).map(|(o, b, _)| (o, b.to_vec())),
            Some((0, b"ab".to_vec()))
        );
        s.write(b"c");
        s.skip(5, DropReason::KernelLost);
        s.write(b"d");
        let got = s.take_batch(now).map(|(o, b, _)| (o, b.to_vec()));
        assert_eq!(got, Some((2, b"c".to_vec())), "a gap ends the segment");
        assert!(s.take_batch(now).is_none());
        s.close(std::time::Instant::now() + Duration::from_secs(1));
        let got = s.take_batch(now).map(|(o, b, _)| (o, b.to_vec()));
        assert_eq!(got, Some((8, b"d".to_vec())), "closing flushes");
        assert_eq!(s.write(b"late"), 0);
        assert_eq!(s.buf().late, 4);
    }

    #[test]
    fn lost_ranges_keep_their_reasons_apart_and_merge_within_one() {
        let s = Shipper::new(cfg(4));
        assert_eq!(s.write(b"0123"), 4);
        assert_eq!(s.write(b"45"), 0, "full");
        assert_eq!(s.write(b"67"), 0, "still full: the same gap grows");
        s.skip(3, DropReason::KernelLost);
        s.skip(2, DropReason::NotCopied);
        let mut b = s.buf();
        let mut got = Vec::new();
        while let Some(l) = b.lost.pop_first() {
            got.push(l);
        }
        assert_eq!(
            got,
            vec![
                (Span::new(4, 8), DropReason::BufferFull),
                (Span::new(8, 11), DropReason::KernelLost),
                (Span::new(11, 13), DropReason::NotCopied),
            ]
        );
        assert!(b.lost.is_empty());
    }

    #[tokio::test]
    async fn bytes_held_at_the_data_deadline_are_given_up() {
        let s = Shipper::new(cfg(100));
        s.write(b"0123456789");
        s.skip(2, DropReason::KernelLost);
        let client = Client::new(
            "http://127.0.0.1:9",
            crate::Token::Value("t".to_owned()),
            Duration::from_secs(1),
        )
        .unwrap();
        let mut run = s.runner(Arc::new(client), StreamSpec::named("stdout"));
        run.give_up_data();
        let mut b = s.buf();
        let mut got = Vec::new();
        while let Some(l) = b.lost.pop_first() {
            got.push(l);
        }
        assert_eq!(
            got,
            vec![
                (Span::new(0, 10), DropReason::GaveUp),
                (Span::new(10, 12), DropReason::KernelLost),
            ]
        );
        assert_eq!((b.queued, b.held), (0, 0));
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_honours_retry_after() {
        let mut b = Backoff::new(&ShipConfig {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(400),
            ..ShipConfig::default()
        });
        let waits: Vec<Duration> = (0..5).map(|_| b.next(None)).collect();
        for (w, base) in waits.iter().zip([100, 200, 400, 400, 400]) {
            let base = Duration::from_millis(base);
            assert!(*w >= base / 2 && *w <= base, "{w:?} for {base:?}");
        }
        assert!(b.next(Some(Duration::from_secs(3))) >= Duration::from_secs(3));
    }
}
