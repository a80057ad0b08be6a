//! The reasons of a stream's `dropped` markers: which reason each dropped byte has.
//!
//! Markers may overlap (a settle over a range a writer marked too, replicas that each stored
//! one before seeing the other's). A byte several markers cover takes the reason of the marker
//! that sorts first by (start, end, reason): the answer depends only on the set of marker
//! objects, so every replica, and every reload from storage, gives the same one whatever order
//! it learnt them in.

use std::collections::BTreeSet;

use crate::{
    range::{RangeSet, Span},
    reason::{DropReason, DroppedSpan},
};

/// Every marker known of a stream and, from them, the reason of each dropped byte.
#[derive(Debug, Default)]
pub(super) struct Reasons {
    markers: BTreeSet<(Span, DropReason)>,
    /// Disjoint, sorted; neighbours of the same reason merged.
    resolved: Vec<DroppedSpan>,
}

impl Reasons {
    /// Adds a marker; whether it was new.
    pub(super) fn insert(&mut self, span: Span, reason: DropReason) -> bool {
        if span.is_empty() || !self.markers.insert((span, reason)) {
            return false;
        }
        self.resolve();
        true
    }

    /// Markers are few (a handful per stream that lost bytes at all): resolving all of them
    /// again on each new one keeps the lookups simple.
    fn resolve(&mut self) {
        let mut covered = RangeSet::new();
        let mut out: Vec<DroppedSpan> = Vec::new();
        for &(span, reason) in &self.markers {
            for gap in covered.gaps(span) {
                out.push(DroppedSpan::new(gap, reason));
            }
            covered.insert(span);
        }
        out.sort_unstable_by_key(|d| d.start);
        self.resolved = merge(out);
    }

    /// The dropped range with one reason that holds `at`.
    pub(super) fn at(&self, at: u64) -> Option<DroppedSpan> {
        let i = self.resolved.partition_point(|d| d.end <= at);
        self.resolved.get(i).filter(|d| d.start <= at).copied()
    }

    /// The dropped ranges with their reasons, less the bytes `stored` holds after all.
    pub(super) fn except(&self, stored: &RangeSet) -> Vec<DroppedSpan> {
        merge(
            self.resolved
                .iter()
                .flat_map(|d| {
                    stored
                        .gaps(d.span())
                        .into_iter()
                        .map(|g| DroppedSpan::new(g, d.reason))
                })
                .collect(),
        )
    }
}

/// Merges sorted, disjoint ranges that touch and share their reason.
fn merge(sorted: Vec<DroppedSpan>) -> Vec<DroppedSpan> {
    let mut out: Vec<DroppedSpan> = Vec::with_capacity(sorted.len());
    for d in sorted {
        match out.last_mut() {
            Some(last) if last.end == d.start && last.reason == d.reason => last.end = d.end,
            _ => out.push(d),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(start: u64, end: u64, reason: DropReason) -> DroppedSpan {
        DroppedSpan::new(Span::new(start, end), reason)
    }

    #[test]
    fn overlapping_markers_give_each_byte_one_reason_whatever_the_order_learnt() {
        use DropReason::*;
        let markers = [
            (Span::new(10, 20), WriterDied),
            (Span::new(5, 15), BufferFull),
            (Span::new(20, 30), WriterDied),
            (Span::new(5, 15), GaveUp),
        ];
        let mut a = Reasons::default();
        let mut b = Reasons::default();
        for m in markers {
            a.insert(m.0, m.1);
        }
        for m in markers.into_iter().rev() {
            b.insert(m.0, m.1);
        }
        let want = vec![d(5, 15, BufferFull), d(15, 30, WriterDied)];
        assert_eq!(a.resolved, want);
        assert_eq!(b.resolved, want);
        assert!(!a.insert(Span::new(5, 15), GaveUp), "known already");
        assert_eq!(a.at(4), None);
        assert_eq!(a.at(14), Some(d(5, 15, BufferFull)));
        assert_eq!(a.at(15), Some(d(15, 30, WriterDied)));
        assert_eq!(a.at(30), None);
        let mut stored = RangeSet::new();
        stored.insert(Span::new(12, 17));
        assert_eq!(
            a.except(&stored),
            vec![d(5, 12, BufferFull), d(17, 30, WriterDied)]
        );
    }
}
