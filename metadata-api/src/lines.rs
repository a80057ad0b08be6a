//! Plain-text reads as `kubectl logs` gives them: whole lines, each optionally starting with its
//! write time (`--timestamps`) and its stream (`--prefix`), a line per dropped range, a time
//! window, the last N lines, and a byte limit.
//!
//! Records of several streams arrive interleaved by write time. A line is never spliced with
//! another stream's: each stream's bytes after its last newline are held until the newline comes,
//! the read ends, or (while following) nothing has come for [`HOLD`]. A held part let out early
//! ends the output line before another stream's line starts, and its continuation starts a line
//! of its own.

use std::{collections::VecDeque, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt, pin_mut};

use crate::{read::Record, reason::DropReason, store::StoreError};

/// How long a partial line is held back while following before it is let out as it is.
pub const HOLD: Duration = Duration::from_secs(1);

/// How to render a plain-text read.
#[derive(Debug, Clone, Default)]
pub struct Lines {
    /// Each line starts with its write time, RFC 3339 with nanoseconds, and a space.
    pub timestamps: bool,
    /// Each line starts with `[container/stream] `.
    pub prefix: bool,
    /// A dropped range is shown as a line `[relay: N bytes dropped: REASON]`; neighbouring
    /// ranges of different reasons are a line each.
    pub markers: bool,
    /// Only bytes written at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Only bytes written at or before this time.
    pub until_ms: Option<u64>,
    /// Only the last N lines of what is read now (a follower then goes on with what comes).
    pub tail: Option<u64>,
    /// Stop after this many bytes of output.
    pub limit_bytes: Option<u64>,
    /// The container a stream without one (`stdout`, `stderr`) belongs to in a prefix: the step.
    pub default_container: String,
}

/// `since` and `until` (`what`): an RFC 3339 time in UTC, or a duration before `now_ms`; the
/// error says what was expected.
pub fn parse_time(what: &str, v: &str, now_ms: u64) -> Result<u64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64));
    }
    match humantime::parse_duration(v) {
        Ok(d) => Ok(now_ms.saturating_sub(d.as_millis() as u64)),
        Err(_) => Err(format!(
            "{what} must be an RFC 3339 time (2026-12-07T10:00:00Z) or a duration before now \
             (10m), not {v:?}"
        )),
    }
}

/// Whether a record written at `ms` is inside the window.
fn in_window(since_ms: Option<u64>, until_ms: Option<u64>, ms: u64) -> bool {
    since_ms.is_none_or(|s| ms >= s) && until_ms.is_none_or(|u| ms <= u)
}

/// Which records of a windowed read are in the window. A dropped range has no write time of its
/// own: it is shown where the bytes before it in its stream were in the window (at a stream's
/// start, when the window has no start).
#[derive(Debug, Default)]
pub struct Window {
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    /// Per stream, whether its last data record was in the window.
    last: Vec<(String, bool)>,
}

impl Window {
    pub fn new(since_ms: Option<u64>, until_ms: Option<u64>) -> Self {
        Self {
            since_ms,
            until_ms,
            last: Vec::new(),
        }
    }

    /// Whether `record` is in the window.
    pub fn admits(&mut self, record: &Record) -> bool {
        match record {
            Record::Data {
                stream, written_ms, ..
            } => {
                let inside = in_window(self.since_ms, self.until_ms, *written_ms);
                match self.last.iter_mut().find(|(s, _)| s == stream) {
                    Some((_, last)) => *last = inside,
                    None => self.last.push((stream.clone(), inside)),
                }
                inside
            }
            Record::Dropped { stream, .. } => self
                .last
                .iter()
                .find(|(s, _)| s == stream)
                .map_or(self.since_ms.is_none(), |(_, last)| *last),
        }
    }
}

/// `[container/stream] ` for stream `name`: `app.stdout` is `[app/stdout]`, a Knative
/// `user-container.{uid}.stdout` is `[user-container.{uid}/stdout]`, and `stdout` is
/// `[{default}/stdout]`. Generations (`app.stdout.1`) keep their base name.
fn prefix_of(name: &str, default: &str) -> String {
    let base = match name.rsplit_once('.') {
        Some((base, n)) if n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty() => base,
        _ => name,
    };
    match base.rsplit_once('.') {
        Some((container, stream)) => format!("[{container}/{stream}] "),
        None => format!("[{default}/{base}] "),
    }
}

