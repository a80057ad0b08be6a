//! When a stream's bytes were written: the time index of a segment.
//!
//! A part's write time (its first byte's, as its writer said) is in its object's name, so a
//! listing yields it. A segment merges many parts into one object; its name keeps the time of its
//! first byte, and the times of the parts it merged go in a small object beside it,
//! `streams/{id}/times/{start:016x}-{end:016x}`, one line per part: `{offset in the segment}
//! {ms since the Unix epoch}`. A reader that wants a time (`since`, per-line timestamps) reads
//! one index per segment instead of the segment's bytes; a 4 MiB segment of 200-ms batches has
//! an index of a few KiB.

use bytes::Bytes;

use crate::range::Span;

/// The first line of an index object: its format, so a later one can be told apart.
const HEADER: &str = "relay-times 1";

/// Write times over a span of a stream: `(offset, ms)` pairs in offset order, each the time of
/// the bytes from its offset to the next pair's (consecutive pairs of the same time are one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeIndex {
    pub span: Span,
    pub entries: Vec<(u64, u64)>,
}

impl TimeIndex {
    /// The index of `span` from the write times of the runs of bytes it is made of (`(offset,
    /// ms)`, in offset order, the first at `span.start`).
    pub fn new(span: Span, runs: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut entries: Vec<(u64, u64)> = Vec::new();
        for (offset, ms) in runs {
            if offset < span.start || offset >= span.end {
                continue;
            }
            if entries.last().is_none_or(|&(_, last)| last != ms) {
                entries.push((offset, ms));
            }
        }
        Self { span, entries }
    }

    /// One time for all of `span`.
    pub fn single(span: Span, ms: u64) -> Self {
        Self {
            span,
            entries: vec![(span.start, ms)],
        }
    }

    /// The stored form (offsets relative to the span's start).
    pub fn encode(&self) -> Bytes {
        let mut s = String::with_capacity(16 + self.entries.len() * 24);
        s.push_str(HEADER);
        s.push('\n');
        for &(offset, ms) in &self.entries {
            s.push_str(&format!("{} {ms}\n", offset - self.span.start));
        }
        s.into()
    }

    /// Reads the stored index of `span`; `None` when it is not one (its format is newer, or it
    /// is damaged), so the caller falls back to the segment's own time.
    pub fn decode(span: Span, bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.lines();
        if lines.next()? != HEADER {
            return None;
        }
        let mut entries = Vec::new();
        for line in lines {
            let (offset, ms) = line.split_once(' ')?;
            let offset = span.start.checked_add(offset.parse().ok()?)?;
            let prev = entries.last().map_or(span.start, |&(o, _)| o + 1);
            if offset < prev || offset >= span.end {
                return None;
            }
            entries.push((offset, ms.parse().ok()?));
        }
        (entries.first().map(|e| e.0) == Some(span.start)).then_some(Self { span, entries })
    }

    /// The write time of the byte at `offset` (the span's first time before it).
    pub fn at(&self, offset: u64) -> u64 {
        let i = self.entries.partition_point(|&(o, _)| o <= offset);
        self.entries[i.saturating_sub(1)].1
    }

    /// The runs of `span` (inside this index's span) and their times: where a reader cuts its
    /// records.
    pub fn runs(&self, span: Span) -> Vec<(Span, u64)> {
        let mut out = Vec::new();
        let mut at = span.start;
        while at < span.end {
            let i = self.entries.partition_point(|&(o, _)| o <= at);
            let end = self.entries.get(i).map_or(span.end, |e| e.0.min(span.end));
            out.push((Span::new(at, end), self.at(at)));
            at = end;
        }
        out
    }

    /// The first offset whose bytes were written at or after `ms`, when any were.
    pub fn first_written_since(&self, ms: u64) -> Option<u64> {
        self.entries.iter().find(|&&(_, t)| t >= ms).map(|e| e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_reads_back_what_was_stored() {
        let span = Span::new(4096, 8192);
        let index = TimeIndex::new(span, [(4096, 10), (4100, 10), (5000, 12), (6000, 11)]);
        assert_eq!(index.entries, vec![(4096, 10), (5000, 12), (6000, 11)]);
        assert_eq!(
            TimeIndex::decode(span, &index.encode()),
            Some(index.clone())
        );
        assert_eq!(index.at(4096), 10);
        assert_eq!(index.at(4999), 10);
        assert_eq!(index.at(5000), 12);
        assert_eq!(index.at(8191), 11);
        assert_eq!(
            index.runs(Span::new(4500, 6500)),
            vec![
                (Span::new(4500, 5000), 10),
                (Span::new(5000, 6000), 12),
                (Span::new(6000, 6500), 11)
            ]
        );
        assert_eq!(index.first_written_since(11), Some(5000));
        assert_eq!(index.first_written_since(13), None);
    }

    #[test]
    fn a_damaged_or_newer_index_is_not_read() {
        let span = Span::new(0, 100);
        for bad in [
            "relay-times 2\n0 1\n",
            "relay-times 1\n5 1\n",
            "relay-times 1\n0 1\n0 2\n",
            "relay-times 1\n0 1\n100 2\n",
            "relay-times 1\n0 x\n",
            "relay-times 1\n",
            "",
        ] {
            assert_eq!(TimeIndex::decode(span, bad.as_bytes()), None, "{bad:?}");
        }
    }
}
