//! The streams of a context as `kubectl relay streams` lists them, from the capture report
//! (`GET .../logs/capture-report`).
//!
//! The report itself and its table are `contract::report`: `kubectl relay report` prints what
//! `metadata-api capture-report` prints. Its types refuse no unknown field, so fields the API adds
//! later do not break the plugin.

use std::collections::BTreeMap;

use contract::{
    reason::DropReason,
    report::{PathReport, Report, reason_breakdown},
    source::Source,
};
use serde::Serialize;

/// One stream on one capture path, as `kubectl relay streams` lists it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct StreamRow {
    pub name: String,
    pub source: Source,
    /// The final length once declared, else the highest offset stored or dropped.
    pub length: u64,
    pub stored_bytes: u64,
    pub dropped_bytes: u64,
    /// `dropped_bytes` by reason.
    pub dropped_by_reason: BTreeMap<DropReason, u64>,
    pub pending_bytes: u64,
    pub complete: bool,
}

impl StreamRow {
    fn new(name: &str, source: Source, p: &PathReport) -> Self {
        Self {
            name: name.to_owned(),
            source,
            length: p.final_length.unwrap_or(p.end),
            stored_bytes: p.bytes_stored,
            dropped_bytes: p.dropped_bytes,
            dropped_by_reason: p.dropped_by_reason.clone(),
            pending_bytes: p.pending_bytes,
            complete: p.complete,
        }
    }
}

/// Every stream of the report's context on every path that has it.
pub fn stream_rows(report: &Report) -> Vec<StreamRow> {
    report
        .streams
        .iter()
        .flat_map(|s| {
            [
                (Source::Entrypoint, s.entrypoint.as_ref()),
                (Source::Ebpf, s.ebpf.as_ref()),
            ]
            .into_iter()
            .filter_map(|(source, p)| p.map(|p| StreamRow::new(&s.name, source, p)))
        })
        .collect()
}

/// The streams as an aligned table; the last column is the dropped bytes by reason, as the
/// report's table gives them (`buffer-full 100, kernel-lost 20`).
pub fn streams_table(rows: &[StreamRow]) -> String {
    let header: Vec<String> = [
        "STREAM",
        "SOURCE",
        "LENGTH",
        "STORED",
        "DROPPED",
        "PENDING",
        "COMPLETE",
        "DROPPED BY REASON",
    ]
    .map(str::to_owned)
    .to_vec();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.source.to_string(),
                r.length.to_string(),
                r.stored_bytes.to_string(),
                r.dropped_bytes.to_string(),
                r.pending_bytes.to_string(),
                if r.complete { "yes" } else { "no" }.to_owned(),
                reason_breakdown(&r.dropped_by_reason),
            ]
        })
        .collect();
    let all: Vec<&Vec<String>> = std::iter::once(&header).chain(&cells).collect();
    let widths = widths(&all);
    all.iter().map(|r| row_line(r, &widths)).collect()
}

fn widths(rows: &[&Vec<String>]) -> Vec<usize> {
    let mut w: Vec<usize> = Vec::new();
    for row in rows {
        for (i, c) in row.iter().enumerate() {
            if w.len() <= i {
                w.push(0);
            }
            w[i] = w[i].max(c.len());
        }
    }
    w
}

fn row_line(cells: &[String], widths: &[usize]) -> String {
    let line: Vec<String> = cells
        .iter()
        .zip(widths)
        .map(|(c, w)| format!("{c:<w$}"))
        .collect();
    let mut line = line.join("  ").trim_end().to_owned();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report as the API answers it, with a field it may add later at every level.
    const REPORT: &str = r#"{"context": "workflows/w1/runs/r1/steps/s1", "agree": false, "later": 1, "streams": [
      {"name": "app.stdout", "base": "app.stdout", "generation": 0, "comparison": "differ", "agree": false,
       "reasons": [], "later": [], "divergence": {"offset": 9, "later": {},
                                     "entrypoint": {"kind": "data", "excerpt": "line two\\n", "later": 0},
                                     "ebpf": {"kind": "dropped", "excerpt": ""}},
       "entrypoint": {"id": "a", "bytes_stored": 29, "dropped": [], "dropped_bytes": 0, "dropped_by_reason": {},
                      "pending": [], "pending_bytes": 0, "complete": true, "final_length": 29, "end": 29,
                      "first_received_ms": 1, "last_received_ms": 2, "sha256": "5891b5b522d5aaaa",
                      "sha256_covers": "all_bytes", "later": "x"},
       "ebpf": {"id": "b", "bytes_stored": 20,
                "dropped": [{"start": 9, "end": 16, "reason": "kernel-lost", "later": 1},
                            {"start": 16, "end": 18, "reason": "writer-died"}],
                "dropped_bytes": 9, "dropped_by_reason": {"kernel-lost": 7, "writer-died": 2},
                "pending": [], "pending_bytes": 0, "complete": false, "final_length": null, "end": 29,
                "first_received_ms": 1, "last_received_ms": 2, "sha256": "2d711642b726bbbb",
                "sha256_covers": "stored_bytes_only"}},
      {"name": "side.stderr", "base": "side.stderr", "generation": 0, "comparison": "ebpf_only", "agree": false,
       "reasons": [], "divergence": null, "entrypoint": null,
       "ebpf": {"id": "c", "bytes_stored": 1, "dropped": [], "dropped_bytes": 0, "pending": [], "pending_bytes": 0,
                "complete": true, "final_length": 1, "end": 1, "first_received_ms": 1, "last_received_ms": 1,
                "sha256": "ffffffffffffffff", "sha256_covers": "all_bytes"}}]}"#;

    #[test]
    fn fields_the_api_adds_later_are_ignored_and_the_table_is_the_contracts() {
        let r: Report = serde_json::from_str(REPORT).unwrap();
        assert_eq!(
            r.table(),
            "context workflows/w1/runs/r1/steps/s1
STREAM       SOURCE      STORED  DROPPED  PENDING  FINAL  COMPLETE  SHA256        RESULT
app.stdout   entrypoint  29      0        0        29     yes       5891b5b522d5  differ
app.stdout   ebpf        20      9        0        -      no        2d711642b726  differ
  ebpf dropped 9 bytes: kernel-lost 7, writer-died 2
  diverges at offset 9: entrypoint data \"line two\\n\" | ebpf dropped \"\"
side.stderr  entrypoint  -       -        -        -      -         (absent)      ebpf_only
side.stderr  ebpf        1       0        0        1      yes       ffffffffffff  ebpf_only
capture paths do not agree
"
        );
    }

    #[test]
    fn streams_are_listed_per_path_with_their_dropped_bytes_by_reason() {
        let r: Report = serde_json::from_str(REPORT).unwrap();
        let rows = stream_rows(&r);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            streams_table(&rows),
            "STREAM       SOURCE      LENGTH  STORED  DROPPED  PENDING  COMPLETE  DROPPED BY REASON
app.stdout   entrypoint  29      29      0        0        yes
app.stdout   ebpf        29      20      9        0        no        kernel-lost 7, writer-died 2
side.stderr  ebpf        1       1       0        0        yes
"
        );
        assert_eq!(
            serde_json::to_value(&rows[1]).unwrap(),
            serde_json::json!({"name": "app.stdout", "source": "ebpf", "length": 29,
                "stored_bytes": 20, "dropped_bytes": 9,
                "dropped_by_reason": {"kernel-lost": 7, "writer-died": 2},
                "pending_bytes": 0, "complete": false})
        );
    }
}
