//! Building the capture report: a context's streams as each capture path stored them, side by
//! side. Its types and its text table are in `contract::report`, shared with the clients.
//!
//! # Why the two paths' offsets line up
//!
//! Both paths number the bytes a container wrote to one of its stdio fds from the start of the
//! container's process, beginning at 0:
//! - the entrypoint is the container's first process; it counts the bytes it reads from the pipe
//!   it gave its child as fd 1 or 2, in read order, which is write order for a pipe;
//! - the collector counts, per (cgroup, file), the bytes `write`/`writev` returned as written to
//!   the file the container's fd 1 or 2 refers to: that same pipe, since the collector passes over
//!   the entrypoint's own fds and takes the fds of the container's command.
//!
//! A pipe delivers bytes in the order they were written and neither path skips any without saying
//! so (a `dropped` range), so byte N of one path's stream is byte N of the other's: equal streams
//! have equal offsets, lengths and hashes, and the report compares them offset by offset.
//!
//! When they do not line up:
//! - a restarted container: each path writes a new *generation* (`name.1`, `name.2`, ...) once the
//!   previous one is complete; generations are compared by exact name. An entrypoint that died
//!   without declaring its final length continues its generation after what is stored instead, while
//!   the collector starts the next one: the report then shows the first generation longer on the
//!   entrypoint path and a generation only the collector has;
//! - a path that joined late (a collector started while the container ran, a namespace labelled
//!   later): its stream starts with a `dropped` range up to the offset it first saw, so the report
//!   shows the divergence at 0 (`dropped` on that side) and the hash of the bytes it has.

use std::{
    collections::{BTreeMap, VecDeque},
    pin::Pin,
    sync::Arc,
};

use bytes::Bytes;
use futures::{Stream as FutStream, StreamExt};
use sha2::{Digest, Sha256};

/// The report's types and text, shared with its clients.
pub use contract::report::{
    Comparison, Divergence, EXCERPT, HashCovers, PathReport, Report, Side, SideKind, StreamReport,
    split_generation,
};

use crate::{
    range::Span,
    reason::DropReason,
    source::Source,
    store::{Part, Piece, Status, Store, StoreError, Stream},
};

/// Longest piece read from storage at once per path while hashing and comparing.
pub const CHUNK: u64 = 1 << 20;
/// Pieces read ahead per path: enough to keep a stream of small parts (one GET each) moving, at
/// most `READ_AHEAD` x [`CHUNK`] bytes in memory per path.
const READ_AHEAD: usize = 8;

/// A consecutive piece of one path's stream, from offset 0 on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Data(Bytes),
    Dropped(u64),
    Pending(u64),
}

impl Seg {
    fn len(&self) -> u64 {
        match self {
            Seg::Data(b) => b.len() as u64,
            Seg::Dropped(n) | Seg::Pending(n) => *n,
        }
    }

    fn skip(&mut self, n: u64) {
        match self {
            Seg::Data(b) => *b = b.slice(n as usize..),
            Seg::Dropped(m) | Seg::Pending(m) => *m -= n,
        }
    }
}

#[derive(Debug, Default)]
struct Lane {
    queue: VecDeque<Seg>,
    ended: bool,
}

impl Lane {
    fn consume(&mut self, mut n: u64) {
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            let k = front.len().min(n);
            front.skip(k);
            if front.len() == 0 {
                self.queue.pop_front();
            }
            n -= k;
        }
    }

    /// Whether the lane holds what its side of a divergence shows: [`EXCERPT`] bytes, or the
    /// data up to a missing range or its end.
    fn excerpt_ready(&self) -> bool {
        let mut n = 0;
        for seg in &self.queue {
            let Seg::Data(b) = seg else { return true };
            n += b.len();
            if n >= EXCERPT {
                return true;
            }
        }
        self.ended
    }

    fn side(&self) -> Side {
        match self.queue.front() {
            None => Side {
                kind: SideKind::End,
                excerpt: String::new(),
            },
            Some(Seg::Dropped(_)) => Side {
                kind: SideKind::Dropped,
                excerpt: String::new(),
            },
            Some(Seg::Pending(_)) => Side {
                kind: SideKind::Pending,
                excerpt: String::new(),
            },
            Some(Seg::Data(_)) => {
                let mut ex = Vec::with_capacity(EXCERPT);
                for seg in &self.queue {
                    let Seg::Data(b) = seg else { break };
                    let take = (EXCERPT - ex.len()).min(b.len());
                    ex.extend_from_slice(&b[..take]);
                    if ex.len() == EXCERPT {
                        break;
                    }
                }
                Side {
                    kind: SideKind::Data,
                    excerpt: ex.escape_ascii().to_string(),
                }
            }
        }
    }
}