/// RFC 3339 with nanoseconds, as `kubectl logs --timestamps` prints them.
fn timestamp(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    format!("{} ", humantime::format_rfc3339_nanos(t))
}

/// A stream's bytes after its last newline, and when the first of them was written.
#[derive(Debug, Default)]
struct Held {
    name: String,
    bytes: BytesMut,
    written_ms: u64,
    /// When the held bytes began to be held: a follower lets them out after [`HOLD`], however
    /// busy the other streams are.
    since: Option<tokio::time::Instant>,
}

/// The rendering state: what each stream holds back, and where the output stands.
struct Render<'a> {
    opts: &'a Lines,
    held: Vec<Held>,
    /// The stream whose line the output is in the middle of (its held part was let out).
    open: Option<String>,
    /// Complete output lines kept for `tail`, when the read is not followed.
    kept: Option<VecDeque<Bytes>>,
    out: BytesMut,
    sent: u64,
    /// The last time formatted for `timestamps`, and its text.
    stamp: Option<(u64, String)>,
    /// The last stream's prefix, and its text.
    label: Option<(String, String)>,
}

impl<'a> Render<'a> {
    fn new(opts: &'a Lines, keep_tail: bool) -> Self {
        let kept = match (keep_tail, opts.tail) {
            (true, Some(_)) => Some(VecDeque::new()),
            _ => None,
        };
        Self {
            opts,
            held: Vec::new(),
            open: None,
            kept,
            out: BytesMut::new(),
            sent: 0,
            stamp: None,
            label: None,
        }
    }

    fn held(&mut self, name: &str) -> &mut Held {
        let i = match self.held.iter().position(|h| h.name == name) {
            Some(i) => i,
            None => {
                self.held.push(Held {
                    name: name.to_owned(),
                    ..Held::default()
                });
                self.held.len() - 1
            }
        };
        &mut self.held[i]
    }

    /// Writes what starts a line of `name` into `into`: its time and its prefix, as asked.
    fn label_into(&mut self, name: &str, written_ms: u64, into: &mut BytesMut) {
        if self.opts.timestamps {
            // The lines of a part share its time: formatted once per part, not per line.
            if self.stamp.as_ref().is_none_or(|(ms, _)| *ms != written_ms) {
                self.stamp = Some((written_ms, timestamp(written_ms)));
            }
            if let Some((_, stamp)) = &self.stamp {
                into.put_slice(stamp.as_bytes());
            }
        }
        if self.opts.prefix {
            if self.label.as_ref().is_none_or(|(n, _)| n != name) {
                let label = prefix_of(name, &self.opts.default_container);
                self.label = Some((name.to_owned(), label));
            }
            if let Some((_, label)) = &self.label {
                into.put_slice(label.as_bytes());
            }
        }
    }

    /// Starts an output line of stream `name`: ends another stream's open line first, and
    /// continues `name`'s own open line as it is.
    fn start(&mut self, name: &str, written_ms: u64) {
        if self.open.as_deref().is_some_and(|o| o != name) {
            self.out.put_u8(b'\n');
            self.open = None;
        }
        if self.open.is_none() {
            let mut out = std::mem::take(&mut self.out);
            self.label_into(name, written_ms, &mut out);
            self.out = out;
        }
    }

    /// One complete line of `name` (ending with its newline).
    fn line(&mut self, name: &str, written_ms: u64, text: &[u8]) {
        if self.kept.is_none() {
            self.start(name, written_ms);
            self.out.put_slice(text);
            self.open = None;
            return;
        }
        let mut line = BytesMut::new();
        self.label_into(name, written_ms, &mut line);
        line.put_slice(text);
        if let Some(kept) = &mut self.kept {
            kept.push_back(line.freeze());
            let tail = self.opts.tail.unwrap_or(u64::MAX);
            while kept.len() as u64 > tail {
                kept.pop_front();
            }
        }
    }

