//! Readers: the bytes of one stream, or a context's stdout and stderr merged from both capture
//! paths, once or followed as they arrive.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{Stream as FutStream, future::select_all};
use serde::Serialize;

use crate::{
    range::Span,
    reason::DropReason,
    store::{Piece, Source, Store, StoreError, Stream},
};

/// How soon a follower that saw nothing new re-lists storage to see parts other replicas stored;
/// each quiet re-listing doubles the wait up to [`REFRESH_MAX`], and news resets it. Writes on
/// this replica wake followers at once.
const REFRESH: Duration = Duration::from_millis(500);

/// The longest wait between re-listings of a quiet follower: a thousand followers of idle
/// triggers then cost 250 listings a second, not 2,000.
const REFRESH_MAX: Duration = Duration::from_secs(4);

/// One unit of output.
#[derive(Debug, Clone)]
pub enum Record {
    Data {
        stream: String,
        source: Source,
        offset: u64,
        received_ms: u64,
        /// When the first byte was written (see [`crate::store::Part::written_ms`]).
        written_ms: u64,
        data: Bytes,
    },
    Dropped {
        stream: String,
        source: Source,
        span: Span,
        reason: DropReason,
    },
}

/// The NDJSON form of a record. `data` carries text; bytes that are not UTF-8 go in `data_base64`.
#[derive(Debug, Serialize)]
struct JsonRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    stream: &'a str,
    source: Source,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    length: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    received_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    written_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
    /// Why a `dropped` record's bytes were lost.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<DropReason>,
}

impl Record {
    /// One NDJSON line.
    pub fn to_ndjson(&self) -> Bytes {
        use base64::Engine;
        let rec = match self {
            Record::Data {
                stream,
                source,
                offset,
                received_ms,
                written_ms,
                data,
            } => {
                let text = std::str::from_utf8(data).ok();
                JsonRecord {
                    kind: "data",
                    stream,
                    source: *source,
                    offset: *offset,
                    length: Some(data.len() as u64),
                    received_ms: Some(*received_ms),
                    written_ms: Some(*written_ms),
                    data: text,
                    data_base64: text
                        .is_none()
                        .then(|| base64::engine::general_purpose::STANDARD.encode(data)),
                    reason: None,
                }
            }
            Record::Dropped {
                stream,
                source,
                span,
                reason,
            } => JsonRecord {
                kind: "dropped",
                stream,
                source: *source,
                offset: span.start,
                length: Some(span.len()),
                received_ms: None,
                written_ms: None,
                data: None,
                data_base64: None,
                reason: Some(*reason),
            },
        };
        let mut v = serde_json::to_vec(&rec).unwrap_or_default();
        v.push(b'\n');
        v.into()
    }
}

/// One logical stream (stdout or stderr) read from its authoritative source, with the other capture
/// path filling ranges the first one dropped or does not hold yet (its writer is behind, or died
/// with bytes in flight): both paths hold the same bytes at the same offsets, so a merged read
/// returns every byte either path holds, in order.
#[derive(Debug, Clone)]
pub struct Lane {
    pub name: String,
    pub primary: Option<Arc<Stream>>,
    pub fallback: Option<Arc<Stream>>,
    pub offset: u64,
    pub end: Option<u64>,
}

#[derive(Debug)]
enum Planned {
    Data {
        stream: Arc<Stream>,
        span: Span,
        part: crate::store::Part,
    },
    Dropped {
        source: Source,
        span: Span,
        reason: DropReason,
    },
    /// Bytes read already: one run of a piece, written at one time. A piece read from a segment
    /// holds the runs of every part merged into it; each waits its turn by its own time.
    Run {
        source: Source,
        offset: u64,
        received_ms: u64,
        written_ms: u64,
        data: Bytes,
    },
}

impl Lane {
    /// A lane for stream `name`, read from offset 0 to wherever it ends; its streams are opened later.
    pub fn new(name: String) -> Self {
        Self {
            name,
            primary: None,
            fallback: None,
            offset: 0,
            end: None,
        }
    }

    fn limit(&self) -> u64 {
        self.end.unwrap_or(u64::MAX)
    }

    fn plan(&self) -> (Vec<Planned>, u64) {
        let Some(first) = self.primary.as_ref().or(self.fallback.as_ref()) else {
            return (Vec::new(), self.offset);
        };
        let fallback = self.primary.as_ref().and(self.fallback.as_ref());
        let mut out = Vec::new();
        let mut at = self.offset;
        loop {
            let reached =
                plan_with_fallback(first, fallback, Span::new(at, self.limit()), &mut out);
            at = reached;
            // The first source stops at a range it neither holds nor has dropped: the other
            // path fills what it holds from there, and the first takes over again after it.
            let Some(fb) = fallback.filter(|_| at < self.limit()) else {
                break;
            };
            let filled = take_data(fb, Span::new(at, self.limit()), &mut out);
            if filled == at {
                break;
            }
            at = filled;
        }
        (out, at)
    }

