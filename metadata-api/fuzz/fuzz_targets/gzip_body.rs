//! `Content-Encoding: gzip` append bodies through the HTTP API (`POST /logs/{id}/data`), under a
//! decompressed-size limit chosen by the input.
//!
//! Input: `[mode, limit, edit_hi, edit_lo, payload...]`.
//! - mode 0: the payload is the body, as it is (garbage, or a gzip seed);
//! - mode 1: the payload describes plain text (pairs `[count, byte]`: `byte` repeated
//!   `64 * count` times; `0xff` ends a gzip member), which is compressed, so bodies are valid gzip
//!   and can decompress far beyond their size;
//! - mode 2: as 1, then the body is damaged at the offset `edit` (a byte flipped, or cut there).
//!
//! Checked: the answer is what one bounded decode of the body says (flate2's `MultiGzDecoder`,
//! reading at most `limit + 1` bytes): 202 and exactly those bytes stored when they fit the
//! limit, 413 when there are more, 400 when the body is not gzip. Never anything else: the
//! decoder never produces more than the limit into the stream.
#![no_main]

use std::io::{Read, Write};

use axum::body::Body;
use flate2::{Compression, read::MultiGzDecoder, write::GzEncoder};
use http::{Method, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use metadata_api::{limits::Limits, range::Span};

/// Limits around the service's inline-decoding threshold (64 KiB, `src/routes/decode.rs`), where decoding
/// moves to the blocking pool.
const LIMITS: [usize; 8] = [0, 1, 100, 4096, 65535, 65536, 65537, 70_000];
/// Plain text a description may expand to: beyond the largest limit, which is as far as the
/// service decodes.
const MAX_PLAIN: usize = 80 << 10;

fn compress(description: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let mut plain = 0;
    for member in description.split(|&b| b == 0xff) {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        for pair in member.chunks_exact(2) {
            let n = (usize::from(pair[0]) * 64).min(MAX_PLAIN - plain);
            plain += n;
            e.write_all(&vec![pair[1]; n]).expect("in memory");
        }
        body.extend(e.finish().expect("in memory"));
    }
    body
}

fuzz_target!(|data: &[u8]| {
    let [mode, limit, hi, lo, payload @ ..] = data else {
        return;
    };
    let max_decoded = LIMITS[usize::from(*limit) % LIMITS.len()];
    let body = match mode % 3 {
        0 => payload.to_vec(),
        1 => compress(payload),
        _ => {
            let mut body = compress(payload);
            let at = usize::from(u16::from_be_bytes([*hi, *lo]));
            if !body.is_empty() {
                let at = at % body.len();
                if mode & 0x80 != 0 {
                    body.truncate(at);
                } else {
                    body[at] ^= 1 << (mode & 7);
                }
            }
            body
        }
    };

    let mut expected = Vec::new();
    let decoded = MultiGzDecoder::new(&body[..])
        .take(max_decoded as u64 + 1)
        .read_to_end(&mut expected);

    let h = metadata_api_fuzz::harness();
    let svc = h.service(Limits {
        max_decoded,
        ..Limits::default()
    });
    let req = h
        .request(Method::POST, &format!("/logs/{}/data", svc.stream.id))
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(body.clone()))
        .expect("request");
    let reply = h.send(&svc, req, true);
    let what = (body.len(), max_decoded, &decoded);
    match decoded {
        Ok(n) if n <= max_decoded => {
            reply.expect(StatusCode::ACCEPTED, &what);
            let status = svc.stream.status();
            assert_eq!(status.length, n as u64, "{what:?}");
            assert_eq!(h.read(&svc, Span::new(0, n as u64)), expected, "{what:?}");
        }
        Ok(_) => reply.expect(StatusCode::PAYLOAD_TOO_LARGE, &what),
        Err(_) => reply.expect(StatusCode::BAD_REQUEST, &what),
    }
    if reply.status != StatusCode::ACCEPTED {
        assert_eq!(svc.stream.status().end, 0, "{what:?}: refused, yet stored");
    }
});
