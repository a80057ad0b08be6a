//! The capture report (`GET .../logs/capture-report`) as text, and the streams it lists.
//!
//! The API answers JSON only; the table is the one `metadata-api capture-report` prints. Only the
//! fields shown are read, so fields the API adds later do not break the plugin.

use serde::{Deserialize, Serialize};

/// The capture report of one context (the fields the plugin shows).
#[derive(Debug, Deserialize)]
pub struct Report {
    pub context: String,
    pub agree: bool,
    pub streams: Vec<StreamReport>,
}

#[derive(Debug, Deserialize)]
pub struct StreamReport {
    pub name: String,
    pub comparison: String,
    #[serde(default)]
    pub divergence: Option<Divergence>,
    pub entrypoint: Option<PathReport>,
    pub ebpf: Option<PathReport>,
}

#[derive(Debug, Deserialize)]
pub struct PathReport {
    pub bytes_stored: u64,
    pub dropped_bytes: u64,
    pub pending_bytes: u64,
    pub complete: bool,
    pub final_length: Option<u64>,
    pub end: u64,
    pub sha256: String,
}

#[derive(Debug, Deserialize)]
pub struct Divergence {
    pub offset: u64,
    pub entrypoint: Side,
    pub ebpf: Side,
}

#[derive(Debug, Deserialize)]
pub struct Side {
    pub kind: String,
    pub excerpt: String,
}

/// One stream on one capture path, as `kubectl relay streams` lists it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct StreamRow {
    pub name: String,
    pub source: &'static str,
    /// The final length once declared, else the highest offset stored or dropped.
    pub length: u64,
    pub stored_bytes: u64,
    pub dropped_bytes: u64,
    pub pending_bytes: u64,
    pub complete: bool,
}

impl Report {
    fn paths(&self) -> impl Iterator<Item = (&StreamReport, &'static str, Option<&PathReport>)> {
        self.streams.iter().flat_map(|s| {
            [
                (s, "entrypoint", s.entrypoint.as_ref()),
                (s, "ebpf", s.ebpf.as_ref()),
            ]
        })
    }

    /// Every stream of the context on every path that has it.
    pub fn stream_rows(&self) -> Vec<StreamRow> {
        self.paths()
            .filter_map(|(s, source, p)| {
                p.map(|p| StreamRow {
                    name: s.name.clone(),
                    source,
                    length: p.final_length.unwrap_or(p.end),
                    stored_bytes: p.bytes_stored,
                    dropped_bytes: p.dropped_bytes,
                    pending_bytes: p.pending_bytes,
                    complete: p.complete,
                })
            })
            .collect()
    }