    /// Adds a data record's bytes: complete lines go out, the rest is held.
    fn data(&mut self, name: &str, written_ms: u64, mut data: &[u8]) {
        // Lines with nothing before them and not kept for `tail`: all of them go out as one slice
        // (a whole-stream read costs a copy per record, not per line).
        if self.kept.is_none()
            && !self.opts.timestamps
            && !self.opts.prefix
            && let Some(last) = memchr::memrchr(b'\n', data)
        {
            self.start(name, written_ms);
            self.open = None;
            let held = std::mem::take(&mut self.held(name).bytes);
            self.out.put_slice(&held);
            self.out.put_slice(&data[..=last]);
            // No newline is left: the rest is held below.
            data = &data[last + 1..];
        }
        while let Some(nl) = memchr::memchr(b'\n', data) {
            let held = self.held(name);
            if held.bytes.is_empty() {
                self.line(name, written_ms, &data[..=nl]);
            } else {
                let first_ms = held.written_ms;
                let mut text = std::mem::take(&mut held.bytes);
                text.put_slice(&data[..=nl]);
                self.line(name, first_ms, &text);
            }
            data = &data[nl + 1..];
        }
        if !data.is_empty() {
            let held = self.held(name);
            if held.bytes.is_empty() {
                held.written_ms = written_ms;
                held.since = Some(tokio::time::Instant::now());
            }
            held.bytes.put_slice(data);
        }
    }

    /// Lets out what `name` holds, as the start (or more) of an output line left open.
    fn release(&mut self, name: &str) {
        let held = self.held(name);
        if held.bytes.is_empty() {
            return;
        }
        let (bytes, ms) = (std::mem::take(&mut held.bytes), held.written_ms);
        // A partial line kept for `tail` counts as a line of its own.
        if self.kept.is_some() {
            self.line(name, ms, &bytes);
            return;
        }
        self.start(name, ms);
        self.out.put_slice(&bytes);
        self.open = Some(name.to_owned());
    }

    /// Lets out what has been held for [`HOLD`] or longer.
    fn release_stale(&mut self) {
        let now = tokio::time::Instant::now();
        let stale: Vec<String> = self
            .held
            .iter()
            .filter(|h| !h.bytes.is_empty() && h.since.is_some_and(|t| now - t >= HOLD))
            .map(|h| h.name.clone())
            .collect();
        for name in stale {
            self.release(&name);
        }
    }

    fn release_all(&mut self) {
        let names: Vec<String> = self.held.iter().map(|h| h.name.clone()).collect();
        for name in names {
            self.release(&name);
        }
    }

    /// A dropped range of `name`: what it held goes out first, then the marker on a line.
    fn dropped(&mut self, name: &str, len: u64, reason: DropReason) {
        self.release(name);
        if !self.opts.markers {
            return;
        }
        let ms = self.held(name).written_ms;
        let text = format!("[relay: {len} bytes dropped: {reason}]\n");
        if self.open.is_some() {
            self.out.put_u8(b'\n');
            self.open = None;
        }
        self.line(name, ms, text.as_bytes());
    }

    /// The lines kept for `tail` go out.
    fn flush_kept(&mut self) {
        if let Some(kept) = self.kept.take() {
            for line in kept {
                self.out.put_slice(&line);
            }
        }
    }

    /// What is ready to send, cut at the byte limit; `None` once the limit is reached.
    fn take(&mut self) -> Option<Bytes> {
        let mut chunk = self.out.split().freeze();
        if let Some(limit) = self.opts.limit_bytes {
            let room = limit.saturating_sub(self.sent);
            if room == 0 {
                return None;
            }
            if chunk.len() as u64 > room {
                chunk.truncate(room as usize);
            }
        }
        self.sent += chunk.len() as u64;
        Some(chunk)
    }

    fn at_limit(&self) -> bool {
        self.opts.limit_bytes.is_some_and(|l| self.sent >= l)
    }
}

