//! `POST /logs/{id}/markers` bodies through the HTTP API, on a stream that holds bytes `0..16`,
//! maybe a dropped range `20..24` and maybe a final length of 24.
//!
//! Input: `[state, body...]`; bit 0 of `state`: the dropped range, bit 1: the final length.
//!
//! Checked against what the body means (read with a copy of the request type and
//! `ContentRange::parse`): 400 for anything but `{"range": "bytes a-b/*"|"bytes a-b/N",
//! "markers": ["dropped", ...], "reason"?: a known code}`; 416 for a range beyond the final
//! length; 409 for a final length that contradicts the stream; otherwise 202 with the range
//! dropped (where nothing is stored) for its reason (`unspecified` without one) and the final
//! length declared. Never a 5xx.
#![no_main]

use axum::body::Body;
use http::{Method, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use metadata_api::{
    range::{ContentRange, RangeSet, Span},
    reason::DropReason,
};

/// The request body as the service reads it (`src/routes/write.rs`).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkerRequest {
    range: String,
    markers: Vec<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// What the stream holds before the request.
const STORED: Span = Span { start: 0, end: 16 };
const DROPPED: Span = Span { start: 20, end: 24 };
const FINAL: u64 = 24;

fn expected(
    body: &[u8],
    dropped: bool,
    finished: bool,
) -> (StatusCode, Option<(Span, Option<u64>, DropReason)>) {
    let Ok(req) = serde_json::from_slice::<MarkerRequest>(body) else {
        return (StatusCode::BAD_REQUEST, None);
    };
    let reason = match req.reason.as_deref().map(str::parse::<DropReason>) {
        None => DropReason::Unspecified,
        Some(Ok(r)) => r,
        Some(Err(_)) => return (StatusCode::BAD_REQUEST, None),
    };
    if req.markers.is_empty() || req.markers.iter().any(|m| m != "dropped") {
        return (StatusCode::BAD_REQUEST, None);
    }
    let (span, total) = match ContentRange::parse(&req.range) {
        Ok(ContentRange::Bytes { start, end, total }) => (Span::new(start, end), total),
        Ok(ContentRange::Final { .. }) | Err(_) => return (StatusCode::BAD_REQUEST, None),
    };
    if finished && span.end > FINAL {
        return (StatusCode::RANGE_NOT_SATISFIABLE, None);
    }
    // The range is dropped even when the final length is then refused.
    let covered = STORED
        .end
        .max(if dropped { DROPPED.end } else { 0 })
        .max(span.end);
    match total {
        Some(t) if finished && t != FINAL => (StatusCode::CONFLICT, Some((span, None, reason))),
        Some(t) if t < covered => (StatusCode::CONFLICT, Some((span, None, reason))),
        _ => (StatusCode::ACCEPTED, Some((span, total, reason))),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&state, body)) = data.split_first() else {
        return;
    };
    let (dropped, finished) = (state & 1 != 0, state & 2 != 0);
    let h = metadata_api_fuzz::harness();
    let svc = h.service(Default::default());
    h.put(&svc, 0, b"0123456789abcdef");
    if dropped {
        h.drop_range(&svc, DROPPED, DropReason::KernelLost);
    }
    if finished {
        h.finish(&svc, FINAL);
    }
    let req = h
        .request(Method::POST, &format!("/logs/{}/markers", svc.stream.id))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_vec()))
        .expect("request");
    let reply = h.send(&svc, req, true);
    let (status, effect) = expected(body, dropped, finished);
    let what = (String::from_utf8_lossy(body), dropped, finished);
    reply.expect(status, &what);

    let mut want_dropped = RangeSet::new();
    if dropped {
        want_dropped.insert(DROPPED);
    }
    let mut want_final = finished.then_some(FINAL);
    let mut stored = RangeSet::new();
    stored.insert(STORED);
    // Bytes only the request's marker covers have its reason.
    let mut only_new = RangeSet::new();
    if let Some((span, total, reason)) = effect {
        only_new.insert(span);
        only_new = only_new.difference(&want_dropped).difference(&stored);
        want_dropped.insert(span);
        want_final = want_final.or(total);
        for d in svc.stream.status().dropped {
            if only_new.spans().iter().any(|s| s.overlaps(&d.span())) {
                assert_eq!(d.reason, reason, "{what:?}: reason of {d:?}");
            }
        }
    }
    let now = svc.stream.status();
    let mut got = RangeSet::new();
    for s in now.dropped_spans() {
        got.insert(s);
    }
    assert_eq!(
        got.spans(),
        want_dropped.difference(&stored).spans(),
        "{what:?}: dropped ranges"
    );
    assert_eq!(now.stored, [STORED], "{what:?}: stored ranges");
    assert_eq!(now.final_length, want_final, "{what:?}: final length");
});