/// Finds where two paths' streams first differ, fed in bounded pieces.
///
/// Side 0 is the entrypoint, side 1 the collector. Ranges missing on both (dropped or pending)
/// are passed over: there is nothing to compare. Bytes on one side against a missing range or the
/// end of the other, or differing bytes, are a divergence.
#[derive(Debug, Default)]
pub struct Finder {
    lanes: [Lane; 2],
    offset: u64,
    /// The paths differ at `offset`; the excerpts are being gathered.
    diverging: bool,
    found: Option<Divergence>,
}

impl Finder {
    /// A finder at offset 0 of both paths.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next piece of `side`; ignored once a divergence is found.
    pub fn push(&mut self, side: usize, seg: Seg) {
        if self.found.is_none() && seg.len() > 0 {
            self.lanes[side].queue.push_back(seg);
        }
    }

    /// `side` has no more pieces.
    pub fn end(&mut self, side: usize) {
        self.lanes[side].ended = true;
    }

    /// Whether comparing can only go on with another piece of `side`.
    pub fn needs(&self, side: usize) -> bool {
        let l = &self.lanes[side];
        if self.found.is_some() || l.ended {
            return false;
        }
        if self.diverging {
            !l.excerpt_ready()
        } else {
            l.queue.is_empty()
        }
    }

    /// A divergence is found: more pieces change nothing.
    pub fn settled(&self) -> bool {
        self.found.is_some()
    }

    /// The divergence found so far.
    pub fn divergence(&self) -> Option<&Divergence> {
        self.found.as_ref()
    }

    fn diverge(&mut self) {
        if self.found.is_some() {
            return;
        }
        self.diverging = true;
        if !self.lanes.iter().all(Lane::excerpt_ready) {
            return;
        }
        let [a, b] = &self.lanes;
        self.found = Some(Divergence {
            offset: self.offset,
            entrypoint: a.side(),
            ebpf: b.side(),
        });
        self.lanes = Default::default();
    }

    /// Compares what both sides hold.
    pub fn advance(&mut self) {
        if self.diverging {
            return self.diverge();
        }
        while self.found.is_none() {
            let [a, b] = &self.lanes;
            let (x, y) = match (a.queue.front(), b.queue.front()) {
                (None, _) if !a.ended => return,
                (_, None) if !b.ended => return,
                (None, None) => return,
                (Some(_), None) | (None, Some(_)) => return self.diverge(),
                (Some(x), Some(y)) => (x, y),
            };
            let n = x.len().min(y.len());
            match (x, y) {
                (Seg::Data(p), Seg::Data(q)) => {
                    let n = n as usize;
                    if let Some(i) = p[..n].iter().zip(&q[..n]).position(|(u, v)| u != v) {
                        self.lanes[0].consume(i as u64);
                        self.lanes[1].consume(i as u64);
                        self.offset += i as u64;
                        return self.diverge();
                    }
                }
                (Seg::Data(_), _) | (_, Seg::Data(_)) => return self.diverge(),
                _ => {}
            }
            self.lanes[0].consume(n);
            self.lanes[1].consume(n);
            self.offset += n;
        }
    }
}

/// One path's pieces to read, in offset order.
#[derive(Debug)]
enum Planned {
    Data { span: Span, part: Part },
    Missing(Seg),
}

