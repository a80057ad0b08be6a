//! The capture report: a context's streams as each capture path (the entrypoint, the collector)
//! stored them, side by side, as the metadata API answers it (`GET .../logs/capture-report`) and
//! as `metadata-api capture-report` and `kubectl relay report` print it ([`Report::table`]).
//!
//! The server builds it (metadata-api's `report.rs`: reading both paths, hashing, finding the
//! first divergence); these are its JSON body and its text. None of the types refuses unknown
//! fields, so a client reads the report of a server that added some.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    range::Span,
    reason::{DropReason, DroppedSpan},
    source::Source,
};

/// Bytes of each side shown where the paths diverge.
pub const EXCERPT: usize = 32;

/// The capture report of one context.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub context: String,
    /// Every stream is on both paths and they agree.
    pub agree: bool,
    /// Sorted by base name, then generation.
    pub streams: Vec<StreamReport>,
}

/// How the two paths compare for one stream name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    /// Same final length, nothing dropped on either, equal hashes.
    Agree,
    /// Both complete (or fixed), but they differ.
    Differ,
    /// At least one path has not declared its final length or still has pending ranges.
    Incomplete,
    /// Only the entrypoint stored this stream.
    EntrypointOnly,
    /// Only the collector stored this stream (e.g. a sidecar without the entrypoint).
    EbpfOnly,
}

impl Comparison {
    /// The snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agree => "agree",
            Self::Differ => "differ",
            Self::Incomplete => "incomplete",
            Self::EntrypointOnly => "entrypoint_only",
            Self::EbpfOnly => "ebpf_only",
        }
    }
}

/// One stream name (one generation of a container's stdout or stderr) on both paths.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamReport {
    /// The stored name, e.g. `app.stdout.1`.
    pub name: String,
    /// The name without its generation suffix, e.g. `app.stdout`.
    pub base: String,
    /// 0 for the first run, N for `name.N`.
    pub generation: u32,
    pub comparison: Comparison,
    /// `comparison` is `agree`.
    pub agree: bool,
    /// Why they do not agree, one short sentence each.
    pub reasons: Vec<String>,
    /// The first offset where the paths differ, when both exist and they do.
    pub divergence: Option<Divergence>,
    pub entrypoint: Option<PathReport>,
    pub ebpf: Option<PathReport>,
}

/// What one path stored of a stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathReport {
    pub id: String,
    pub bytes_stored: u64,
    /// Each with its reason.
    pub dropped: Vec<DroppedSpan>,
    pub dropped_bytes: u64,
    /// `dropped_bytes` by reason.
    #[serde(default)]
    pub dropped_by_reason: BTreeMap<DropReason, u64>,
    /// Ranges neither stored nor dropped yet, up to the final length (or the highest offset).
    pub pending: Vec<Span>,
    pub pending_bytes: u64,
    pub complete: bool,
    pub final_length: Option<u64>,
    /// Set when the stream was settled after its writer died: the first offset it never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_died_at: Option<u64>,
    /// Highest offset stored or dropped.
    pub end: u64,
    pub first_received_ms: Option<u64>,
    pub last_received_ms: Option<u64>,
    /// Hex SHA-256 of the stored bytes in offset order.
    pub sha256: String,
    /// `all_bytes` when nothing is dropped or pending, else `stored_bytes_only`: the hash then
    /// skips the missing ranges.
    pub sha256_covers: HashCovers,
}

impl PathReport {
    /// The dropped bytes by reason, for a reader: `buffer-full 100, kernel-lost 20`.
    pub fn reason_breakdown(&self) -> String {
        reason_breakdown(&self.dropped_by_reason)
    }
}

/// Dropped bytes by reason, for a reader: `buffer-full 100, kernel-lost 20` (empty when none).
pub fn reason_breakdown(by_reason: &BTreeMap<DropReason, u64>) -> String {
    let each: Vec<String> = by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect();
    each.join(", ")
}

/// What a [`PathReport::sha256`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashCovers {
    AllBytes,
    StoredBytesOnly,
}

/// Where two paths first differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    pub offset: u64,
    pub entrypoint: Side,
    pub ebpf: Side,
}

/// One path at a divergence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    pub kind: SideKind,
    /// Up to [`EXCERPT`] bytes from the offset, escaped (`\n`, `\xff`); empty unless `data`.
    pub excerpt: String,
}

/// What a path holds at a divergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SideKind {
    Data,
    Dropped,
    Pending,
    /// The path's stream ends before this offset.
    End,
}

impl SideKind {
    /// The snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Dropped => "dropped",
            Self::Pending => "pending",
            Self::End => "end",
        }
    }
}

/// Splits `name.N` into (`name`, N); other names are generation 0.
pub fn split_generation(name: &str) -> (&str, u32) {
    if let Some((base, n)) = name.rsplit_once('.')
        && !base.is_empty()
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
        && let Ok(g) = n.parse()
    {
        return (base, g);
    }
    (name, 0)
}

