//! Byte ranges: the `Content-Range` forms writers send, the `Range` form readers send, and a set of
//! disjoint half-open ranges used to track what a stream holds.

use std::fmt;

/// Largest offset a stream may reach (2^53: exact in JSON numbers, far beyond any log).
pub const MAX_OFFSET: u64 = 1 << 53;

/// A parsed `Content-Range` header as writers use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentRange {
    /// `bytes a-b/*` or `bytes a-b/N`: the body holds bytes `start..end` (end exclusive).
    Bytes {
        start: u64,
        end: u64,
        /// The final length of the stream, when the writer declares it.
        total: Option<u64>,
    },
    /// `bytes */N`: no body, declares the final length.
    Final { total: u64 },
}

/// Why a range header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("range must look like `bytes a-b/*`, `bytes a-b/N` or `bytes */N`")]
    Malformed,
    #[error("range end {last} is before its start {first}")]
    Backwards { first: u64, last: u64 },
    #[error("range ends at {end}, beyond its declared length {total}")]
    BeyondTotal { end: u64, total: u64 },
    #[error("offsets above {MAX_OFFSET} are not supported")]
    TooLarge,
}

fn number(s: &str) -> Result<u64, RangeError> {
    // Only plain ASCII digits: `u64::from_str` would also take a leading `+`.
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RangeError::Malformed);
    }
    let n: u64 = s.parse().map_err(|_| RangeError::TooLarge)?;
    if n > MAX_OFFSET {
        return Err(RangeError::TooLarge);
    }
    Ok(n)
}

impl ContentRange {
    /// Parses `bytes a-b/*`, `bytes a-b/N` and `bytes */N` (RFC 9110 section 14.4, with `*` for an
    /// unknown length as the writer has not finished yet).
    pub fn parse(header: &str) -> Result<Self, RangeError> {
        let rest = header
            .trim()
            .strip_prefix("bytes ")
            .ok_or(RangeError::Malformed)?
            .trim_start();
        let (span, total) = rest.split_once('/').ok_or(RangeError::Malformed)?;
        let total = match total {
            "*" => None,
            n => Some(number(n)?),
        };
        if span == "*" {
            return total
                .map(|total| Self::Final { total })
                .ok_or(RangeError::Malformed);
        }
        let (first, last) = span.split_once('-').ok_or(RangeError::Malformed)?;
        let (first, last) = (number(first)?, number(last)?);
        if last < first {
            return Err(RangeError::Backwards { first, last });
        }
        let end = last + 1;
        if let Some(total) = total
            && end > total
        {
            return Err(RangeError::BeyondTotal { end, total });
        }
        Ok(Self::Bytes {
            start: first,
            end,
            total,
        })
    }

    /// The declared final length, if any.
    pub fn total(&self) -> Option<u64> {
        match *self {
            Self::Bytes { total, .. } => total,
            Self::Final { total } => Some(total),
        }
    }
}

/// A `Range: bytes=a-b` / `bytes=a-` request header (single range only).
pub fn parse_range_request(header: &str) -> Result<(u64, Option<u64>), RangeError> {
    let spec = header
        .trim()
        .strip_prefix("bytes=")
        .ok_or(RangeError::Malformed)?;
    let (first, last) = spec.split_once('-').ok_or(RangeError::Malformed)?;
    let first = number(first.trim())?;
    let last = match last.trim() {
        "" => None,
        l => {
            let l = number(l)?;
            if l < first {
                return Err(RangeError::Backwards { first, last: l });
            }
            Some(l + 1)
        }
    };
    Ok((first, last))
}

/// A half-open byte range `start..end`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

impl Span {
    pub fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn overlaps(&self, other: &Span) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl fmt::Display for Span {
    /// Inclusive form, as in HTTP ranges: `0-99` for `0..100`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end.saturating_sub(1))
    }
}