/// The pieces of `stream` from 0 to its extent (final length, or highest offset), data pieces at
/// most [`CHUNK`] long.
fn layout(stream: &Stream, status: &Status) -> Vec<Planned> {
    let extent = status.final_length.unwrap_or(0).max(status.end);
    let mut out = Vec::new();
    let mut at = 0;
    while at < extent {
        let (pieces, reached) = stream.plan(Span::new(at, extent));
        for piece in pieces {
            match piece {
                Piece::Data { span, part } => {
                    let mut a = span.start;
                    while a < span.end {
                        let b = span.end.min(a + CHUNK);
                        out.push(Planned::Data {
                            span: Span::new(a, b),
                            part: part.clone(),
                        });
                        a = b;
                    }
                }
                Piece::Dropped(s, _) => out.push(Planned::Missing(Seg::Dropped(s.len()))),
            }
        }
        if reached >= extent {
            break;
        }
        // A pending gap: it ends where the next stored or dropped range begins.
        let next = status
            .stored
            .iter()
            .map(|s| s.start)
            .chain(status.dropped.iter().map(|d| d.start))
            .filter(|&s| s > reached)
            .min()
            .unwrap_or(extent)
            .min(extent);
        out.push(Planned::Missing(Seg::Pending(next - reached)));
        at = next;
    }
    out
}

type Segs<'a> = Pin<Box<dyn FutStream<Item = Result<Seg, StoreError>> + Send + 'a>>;

fn segments<'a>(store: &'a Store, stream: &'a Stream, planned: Vec<Planned>) -> Segs<'a> {
    Box::pin(
        futures::stream::iter(planned)
            .map(move |p| async move {
                match p {
                    Planned::Data { span, part } => {
                        store.read_piece(stream, span, &part).await.map(Seg::Data)
                    }
                    Planned::Missing(seg) => Ok(seg),
                }
            })
            .buffered(READ_AHEAD),
    )
}

async fn next_if(
    want: bool,
    segs: &mut Option<Segs<'_>>,
) -> Option<Option<Result<Seg, StoreError>>> {
    match segs {
        Some(s) if want => Some(s.next().await),
        _ => None,
    }
}