    /// Whether the lane is read to its end: the first source's final length, or the other
    /// path's when the first never declares one (its writer died).
    fn finished(&self) -> bool {
        if self.end.is_some_and(|e| self.offset >= e) {
            return true;
        }
        self.streams().any(|s| s.finished_at(self.offset))
    }

    fn streams(&self) -> impl Iterator<Item = &Arc<Stream>> {
        self.primary.iter().chain(self.fallback.iter())
    }
}

/// Data pieces of `stream` from `span.start` on, as far as they are contiguous; returns where
/// they end.
fn take_data(stream: &Arc<Stream>, span: Span, out: &mut Vec<Planned>) -> u64 {
    let mut at = span.start;
    for p in stream.plan(span).0 {
        match p {
            Piece::Data { span: s, part } => {
                out.push(Planned::Data {
                    stream: Arc::clone(stream),
                    span: s,
                    part,
                });
                at = s.end;
            }
            Piece::Dropped(..) => break,
        }
    }
    at
}

/// Plans `span` of `first`, filling its dropped ranges from `fallback` where it holds them;
/// returns where the plan stopped (the first range `first` neither holds nor has dropped).
fn plan_with_fallback(
    first: &Arc<Stream>,
    fallback: Option<&Arc<Stream>>,
    span: Span,
    out: &mut Vec<Planned>,
) -> u64 {
    let (pieces, reached) = first.plan(span);
    for piece in pieces {
        match piece {
            Piece::Data { span, part } => out.push(Planned::Data {
                stream: Arc::clone(first),
                span,
                part,
            }),
            Piece::Dropped(span, reason) => {
                let at = fallback.map_or(span.start, |fb| take_data(fb, span, out));
                if at < span.end {
                    out.push(Planned::Dropped {
                        source: first.meta.source,
                        span: Span::new(at, span.end),
                        reason,
                    });
                }
            }
        }
    }
    reached
}

/// When a follower stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Read what is there now.
    No,
    /// Until every lane with a stream is complete.
    UntilComplete,
    /// Until the reader leaves (triggers are always in progress).
    Forever,
}