/// Sorted, disjoint, non-adjacent half-open ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    spans: Vec<Span>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Adds `span`, merging with neighbours it touches.
    pub fn insert(&mut self, span: Span) {
        if span.is_empty() {
            return;
        }
        let first = self.spans.partition_point(|s| s.end < span.start);
        let last = self.spans.partition_point(|s| s.start <= span.end);
        let mut merged = span;
        if first < last {
            merged.start = merged.start.min(self.spans[first].start);
            merged.end = merged.end.max(self.spans[last - 1].end);
        }
        self.spans.splice(first..last, [merged]);
    }

    /// Removes and returns the lowest span.
    pub fn pop_first(&mut self) -> Option<Span> {
        (!self.spans.is_empty()).then(|| self.spans.remove(0))
    }

    /// Bytes covered by the set.
    pub fn covered(&self) -> u64 {
        self.spans.iter().map(Span::len).sum()
    }

    /// End of the run that starts at 0 (0 when nothing starts at 0).
    pub fn prefix_end(&self) -> u64 {
        match self.spans.first() {
            Some(s) if s.start == 0 => s.end,
            _ => 0,
        }
    }

    /// Largest end of any span.
    pub fn max_end(&self) -> u64 {
        self.spans.last().map_or(0, |s| s.end)
    }

    /// Whether `span` lies entirely inside the set.
    pub fn contains(&self, span: Span) -> bool {
        if span.is_empty() {
            return true;
        }
        let i = self.spans.partition_point(|s| s.end < span.end);
        self.spans
            .get(i)
            .is_some_and(|s| s.start <= span.start && span.end <= s.end)
    }

    /// The parts of `within` that the set does not cover.
    pub fn gaps(&self, within: Span) -> Vec<Span> {
        let mut out = Vec::new();
        let mut at = within.start;
        for s in &self.spans {
            if s.end <= at {
                continue;
            }
            if s.start >= within.end {
                break;
            }
            if s.start > at {
                out.push(Span::new(at, s.start.min(within.end)));
            }
            at = at.max(s.end);
            if at >= within.end {
                break;
            }
        }
        if at < within.end {
            out.push(Span::new(at, within.end));
        }
        out
    }

    /// Union of two sets.
    pub fn union(&self, other: &RangeSet) -> RangeSet {
        let mut out = self.clone();
        for s in &other.spans {
            out.insert(*s);
        }
        out
    }

    /// The parts of `self` not covered by `other`.
    pub fn difference(&self, other: &RangeSet) -> RangeSet {
        let mut out = RangeSet::new();
        for s in &self.spans {
            for g in other.gaps(*s) {
                out.insert(g);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(
            ContentRange::parse("bytes 0-99/*"),
            Ok(ContentRange::Bytes {
                start: 0,
                end: 100,
                total: None
            })
        );
        assert_eq!(
            ContentRange::parse("bytes 10-19/20"),
            Ok(ContentRange::Bytes {
                start: 10,
                end: 20,
                total: Some(20)
            })
        );
        assert_eq!(
            ContentRange::parse("bytes */0"),
            Ok(ContentRange::Final { total: 0 })
        );
    }

    #[test]
    fn refuses_bad_forms() {
        for bad in [
            "",
            "bytes",
            "bytes 0-9",
            "bytes */*",
            "bytes -1-9/*",
            "bytes +1-9/*",
            "bytes 1-/*",
            "items 0-9/*",
            "bytes 0x1-9/*",
            "bytes 0-9/abc",
            "bytes 0-99999999999999999999999/*",
        ] {
            assert!(ContentRange::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            ContentRange::parse("bytes 9-0/*"),
            Err(RangeError::Backwards { first: 9, last: 0 })
        );
        assert_eq!(
            ContentRange::parse("bytes 0-9/5"),
            Err(RangeError::BeyondTotal { end: 10, total: 5 })
        );
    }

    #[test]
    fn request_ranges() {
        assert_eq!(parse_range_request("bytes=5-"), Ok((5, None)));
        assert_eq!(parse_range_request("bytes=5-9"), Ok((5, Some(10))));
        assert!(parse_range_request("bytes=9-5").is_err());
        assert!(parse_range_request("bytes=-5").is_err());
    }

    #[test]
    fn set_merges_and_finds_gaps() {
        let mut set = RangeSet::new();
        set.insert(Span::new(10, 20));
        set.insert(Span::new(30, 40));
        set.insert(Span::new(0, 5));
        assert_eq!(set.prefix_end(), 5);
        assert_eq!(
            set.gaps(Span::new(0, 50)),
            vec![Span::new(5, 10), Span::new(20, 30), Span::new(40, 50)]
        );
        set.insert(Span::new(5, 30));
        assert_eq!(set.spans(), &[Span::new(0, 40)]);
        assert!(set.contains(Span::new(3, 39)));
        assert!(!set.contains(Span::new(3, 41)));
        let mut other = RangeSet::new();
        other.insert(Span::new(10, 15));
        assert_eq!(
            set.difference(&other).spans(),
            &[Span::new(0, 10), Span::new(15, 40)]
        );
    }

    #[test]
    fn set_matches_a_bitmap_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut set = RangeSet::new();
            let mut model = [false; 128];
            for _ in 0..rng.random_range(0..12) {
                let a = rng.random_range(0..128u64);
                let b = rng.random_range(a..=128u64);
                set.insert(Span::new(a, b));
                for bit in &mut model[a as usize..b as usize] {
                    *bit = true;
                }
            }
            let mut rebuilt = [false; 128];
            for s in set.spans() {
                for bit in &mut rebuilt[s.start as usize..s.end as usize] {
                    *bit = true;
                }
            }
            assert_eq!(model, rebuilt);
            for w in set.spans().windows(2) {
                assert!(w[0].end < w[1].start, "spans not disjoint: {:?}", set);
            }
        }
    }
}
