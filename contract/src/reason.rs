//! Why a range of a stream was dropped: the reason a `dropped` marker carries, from the writer
//! that lost the bytes to every reader (status, capture report, NDJSON and plain-text reads).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::range::Span;

/// Why bytes a container wrote were not stored. Short kebab-case codes on the wire, in object
/// keys and in the text readers see; adding one is a change to the API (an older server refuses a
/// marker with a code it does not know).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum DropReason {
    /// The writer gave no reason: a writer older than reasons, or a marker stored before them.
    #[default]
    Unspecified,
    /// The shipper's bounded buffer was full (the API was slower than the output) and it
    /// discarded the bytes rather than block the container.
    BufferFull,
    /// The shipper gave up on bytes it held: its grace period at exit ran out before they were
    /// accepted.
    GaveUp,
    /// The API refused the bytes for good (an error no retry can change, such as bytes that
    /// conflict with those stored, or a request too large).
    Rejected,
    /// The kernel could not put the bytes into the collector's ring buffer (it was full), so the
    /// collector never saw them.
    KernelLost,
    /// The kernel moved the bytes into the output from another file or pipe (`splice`,
    /// `sendfile`, ...) without the collector's probe copying them.
    NotCopied,
    /// The stream's writer died (or a restarted writer took over) without sending the bytes: the
    /// rest of its stream was declared lost by the collector, the API's settle, or the next
    /// writer.
    WriterDied,
}

impl DropReason {
    /// Every reason, in the order overlapping markers are ranked by (see the metadata API).
    pub const ALL: [DropReason; 7] = [
        Self::Unspecified,
        Self::BufferFull,
        Self::GaveUp,
        Self::Rejected,
        Self::KernelLost,
        Self::NotCopied,
        Self::WriterDied,
    ];

    /// The reason's code: what the wire, object keys and text readers use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::BufferFull => "buffer-full",
            Self::GaveUp => "gave-up",
            Self::Rejected => "rejected",
            Self::KernelLost => "kernel-lost",
            Self::NotCopied => "not-copied",
            Self::WriterDied => "writer-died",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A code that names no [`DropReason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown drop reason {0:?}")]
pub struct UnknownReason(pub String);

impl FromStr for DropReason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_owned()))
    }
}

/// A dropped range with its reason, as the stream's status and the capture report list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedSpan {
    pub start: u64,
    pub end: u64,
    /// Absent in what an API from before reasons answers: `unspecified` then.
    #[serde(default)]
    pub reason: DropReason,
}

impl DroppedSpan {
    pub fn new(span: Span, reason: DropReason) -> Self {
        Self {
            start: span.start,
            end: span.end,
            reason,
        }
    }

    pub fn span(&self) -> Span {
        Span::new(self.start, self.end)
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_same_in_json_in_text_and_back() {
        for r in DropReason::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{r}\""));
            assert_eq!(serde_json::from_str::<DropReason>(&json).unwrap(), r);
            assert_eq!(r.as_str().parse::<DropReason>(), Ok(r));
        }
        assert_eq!(DropReason::default(), DropReason::Unspecified);
        assert!("buffer_full".parse::<DropReason>().is_err());
        assert!(serde_json::from_str::<DropReason>("\"lost\"").is_err());
    }
}