    /// The report as an aligned table, one row per stream and path, and under a stream whose
    /// paths diverge, where.
    pub fn table(&self) -> String {
        let header = [
            "STREAM", "SOURCE", "STORED", "DROPPED", "PENDING", "FINAL", "COMPLETE", "SHA256",
            "RESULT",
        ];
        let mut rows: Vec<Vec<String>> = Vec::new();
        let mut notes: Vec<Option<String>> = Vec::new();
        for s in &self.streams {
            for (source, p) in [("entrypoint", &s.entrypoint), ("ebpf", &s.ebpf)] {
                rows.push(match p {
                    Some(p) => vec![
                        s.name.clone(),
                        source.to_owned(),
                        p.bytes_stored.to_string(),
                        p.dropped_bytes.to_string(),
                        p.pending_bytes.to_string(),
                        p.final_length.map_or("-".to_owned(), |n| n.to_string()),
                        if p.complete { "yes" } else { "no" }.to_owned(),
                        p.sha256.get(..12).unwrap_or_default().to_owned(),
                        s.comparison.clone(),
                    ],
                    None => {
                        let mut row = vec![s.name.clone(), source.to_owned()];
                        row.extend(["-", "-", "-", "-", "-", "(absent)"].map(str::to_owned));
                        row.push(s.comparison.clone());
                        row
                    }
                });
                notes.push(None);
            }
            if let (Some(d), Some(last)) = (&s.divergence, notes.last_mut()) {
                *last = Some(format!(
                    "  diverges at offset {}: entrypoint {} \"{}\" | ebpf {} \"{}\"",
                    d.offset, d.entrypoint.kind, d.entrypoint.excerpt, d.ebpf.kind, d.ebpf.excerpt
                ));
            }
        }
        let mut out = format!("context {}\n", self.context);
        let header: Vec<String> = header.map(str::to_owned).to_vec();
        let all: Vec<&Vec<String>> = std::iter::once(&header).chain(&rows).collect();
        let widths = widths(&all);
        out.push_str(&row_line(&header, &widths));
        for (row, note) in rows.iter().zip(&notes) {
            out.push_str(&row_line(row, &widths));
            if let Some(note) = note {
                out.push_str(note);
                out.push('\n');
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

/// The streams as an aligned table.
pub fn streams_table(rows: &[StreamRow]) -> String {
    let header: Vec<String> = [
        "STREAM", "SOURCE", "LENGTH", "STORED", "DROPPED", "PENDING", "COMPLETE",
    ]
    .map(str::to_owned)
    .to_vec();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.source.to_owned(),
                r.length.to_string(),
                r.stored_bytes.to_string(),
                r.dropped_bytes.to_string(),
                r.pending_bytes.to_string(),
                if r.complete { "yes" } else { "no" }.to_owned(),
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

    const REPORT: &str = r#"{"context": "workflows/w1/runs/r1/steps/s1", "agree": false, "streams": [
      {"name": "app.stdout", "base": "app.stdout", "generation": 0, "comparison": "differ", "agree": false,
       "reasons": [], "divergence": {"offset": 9, "entrypoint": {"kind": "data", "excerpt": "line two\\n"},
                                     "ebpf": {"kind": "dropped", "excerpt": ""}},
       "entrypoint": {"id": "a", "bytes_stored": 29, "dropped": [], "dropped_bytes": 0, "pending": [],
                      "pending_bytes": 0, "complete": true, "final_length": 29, "end": 29,
                      "first_received_ms": 1, "last_received_ms": 2, "sha256": "5891b5b522d5aaaa", "sha256_covers": "all_bytes"},
       "ebpf": {"id": "b", "bytes_stored": 20, "dropped": [{"start": 9, "end": 18}], "dropped_bytes": 9, "pending": [],
                "pending_bytes": 0, "complete": false, "final_length": null, "end": 29,
                "first_received_ms": 1, "last_received_ms": 2, "sha256": "2d711642b726bbbb", "sha256_covers": "stored_bytes_only"}},
      {"name": "side.stderr", "base": "side.stderr", "generation": 0, "comparison": "ebpf_only", "agree": false,
       "reasons": [], "divergence": null, "entrypoint": null,
       "ebpf": {"id": "c", "bytes_stored": 1, "dropped": [], "dropped_bytes": 0, "pending": [], "pending_bytes": 0,
                "complete": true, "final_length": 1, "end": 1, "first_received_ms": 1, "last_received_ms": 1,
                "sha256": "ffffffffffffffff", "sha256_covers": "all_bytes"}}]}"#;

    #[test]
    fn the_table_is_the_one_metadata_api_prints() {
        let r: Report = serde_json::from_str(REPORT).unwrap();
        assert_eq!(
            r.table(),
            "context workflows/w1/runs/r1/steps/s1
STREAM       SOURCE      STORED  DROPPED  PENDING  FINAL  COMPLETE  SHA256        RESULT
app.stdout   entrypoint  29      0        0        29     yes       5891b5b522d5  differ
app.stdout   ebpf        20      9        0        -      no        2d711642b726  differ
  diverges at offset 9: entrypoint data \"line two\\n\" | ebpf dropped \"\"
side.stderr  entrypoint  -       -        -        -      -         (absent)      ebpf_only
side.stderr  ebpf        1       0        0        1      yes       ffffffffffff  ebpf_only
capture paths do not agree
"
        );
    }

    #[test]
    fn streams_are_listed_per_path() {
        let r: Report = serde_json::from_str(REPORT).unwrap();
        let rows = r.stream_rows();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            streams_table(&rows),
            "STREAM       SOURCE      LENGTH  STORED  DROPPED  PENDING  COMPLETE
app.stdout   entrypoint  29      29      0        0        yes
app.stdout   ebpf        29      20      9        0        no
side.stderr  ebpf        1       1       0        0        yes
"
        );
    }
}