/// Produces records from `lanes` in arrival order. `reopen` is called while following, at each
/// quiet refresh, to pick up streams (or whole lanes) that did not exist when the read began.
pub fn records<F, Fut>(
    store: Arc<Store>,
    mut lanes: Vec<Lane>,
    follow: Follow,
    reopen: F,
) -> impl FutStream<Item = Result<Record, StoreError>>
where
    F: Fn(Vec<Lane>) -> Fut + Send + 'static,
    Fut: Future<Output = Vec<Lane>> + Send,
{
    async_stream::try_stream! {
        let mut quiet = REFRESH;
        loop {
            // Subscribe before planning so a change between the plan and the wait is not missed.
            let mut waits: Vec<_> = lanes
                .iter()
                .flat_map(|l| l.streams())
                .map(|s| s.subscribe())
                .collect();
            let mut plans: Vec<(usize, std::collections::VecDeque<Planned>)> = Vec::new();
            for (i, lane) in lanes.iter_mut().enumerate() {
                let (planned, reached) = lane.plan();
                lane.offset = reached;
                plans.push((i, planned.into()));
            }
            // Merge lanes by write time, each lane kept in offset order.
            let mut replan = false;
            loop {
                let next = plans
                    .iter_mut()
                    .filter(|(_, q)| !q.is_empty())
                    .min_by_key(|(i, q)| {
                        let t = match q.front() {
                            Some(Planned::Data { part, .. }) => part.written_ms,
                            Some(Planned::Run { written_ms, .. }) => *written_ms,
                            _ => 0,
                        };
                        (t, *i)
                    });
                let Some((i, q)) = next else { break };
                let name = lanes[*i].name.clone();
                match q.pop_front() {
                    Some(Planned::Data { stream, span, part }) => {
                        let times = store.times(&stream, &part).await?;
                        let data = store.read_piece(&stream, span, &part).await?;
                        if !stream.holds(&part) {
                            // Merged into a segment since planned, and so are the parts after it,
                            // likely: plan the rest of the lane again, from the segments.
                            q.clear();
                            lanes[*i].offset = span.end;
                            replan = true;
                        }
                        // A segment's bytes come in the runs its writers wrote, each with its time,
                        // as they came before the merge, and each merged with the other lanes by
                        // that time.
                        let runs: Vec<Planned> = times
                            .runs(span)
                            .into_iter()
                            .map(|(run, written_ms)| {
                                let at = ((run.start - span.start) as usize).min(data.len());
                                let end = (at + run.len() as usize).min(data.len());
                                Planned::Run {
                                    source: stream.meta.source,
                                    offset: run.start,
                                    received_ms: part.received_ms,
                                    written_ms,
                                    data: data.slice(at..end),
                                }
                            })
                            .collect();
                        for run in runs.into_iter().rev() {
                            q.push_front(run);
                        }
                    }
                    Some(Planned::Run { source, offset, received_ms, written_ms, data }) => {
                        yield Record::Data {
                            stream: name,
                            source,
                            offset,
                            received_ms,
                            written_ms,
                            data,
                        };
                    }
                    Some(Planned::Dropped { source, span, reason }) => {
                        yield Record::Dropped { stream: name, source, span, reason };
                    }
                    None => {}
                }
            }
            if replan {
                continue;
            }
            let any = lanes.iter().any(|l| l.streams().next().is_some());
            let done = match follow {
                Follow::No => true,
                Follow::UntilComplete => any && lanes.iter().all(|l| l.streams().next().is_none() || l.finished()),
                Follow::Forever => false,
            };
            if done {
                break;
            }
            let mut timed_out = true;
            if !waits.is_empty() {
                let changed = select_all(waits.iter_mut().map(|w| Box::pin(w.changed())));
                timed_out = tokio::time::timeout(quiet, changed).await.is_err();
            } else {
                tokio::time::sleep(quiet).await;
            }
            if timed_out {
                let open: Vec<Arc<Stream>> = lanes.iter().flat_map(|l| l.streams()).cloned().collect();
                let mut news = false;
                for s in open {
                    news |= store.refresh(&s).await?;
                }
                let before = lanes.iter().map(|l| l.streams().count()).sum::<usize>();
                lanes = reopen(lanes).await;
                news |= lanes.iter().map(|l| l.streams().count()).sum::<usize>() != before;
                quiet = if news { REFRESH } else { (quiet * 2).min(REFRESH_MAX) };
            } else {
                quiet = REFRESH;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures::{StreamExt, pin_mut};
    use object_store::{ObjectStore, memory::InMemory, path::Path};

    use super::*;
    use crate::{auth::Context, metrics::Metrics, store::StreamMeta};

    /// A store on memory with small segments, and its metrics.
    fn store() -> (Arc<Store>, Arc<Metrics>) {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let m = Arc::new(Metrics::new());
        let store = Store::new(os, Path::from("t"), m.clone())
            .segment_size(1000)
            .settled_after(Duration::ZERO);
        (Arc::new(store), m)
    }

    /// An entrypoint `stdout` stream of `context` and a lane reading it from the start.
    async fn stdout(store: &Store, context: &str) -> (Arc<Stream>, Lane) {
        let meta = StreamMeta {
            context: Context::stream(context).unwrap(),
            name: "stdout".into(),
            source: Source::Entrypoint,
            entrypoint_absent: None,
            namespace: None,
            pod: None,
        };
        let stream = store.create("x".into(), meta).await.unwrap();
        let lane = Lane {
            name: "stdout".into(),
            primary: Some(Arc::clone(&stream)),
            fallback: None,
            offset: 0,
            end: None,
        };
        (stream, lane)
    }

    #[tokio::test]
    async fn a_read_whose_parts_are_merged_midway_plans_again_from_the_segment() {
        let (store, m) = store();
        let (stream, lane) = stdout(&store, "workflows/w/runs/r/steps/s").await;
        let mut want = Vec::new();
        for i in 0..100u64 {
            let part: Vec<u8> = (0..10).map(|j| (i * 10 + j) as u8).collect();
            want.extend_from_slice(&part);
            store
                .write(&stream, Some(i * 10), part.into(), None)
                .await
                .unwrap();
        }
        let records = records(Arc::clone(&store), vec![lane], Follow::No, |l| async { l });
        pin_mut!(records);
        let mut got = Vec::new();
        let Some(Ok(Record::Data { data, .. })) = records.next().await else {
            panic!("no first record")
        };
        got.extend_from_slice(&data);
        // The other 99 parts are planned; now they are merged away.
        assert_eq!(store.compact(&stream).await.unwrap().segments, 1);
        let before = m.storage_calls("get");
        while let Some(r) = records.next().await {
            if let Record::Data { data, .. } = r.unwrap() {
                got.extend_from_slice(&data);
            }
        }
        assert_eq!(got, want);
        // The next planned part is missing and read from the segment; the rest is planned again
        // and read from the segment at once (not two requests for each of the 98 others).
        assert_eq!(m.storage_calls("get") - before, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_follower_lists_storage_less_and_less_often() {
        let (store, m) = store();
        let (stream, lane) = stdout(&store, "workflows/w/triggers/t").await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let follower = tokio::spawn({
            let store = Arc::clone(&store);
            async move {
                let records = records(store, vec![lane], Follow::Forever, |l| async { l });
                pin_mut!(records);
                while let Some(r) = records.next().await {
                    let _ = tx.send(r.is_ok());
                }
            }
        });
        let before = m.storage_calls("list");
        tokio::time::sleep(Duration::from_secs(30)).await;
        // Re-listed after 0.5, 1.5, 3.5, 7.5 s and then every 4 s: 9 times in 30 s (60 at a
        // steady 0.5 s).
        let lists = m.storage_calls("list") - before;
        assert!((8..=10).contains(&lists), "{lists} listings in 30 s");
        // A write here wakes it at once.
        store
            .write(&stream, Some(0), Bytes::from_static(b"hi\n"), None)
            .await
            .unwrap();
        let woke = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await;
        assert_eq!(woke.ok().flatten(), Some(true));
        follower.abort();
    }
}
