//! `Content-Range` / `Range` header parsing and the `RangeSet` that tracks what a stream holds.
//!
//! The input is tried as a header (when it is UTF-8) and, independently, read as a list of spans
//! that are inserted into a `RangeSet`, which is checked against a bitmap model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metadata_api::range::{ContentRange, MAX_OFFSET, RangeSet, Span, parse_range_request};

/// Spans are built in `0..DOMAIN` so that they collide often and a bitmap can model the set.
const DOMAIN: usize = 256 + 64;
/// The same spans scaled by this factor must give the same set, scaled (scaling keeps every
/// `<`, `==` between offsets), which exercises offsets near `MAX_OFFSET`.
const SCALE: u64 = 1 << 44;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        headers(s);
    }
    range_set(data);
});

fn headers(s: &str) {
    match ContentRange::parse(s) {
        Ok(ContentRange::Bytes { start, end, total }) => {
            assert!(start < end, "{s:?}: start {start} >= end {end}");
            assert!(
                end <= MAX_OFFSET + 1,
                "{s:?}: end {end} beyond MAX_OFFSET + 1"
            );
            if let Some(t) = total {
                assert!(end <= t, "{s:?}: end {end} beyond total {t}");
                assert!(t <= MAX_OFFSET, "{s:?}: total {t} beyond MAX_OFFSET");
            }
        }
        Ok(ContentRange::Final { total }) => {
            assert!(
                total <= MAX_OFFSET,
                "{s:?}: total {total} beyond MAX_OFFSET"
            );
        }
        Err(_) => {}
    }
    if let Ok((a, b)) = parse_range_request(s) {
        assert!(a <= MAX_OFFSET, "{s:?}: first {a} beyond MAX_OFFSET");
        if let Some(b) = b {
            assert!(a < b, "{s:?}: range {a}..{b} is empty or backwards");
            assert!(b <= MAX_OFFSET + 1, "{s:?}: end {b} beyond MAX_OFFSET + 1");
        }
    }
}

/// Two bytes per span: a start in `0..256` and a length in `0..64`; bit 6 of the second byte makes
/// the span backwards (`end < start`, which must be ignored like an empty span).
fn spans(data: &[u8]) -> impl Iterator<Item = Span> + '_ {
    data.chunks_exact(2).map(|c| {
        let start = u64::from(c[0]);
        let len = u64::from(c[1] & 63);
        if c[1] & 64 != 0 {
            Span::new(start, start.saturating_sub(len))
        } else {
            Span::new(start, start + len)
        }
    })
}

fn scaled(s: Span) -> Span {
    Span::new(s.start * SCALE, s.end * SCALE)
}

fn check_shape(set: &RangeSet) {
    for s in set.spans() {
        assert!(s.start < s.end, "empty span {s:?} in {set:?}");
    }
    for w in set.spans().windows(2) {
        assert!(
            w[0].end < w[1].start,
            "spans not sorted and disjoint: {set:?}"
        );
    }
}

fn bitmap(set: &RangeSet) -> [bool; DOMAIN] {
    let mut bits = [false; DOMAIN];
    for s in set.spans() {
        for bit in &mut bits[s.start as usize..s.end as usize] {
            *bit = true;
        }
    }
    bits
}

fn range_set(data: &[u8]) {
    let (left, right) = data.split_at(data.len() / 2 / 2 * 2);
    let mut a = RangeSet::new();
    let mut a_scaled = RangeSet::new();
    let mut model = [false; DOMAIN];
    for span in spans(left) {
        a.insert(span);
        a_scaled.insert(scaled(span));
        check_shape(&a);
        check_shape(&a_scaled);
        if span.start < span.end {
            for bit in &mut model[span.start as usize..span.end as usize] {
                *bit = true;
            }
        }
        assert!(a.contains(span), "{a:?} lost {span:?}");
    }
    assert_eq!(bitmap(&a), model, "{a:?} does not match the model");
    let scaled_back: Vec<Span> = a.spans().iter().map(|&s| scaled(s)).collect();
    assert_eq!(a_scaled.spans(), scaled_back.as_slice());
    assert_eq!(
        a.prefix_end(),
        model.iter().take_while(|&&b| b).count() as u64
    );
    assert_eq!(
        a.max_end(),
        model.iter().rposition(|&b| b).map_or(0, |i| i as u64 + 1)
    );

    let mut b = RangeSet::new();
    for span in spans(right) {
        b.insert(span);
    }
    check_shape(&b);
    let model_b = bitmap(&b);

    // contains / gaps against the model, for spans taken from the other half.
    for probe in spans(right).filter(|s| s.start < s.end) {
        let covered = model[probe.start as usize..probe.end as usize]
            .iter()
            .all(|&b| b);
        assert_eq!(a.contains(probe), covered, "contains({probe:?}) on {a:?}");
        let gaps = a.gaps(probe);
        let mut gap_bits = [false; DOMAIN];
        for g in &gaps {
            assert!(g.start < g.end, "empty gap {g:?}");
            assert!(
                probe.start <= g.start && g.end <= probe.end,
                "gap {g:?} outside {probe:?}"
            );
            for bit in &mut gap_bits[g.start as usize..g.end as usize] {
                *bit = true;
            }
        }
        for w in gaps.windows(2) {
            assert!(
                w[0].end < w[1].start,
                "gaps not sorted and disjoint: {gaps:?}"
            );
        }
        for i in probe.start as usize..probe.end as usize {
            assert_eq!(
                gap_bits[i], !model[i],
                "gaps({probe:?}) on {a:?} wrong at {i}"
            );
        }
    }

    let union = a.union(&b);
    check_shape(&union);
    let expected: Vec<bool> = model.iter().zip(&model_b).map(|(x, y)| *x || *y).collect();
    assert_eq!(bitmap(&union).as_slice(), expected.as_slice(), "union");

    let diff = a.difference(&b);
    check_shape(&diff);
    let expected: Vec<bool> = model.iter().zip(&model_b).map(|(x, y)| *x && !*y).collect();
    assert_eq!(bitmap(&diff).as_slice(), expected.as_slice(), "difference");
}