impl Report {
    /// The report as an aligned text table: one row per stream and path, and under each stream
    /// that does not agree, why and where the paths first diverge.
    pub fn table(&self) -> String {
        let header = [
            "STREAM", "SOURCE", "STORED", "DROPPED", "PENDING", "FINAL", "COMPLETE", "SHA256",
            "RESULT",
        ];
        let mut rows: Vec<(Vec<String>, Vec<String>)> = Vec::new();
        for s in &self.streams {
            let mut lines = Vec::new();
            for (src, p) in [(Source::Entrypoint, &s.entrypoint), (Source::Ebpf, &s.ebpf)] {
                let cells = match p {
                    Some(p) => vec![
                        s.name.clone(),
                        src.to_string(),
                        p.bytes_stored.to_string(),
                        p.dropped_bytes.to_string(),
                        p.pending_bytes.to_string(),
                        p.final_length.map_or("-".to_owned(), |n| n.to_string()),
                        if p.complete { "yes" } else { "no" }.to_owned(),
                        p.sha256.get(..12).unwrap_or_default().to_owned(),
                        s.comparison.as_str().to_owned(),
                    ],
                    None => vec![
                        s.name.clone(),
                        src.to_string(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        "(absent)".into(),
                        s.comparison.as_str().to_owned(),
                    ],
                };
                lines.push(cells);
            }
            let mut notes = Vec::new();
            for (src, p) in [(Source::Entrypoint, &s.entrypoint), (Source::Ebpf, &s.ebpf)] {
                if let Some(p) = p.as_ref().filter(|p| p.dropped_bytes > 0) {
                    notes.push(format!(
                        "  {src} dropped {} bytes: {}",
                        p.dropped_bytes,
                        p.reason_breakdown()
                    ));
                }
            }
            if let Some(d) = &s.divergence {
                notes.push(format!(
                    "  diverges at offset {}: entrypoint {} \"{}\" | ebpf {} \"{}\"",
                    d.offset,
                    d.entrypoint.kind.as_str(),
                    d.entrypoint.excerpt,
                    d.ebpf.kind.as_str(),
                    d.ebpf.excerpt
                ));
            }
            for (line, note) in lines.into_iter().zip([notes, Vec::new()]) {
                rows.push((line, note));
            }
        }
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for (cells, _) in &rows {
            for (w, c) in widths.iter_mut().zip(cells) {
                *w = (*w).max(c.len());
            }
        }
        let fmt_row = |cells: &[String]| {
            let line: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            line.join("  ").trim_end().to_owned()
        };
        let mut out = format!("context {}\n", self.context);
        out.push_str(&fmt_row(&header.map(str::to_owned)));
        out.push('\n');
        // Notes follow the stream's last row.
        let mut pending_notes: Vec<String> = Vec::new();
        for (i, (cells, notes)) in rows.iter().enumerate() {
            out.push_str(&fmt_row(cells));
            out.push('\n');
            pending_notes.extend(notes.iter().cloned());
            let last_of_stream = rows.get(i + 1).is_none_or(|(n, _)| n[0] != cells[0]);
            if last_of_stream {
                for n in pending_notes.drain(..) {
                    out.push_str(&n);
                    out.push('\n');
                }
            }
        }
        out.push_str(if self.agree {
            "capture paths agree\n"
        } else {
            "capture paths do not agree\n"
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_split_off_numeric_suffixes() {
        assert_eq!(split_generation("stdout"), ("stdout", 0));
        assert_eq!(split_generation("stdout.2"), ("stdout", 2));
        assert_eq!(split_generation("app.stderr.10"), ("app.stderr", 10));
        assert_eq!(
            split_generation("user-container.1a2b3c4d.stdout"),
            ("user-container.1a2b3c4d.stdout", 0)
        );
        assert_eq!(split_generation(".5"), (".5", 0));
        assert_eq!(split_generation("a."), ("a.", 0));
    }

    fn path(stored: u64, by_reason: &[(DropReason, u64)], complete: bool) -> PathReport {
        let dropped_by_reason: BTreeMap<DropReason, u64> = by_reason.iter().copied().collect();
        PathReport {
            id: "id".into(),
            bytes_stored: stored,
            dropped: Vec::new(),
            dropped_bytes: dropped_by_reason.values().sum(),
            dropped_by_reason,
            pending: Vec::new(),
            pending_bytes: 0,
            complete,
            final_length: complete.then_some(stored),
            writer_died_at: None,
            end: stored,
            first_received_ms: None,
            last_received_ms: None,
            sha256: "0123456789abcdef".into(),
            sha256_covers: HashCovers::AllBytes,
        }
    }

    #[test]
    fn the_table_shows_each_path_then_why_and_where_they_differ() {
        let report = Report {
            context: "workflows/w1/runs/r1/steps/s1".into(),
            agree: false,
            streams: vec![StreamReport {
                name: "app.stdout.1".into(),
                base: "app.stdout".into(),
                generation: 1,
                comparison: Comparison::Incomplete,
                agree: false,
                reasons: Vec::new(),
                divergence: Some(Divergence {
                    offset: 4,
                    entrypoint: Side {
                        kind: SideKind::Data,
                        excerpt: "x\\n".into(),
                    },
                    ebpf: Side {
                        kind: SideKind::Dropped,
                        excerpt: String::new(),
                    },
                }),
                entrypoint: Some(path(10, &[], true)),
                ebpf: Some(path(
                    4,
                    &[(DropReason::KernelLost, 5), (DropReason::BufferFull, 1)],
                    false,
                )),
            }],
        };
        assert_eq!(
            report.table(),
            "context workflows/w1/runs/r1/steps/s1
STREAM        SOURCE      STORED  DROPPED  PENDING  FINAL  COMPLETE  SHA256        RESULT
app.stdout.1  entrypoint  10      0        0        10     yes       0123456789ab  incomplete
app.stdout.1  ebpf        4       6        0        -      no        0123456789ab  incomplete
  ebpf dropped 6 bytes: buffer-full 1, kernel-lost 5
  diverges at offset 4: entrypoint data \"x\\n\" | ebpf dropped \"\"
capture paths do not agree
"
        );
        let json = serde_json::to_string(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.table(), report.table());
    }
}