/// Hashes both paths' stored bytes and finds their first divergence, reading both at once in
/// pieces of at most [`CHUNK`] bytes (memory stays bounded whatever the streams' length).
async fn hash_and_compare(
    store: &Store,
    streams: [Option<(&Stream, &Status)>; 2],
) -> Result<([String; 2], Option<Divergence>), StoreError> {
    let mut finder = Finder::new();
    let mut hashers = [Sha256::new(), Sha256::new()];
    let mut segs: [Option<Segs<'_>>; 2] = [None, None];
    for (i, s) in streams.iter().enumerate() {
        match s {
            Some((stream, status)) => {
                segs[i] = Some(segments(store, stream, layout(stream, status)))
            }
            None => finder.end(i),
        }
    }
    loop {
        let want = [0, 1].map(|i| segs[i].is_some() && (finder.settled() || finder.needs(i)));
        if !want[0] && !want[1] {
            break;
        }
        let [s0, s1] = &mut segs;
        let got = futures::join!(next_if(want[0], s0), next_if(want[1], s1));
        for (i, g) in [got.0, got.1].into_iter().enumerate() {
            match g {
                None => {}
                Some(None) => {
                    segs[i] = None;
                    finder.end(i);
                }
                Some(Some(seg)) => {
                    let seg = seg?;
                    if let Seg::Data(b) = &seg {
                        hashers[i].update(b);
                    }
                    finder.push(i, seg);
                }
            }
        }
        finder.advance();
    }
    let [h0, h1] = hashers.map(|h| hex::encode(h.finalize()));
    Ok(([h0, h1], finder.divergence().cloned()))
}

fn path_report(status: &Status, sha256: String) -> PathReport {
    let sum = |v: &[Span]| v.iter().map(Span::len).sum::<u64>();
    let mut dropped_by_reason: BTreeMap<DropReason, u64> = BTreeMap::new();
    for d in &status.dropped {
        *dropped_by_reason.entry(d.reason).or_default() += d.len();
    }
    PathReport {
        id: status.id.clone(),
        bytes_stored: sum(&status.stored),
        dropped_bytes: dropped_by_reason.values().sum(),
        dropped_by_reason,
        pending_bytes: sum(&status.pending),
        sha256_covers: if status.dropped.is_empty() && status.pending.is_empty() {
            HashCovers::AllBytes
        } else {
            HashCovers::StoredBytesOnly
        },
        dropped: status.dropped.clone(),
        pending: status.pending.clone(),
        complete: status.complete,
        final_length: status.final_length,
        writer_died_at: status.writer_died_at,
        end: status.end,
        first_received_ms: status.first_received_ms,
        last_received_ms: status.last_received_ms,
        sha256,
    }
}

/// Compares one stream name's entrypoint and ebpf streams (either may be missing, not both).
pub async fn compare_stream(
    store: &Store,
    name: &str,
    entrypoint: Option<&Stream>,
    ebpf: Option<&Stream>,
) -> Result<StreamReport, StoreError> {
    let statuses = [entrypoint.map(Stream::status), ebpf.map(Stream::status)];
    let pairs = [
        entrypoint.zip(statuses[0].as_ref()),
        ebpf.zip(statuses[1].as_ref()),
    ];
    let (hashes, divergence) = hash_and_compare(store, pairs).await?;
    let [h0, h1] = hashes;
    let e = statuses[0].as_ref().map(|s| path_report(s, h0));
    let b = statuses[1].as_ref().map(|s| path_report(s, h1));
    let (base, generation) = split_generation(name);
    let mut reasons = Vec::new();
    let (comparison, divergence) = match (&e, &b) {
        (Some(_), None) => {
            reasons.push("only the entrypoint stored this stream".to_owned());
            (Comparison::EntrypointOnly, None)
        }
        (None, _) => {
            reasons.push(
                match ebpf.and_then(|b| b.meta.entrypoint_absent.as_deref()) {
                    Some(why) => format!("only the collector stored this stream: {why}"),
                    None => "only the collector stored this stream".to_owned(),
                },
            );
            (Comparison::EbpfOnly, None)
        }
        (Some(e), Some(b)) => {
            for (p, src) in [(e, Source::Entrypoint), (b, Source::Ebpf)] {
                if let Some(at) = p.writer_died_at {
                    reasons.push(format!(
                        "the {src} writer died at offset {at}; the rest of its stream was settled \
                         from the other path's length"
                    ));
                }
                if !p.complete {
                    reasons.push(format!(
                        "{src} is incomplete ({} bytes pending, final length {})",
                        p.pending_bytes,
                        p.final_length
                            .map_or("not declared".to_owned(), |n| n.to_string())
                    ));
                }
                if p.dropped_bytes > 0 {
                    reasons.push(format!(
                        "{src} dropped {} bytes ({})",
                        p.dropped_bytes,
                        p.reason_breakdown()
                    ));
                }
            }
            if e.final_length != b.final_length {
                reasons.push(format!(
                    "final lengths differ: entrypoint {:?}, ebpf {:?}",
                    e.final_length, b.final_length
                ));
            }
            if e.sha256 != b.sha256 {
                reasons.push("sha256 of the stored bytes differ".to_owned());
            }
            if let Some(d) = &divergence {
                reasons.push(format!(
                    "first divergence at offset {}: entrypoint {}, ebpf {}",
                    d.offset,
                    d.entrypoint.kind.as_str(),
                    d.ebpf.kind.as_str()
                ));
            }
            let c = if !e.complete || !b.complete {
                Comparison::Incomplete
            } else if reasons.is_empty() {
                Comparison::Agree
            } else {
                Comparison::Differ
            };
            (c, divergence)
        }
    };
    Ok(StreamReport {
        name: name.to_owned(),
        base: base.to_owned(),
        generation,
        agree: comparison == Comparison::Agree,
        comparison,
        reasons,
        divergence,
        entrypoint: e,
        ebpf: b,
    })
}

/// One name's entrypoint and ebpf streams.
type Pair = [Option<Arc<Stream>>; 2];

/// Builds the report from the context's streams, grouped by name.
pub async fn build(
    store: &Store,
    context: &str,
    streams: Vec<Arc<Stream>>,
) -> Result<Report, StoreError> {
    let mut by_name: BTreeMap<(String, u32, String), Pair> = BTreeMap::new();
    for s in streams {
        let (base, generation) = split_generation(&s.meta.name);
        let key = (base.to_owned(), generation, s.meta.name.clone());
        let i = match s.meta.source {
            Source::Entrypoint => 0,
            Source::Ebpf => 1,
        };
        by_name.entry(key).or_default()[i] = Some(s);
    }
    let mut out = Vec::with_capacity(by_name.len());
    for ((_, _, name), [e, b]) in by_name {
        out.push(compare_stream(store, &name, e.as_deref(), b.as_deref()).await?);
    }
    Ok(Report {
        context: context.to_owned(),
        agree: !out.is_empty() && out.iter().all(|s| s.agree),
        streams: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &[u8]) -> Seg {
        Seg::Data(Bytes::copy_from_slice(s))
    }

    /// Feeds both sides in the given pieces and ends them.
    fn find(a: Vec<Seg>, b: Vec<Seg>) -> Option<Divergence> {
        let mut f = Finder::new();
        let (mut a, mut b) = (VecDeque::from(a), VecDeque::from(b));
        loop {
            for (i, q) in [(0, &mut a), (1, &mut b)] {
                if f.needs(i) {
                    match q.pop_front() {
                        Some(s) => f.push(i, s),
                        None => f.end(i),
                    }
                }
            }
            f.advance();
            if f.settled() || (!f.needs(0) && !f.needs(1) && a.is_empty() && b.is_empty()) {
                f.advance();
                return f.divergence().cloned();
            }
        }
    }

    #[test]
    fn equal_streams_in_different_pieces_do_not_diverge() {
        let a = vec![data(b"hello "), data(b"world\n")];
        let b = vec![data(b"hel"), data(b"lo world"), data(b"\n")];
        assert_eq!(find(a, b), None);
        assert_eq!(find(vec![], vec![]), None);
    }

    #[test]
    fn differing_bytes_diverge_at_their_offset_with_excerpts() {
        let a = vec![data(b"abcdef"), data(b"ghij")];
        let b = vec![data(b"abcdefgX"), data(b"\xffk")];
        let d = find(a, b).unwrap();
        assert_eq!(d.offset, 7);
        assert_eq!(d.entrypoint.kind, SideKind::Data);
        assert_eq!(d.entrypoint.excerpt, "hij");
        assert_eq!(d.ebpf.excerpt, "X\\xffk");
    }

    #[test]
    fn a_found_divergence_stays_as_more_pieces_and_ends_arrive() {
        let mut f = Finder::new();
        f.push(0, data(b"abc"));
        f.push(1, data(b"abd"));
        f.end(0);
        f.end(1);
        f.advance();
        let d = f.divergence().cloned().unwrap();
        f.push(0, data(b"more"));
        f.advance();
        assert_eq!(f.divergence(), Some(&d));
        assert_eq!((d.offset, d.entrypoint.excerpt.as_str()), (2, "c"));
    }

    #[test]
    fn excerpts_are_bounded() {
        let long = vec![b'a'; 100];
        let mut other = long.clone();
        other[10] = b'\n';
        let d = find(vec![data(&long)], vec![data(&other)]).unwrap();
        assert_eq!(d.offset, 10);
        assert_eq!(d.entrypoint.excerpt, "a".repeat(EXCERPT));
        assert!(d.ebpf.excerpt.starts_with("\\n"));
        assert_eq!(d.ebpf.excerpt.len(), EXCERPT + 1);
    }

    #[test]
    fn a_dropped_range_against_bytes_diverges_where_it_starts() {
        let a = vec![data(b"0123456789")];
        let b = vec![data(b"0123"), Seg::Dropped(4), data(b"89")];
        let d = find(a, b).unwrap();
        assert_eq!(d.offset, 4);
        assert_eq!(d.entrypoint.excerpt, "456789");
        assert_eq!(d.ebpf.kind, SideKind::Dropped);
        assert_eq!(d.ebpf.excerpt, "");
    }

    #[test]
    fn ranges_missing_on_both_sides_are_passed_over() {
        let a = vec![data(b"ab"), Seg::Dropped(3), data(b"cd")];
        let b = vec![data(b"ab"), Seg::Pending(1), Seg::Dropped(2), data(b"cd")];
        assert_eq!(find(a, b), None);
    }

    #[test]
    fn a_shorter_side_diverges_at_its_end() {
        let d = find(vec![data(b"abc")], vec![data(b"abcde")]).unwrap();
        assert_eq!(d.offset, 3);
        assert_eq!(d.entrypoint.kind, SideKind::End);
        assert_eq!(d.ebpf.excerpt, "de");
        let d = find(vec![data(b"abc"), Seg::Pending(5)], vec![data(b"abc")]).unwrap();
        assert_eq!(
            (d.offset, d.entrypoint.kind, d.ebpf.kind),
            (3, SideKind::Pending, SideKind::End)
        );
    }
}