/// Renders `records` as plain text. `following`: partial lines are let out after [`HOLD`] of
/// quiet, and `tail` applies to the streams' starting points only (see the routes).
pub fn render<S>(
    records: S,
    opts: Lines,
    following: bool,
) -> impl Stream<Item = Result<Bytes, StoreError>> + Send
where
    S: Stream<Item = Result<Record, StoreError>> + Send + 'static,
{
    async_stream::try_stream! {
        pin_mut!(records);
        let mut r = Render::new(&opts, !following);
        let mut window = Window::new(opts.since_ms, opts.until_ms);
        loop {
            let next = if following {
                match tokio::time::timeout(HOLD, records.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        r.release_all();
                        if let Some(chunk) = r.take()
                            && !chunk.is_empty()
                        {
                            yield chunk;
                        }
                        if r.at_limit() {
                            break;
                        }
                        continue;
                    }
                }
            } else {
                records.next().await
            };
            let Some(record) = next else { break };
            let record = record?;
            if window.admits(&record) {
                match record {
                    Record::Data { stream, written_ms, data, .. } => {
                        r.data(&stream, written_ms, &data);
                    }
                    Record::Dropped {
                        stream,
                        span,
                        reason,
                        ..
                    } => r.dropped(&stream, span.len(), reason),
                }
            }
            if following {
                r.release_stale();
            }
            match r.take() {
                Some(chunk) if !chunk.is_empty() => yield chunk,
                Some(_) => {}
                None => break,
            }
            if r.at_limit() {
                break;
            }
        }
        r.release_all();
        r.flush_kept();
        if let Some(chunk) = r.take()
            && !chunk.is_empty()
        {
            yield chunk;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use futures::TryStreamExt;

    use super::*;
    use crate::{range::Span, store::Source};

    fn data(stream: &str, written_ms: u64, text: &str) -> Result<Record, StoreError> {
        Ok(Record::Data {
            stream: stream.to_owned(),
            source: Source::Entrypoint,
            offset: 0,
            received_ms: written_ms,
            written_ms,
            data: Bytes::copy_from_slice(text.as_bytes()),
        })
    }

    fn dropped(stream: &str, len: u64) -> Result<Record, StoreError> {
        dropped_for(stream, len, DropReason::BufferFull)
    }

    fn dropped_for(stream: &str, len: u64, reason: DropReason) -> Result<Record, StoreError> {
        Ok(Record::Dropped {
            stream: stream.to_owned(),
            source: Source::Entrypoint,
            span: Span::new(0, len),
            reason,
        })
    }

    async fn text(records: Vec<Result<Record, StoreError>>, opts: Lines) -> String {
        let out: Vec<Bytes> = render(futures::stream::iter(records), opts, false)
            .try_collect()
            .await
            .unwrap();
        String::from_utf8(out.concat()).unwrap()
    }

    fn opts() -> Lines {
        Lines {
            markers: true,
            default_container: "build".to_owned(),
            ..Lines::default()
        }
    }

    #[tokio::test]
    async fn two_streams_are_never_spliced_inside_a_line() {
        let recs = vec![
            data("stdout", 1, "out one, "),
            data("stderr", 2, "err one\nerr tw"),
            data("stdout", 3, "still one\n"),
            data("stderr", 4, "o\n"),
        ];
        assert_eq!(
            text(recs, opts()).await,
            "err one\nout one, still one\nerr two\n"
        );
    }

    #[tokio::test]
    async fn a_partial_last_line_goes_out_at_the_end_on_a_line_of_its_own() {
        let recs = vec![
            data("stdout", 1, "no newline"),
            data("stderr", 2, "neither"),
        ];
        assert_eq!(text(recs, opts()).await, "no newline\nneither");
    }

    #[tokio::test]
    async fn timestamps_and_prefixes_start_every_line_with_the_first_bytes_time() {
        let recs = vec![
            data("app.stdout", 1_000, "a"),
            data("app.stdout", 2_000, "b\nc\n"),
            data("stdout", 3_000, "d\n"),
            data("user-container.1234.stderr.2", 4_000, "e\n"),
        ];
        let o = Lines {
            timestamps: true,
            prefix: true,
            ..opts()
        };
        assert_eq!(
            text(recs, o).await,
            "1970-01-01T00:00:01.000000000Z [app/stdout] ab\n\
             1970-01-01T00:00:02.000000000Z [app/stdout] c\n\
             1970-01-01T00:00:03.000000000Z [build/stdout] d\n\
             1970-01-01T00:00:04.000000000Z [user-container.1234/stderr] e\n"
        );
    }

    #[tokio::test]
    async fn a_dropped_range_is_a_line_of_its_own_unless_switched_off() {
        let recs = || {
            vec![
                data("stdout", 1, "a\nhalf"),
                dropped("stdout", 42),
                data("stdout", 2, "b\n"),
            ]
        };
        assert_eq!(
            text(recs(), opts()).await,
            "a\nhalf\n[relay: 42 bytes dropped: buffer-full]\nb\n"
        );
        let quiet = Lines {
            markers: false,
            ..opts()
        };
        assert_eq!(text(recs(), quiet).await, "a\nhalfb\n");
    }

    #[tokio::test]
    async fn neighbouring_gaps_of_different_reasons_are_a_line_each() {
        let recs = vec![
            data("stdout", 1, "a\n"),
            dropped_for("stdout", 3, DropReason::KernelLost),
            dropped_for("stdout", 4, DropReason::WriterDied),
            dropped_for("stdout", 5, DropReason::Unspecified),
        ];
        assert_eq!(
            text(recs, opts()).await,
            "a\n[relay: 3 bytes dropped: kernel-lost]\n[relay: 4 bytes dropped: writer-died]\n\
             [relay: 5 bytes dropped: unspecified]\n"
        );
    }

    #[tokio::test]
    async fn the_window_tail_and_limit_cut_the_output() {
        let recs = || {
            (0..10)
                .map(|i| data("stdout", i * 1_000, &format!("line {i}\n")))
                .collect::<Vec<_>>()
        };
        let window = Lines {
            since_ms: Some(3_000),
            until_ms: Some(5_000),
            ..opts()
        };
        assert_eq!(text(recs(), window).await, "line 3\nline 4\nline 5\n");
        // A gap shows where the bytes before it are in the window.
        let gaps = vec![
            data("stdout", 1_000, "a\n"),
            dropped("stdout", 5),
            data("stdout", 5_000, "b\n"),
            dropped("stdout", 7),
        ];
        let late = Lines {
            since_ms: Some(4_000),
            ..opts()
        };
        assert_eq!(
            text(gaps, late).await,
            "b\n[relay: 7 bytes dropped: buffer-full]\n"
        );
        let tail = Lines {
            tail: Some(2),
            ..opts()
        };
        assert_eq!(text(recs(), tail).await, "line 8\nline 9\n");
        let limited = Lines {
            limit_bytes: Some(10),
            ..opts()
        };
        assert_eq!(text(recs(), limited).await, "line 0\nlin");
        let none = Lines {
            tail: Some(0),
            ..opts()
        };
        assert_eq!(text(recs(), none).await, "");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_line_goes_out_after_the_hold_while_another_stream_is_busy() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let out = render(rx, opts(), true);
        pin_mut!(out);
        tx.unbounded_send(data("stdout", 1, "prompt> ")).unwrap();
        let mut got = Vec::new();
        // stderr writes a line every 100 ms: never a second of quiet.
        for i in 0..15 {
            tokio::time::sleep(HOLD / 10).await;
            tx.unbounded_send(data("stderr", 2 + i, "busy\n")).unwrap();
            got.extend_from_slice(&out.next().await.unwrap().unwrap());
            if String::from_utf8_lossy(&got).contains("prompt> ") {
                break;
            }
        }
        // Let out after the hold, at the start of a line.
        let text = String::from_utf8(got.clone()).unwrap();
        assert!(text.ends_with("busy\nprompt> "), "{text:?}");
        assert!(text.matches("busy").count() >= 9, "{text:?}");
        // The next line of stderr does not join it.
        tx.unbounded_send(data("stderr", 20, "busy\n")).unwrap();
        got.extend_from_slice(&out.next().await.unwrap().unwrap());
        let text = String::from_utf8(got).unwrap();
        assert!(text.ends_with("busy\nprompt> \nbusy\n"), "{text:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_gets_a_held_line_after_the_hold() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let out = render(rx, opts(), true);
        pin_mut!(out);
        tx.unbounded_send(data("stdout", 1, "prompt> ")).unwrap();
        let first = tokio::time::timeout(HOLD * 2, out.next()).await.unwrap();
        assert_eq!(first.unwrap().unwrap(), Bytes::from_static(b"prompt> "));
        tx.unbounded_send(data("stdout", 2, "typed\n")).unwrap();
        let second = out.next().await.unwrap().unwrap();
        assert_eq!(second, Bytes::from_static(b"typed\n"));
    }
}
