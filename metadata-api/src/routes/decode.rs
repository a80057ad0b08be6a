//! Decoding compressed append bodies (`Content-Encoding: gzip` or `zstd`) within the limits on
//! decoded size and zstd windows.

use std::io::Read;

use bytes::{Buf, Bytes};

use crate::{coding::Coding, error::ApiError};

/// Decoded bytes a compressed body may announce and produce on the async worker (tens of µs of
/// inflate): small parts skip a thread hop, and a large or very compressible body, which takes
/// milliseconds, goes to the blocking pool instead of stalling the requests that share the worker.
const INLINE_DECODE: usize = 64 << 10;

/// Growth step of a decode buffer whose size hint was too small: doubling from here keeps the
/// number of reallocations small without reserving far beyond what arrived.
const MIN_GROWTH: usize = 64 << 10;

/// Largest zstd window a body may ask for, log2: 8 MiB, the widest zstd picks at levels 1-19
/// without `--long` or `--ultra` (frames of a known, smaller size get a smaller one). A frame's
/// window is what the decoder allocates besides the output, so a body asking for more is refused
/// rather than given up to 128 MiB (zstd's own limit), whatever it decodes to.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// The decoded size a gzip body announces: ISIZE, the last four bytes (of its last member; modulo
/// 2^32). Only a hint for the buffer: the decoder, not this, decides what the body holds.
fn gzip_size_hint(body: &[u8]) -> Option<usize> {
    let tail: [u8; 4] = body.get(body.len().checked_sub(4)?..)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(tail)).ok()
}

/// The decoded size a zstd body announces: the content size in its first frame's header (writers
/// that compress a whole batch at once put it there). A hint only, as for gzip.
fn zstd_size_hint(body: &[u8]) -> Option<usize> {
    let size = zstd::zstd_safe::get_frame_content_size(body).ok()??;
    usize::try_from(size).ok()
}

/// Reads `r` to its end, or until `out` holds `limit + 1` bytes (one more than allowed, which is
/// how the caller tells "too large" from "just fits"). `out`'s capacity never grows past
/// `limit + 1`: it doubles from the capacity it came with (the size hint), capped there, so a
/// bomb costs at most the limit in memory whatever its header claims.
fn read_up_to(r: &mut impl Read, out: &mut Vec<u8>, limit: usize) -> std::io::Result<()> {
    let cap = limit.saturating_add(1);
    let mut filled = out.len();
    // The decoder writes into initialised bytes; zeroing each byte once, as the buffer grows, is
    // cheap next to decoding it.
    out.resize(out.capacity().clamp(filled, cap.max(filled)), 0);
    while filled < cap {
        let n = if filled == out.len() {
            // Full: a small read on the stack tells the end from more before the buffer grows, so
            // an exact hint never reallocates (as `Read::read_to_end` does).
            let mut probe = [0u8; 32];
            let want = (cap - filled).min(probe.len());
            let n = match r.read(&mut probe[..want]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    out.truncate(filled);
                    return Err(e);
                }
            };
            if n > 0 {
                let grow = filled.max(MIN_GROWTH).min(cap - filled);
                out.reserve_exact(grow);
                out.resize(filled + grow, 0);
                out[filled..filled + n].copy_from_slice(&probe[..n]);
            }
            n
        } else {
            match r.read(&mut out[filled..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    out.truncate(filled);
                    return Err(e);
                }
            }
        };
        if n == 0 {
            break;
        }
        filled += n;
    }
    out.truncate(filled);
    Ok(())
}

/// Decodes a `gzip` or `zstd` body into at most `max` bytes: more is refused (413) before more
/// than `max + 1` bytes are produced or allocated, and a body that does not decode is refused
/// (400).
pub(super) async fn decode_body(
    coding: Coding,
    body: Bytes,
    max: usize,
) -> Result<Bytes, ApiError> {
    let invalid = move |e: std::io::Error| ApiError::bad(format!("invalid {coding} body: {e}"));
    // Sized from the announced size up to the limit, the buffer neither grows while decoding nor
    // keeps spare capacity afterwards; a lying header costs at most what a real body of that size
    // would.
    let guess = body.len().saturating_mul(4);
    let (hint, mut dec): (usize, Box<dyn Read + Send>) = match coding {
        Coding::Gzip => (
            gzip_size_hint(&body).unwrap_or(guess),
            Box::new(flate2::read::MultiGzDecoder::new(body.reader())),
        ),
        Coding::Zstd => {
            let hint = zstd_size_hint(&body).unwrap_or(guess);
            // `with_buffer`: the body is already in memory, no second buffer is needed.
            let mut dec = zstd::stream::read::Decoder::with_buffer(body.reader())
                .map_err(|e| ApiError::Internal(format!("zstd decoder: {e}")))?;
            dec.window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| ApiError::Internal(format!("zstd decoder: {e}")))?;
            (hint, Box::new(dec))
        }
        Coding::Identity => return Ok(body),
    };
    let mut out = Vec::with_capacity(hint.min(max));
    let inline = INLINE_DECODE.min(max);
    // A body announcing more goes to the pool at once and is decoded there in one call into a
    // buffer of the announced size: zstd then decodes a frame straight into it, where a smaller
    // first read makes it decode through a window buffer of its own (twice the CPU: 2.04 against
    // 0.98 s/GB for 1 MiB frames). One that announces little but holds more moves there too.
    let small = hint <= inline;
    if small {
        read_up_to(&mut dec, &mut out, inline).map_err(invalid)?;
    }
    if !small || (out.len() > inline && inline < max) {
        out =
            tokio::task::spawn_blocking(move || read_up_to(&mut dec, &mut out, max).map(|()| out))
                .await
                .map_err(|e| ApiError::Internal(format!("{coding} decoding stopped: {e}")))?
                .map_err(invalid)?;
    }
    if out.len() > max {
        return Err(ApiError::TooLarge(format!(
            "decompressed body exceeds {max} bytes"
        )));
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    /// As the client compresses: one frame, its size in the header, a checksum at the end.
    fn zstd(b: &[u8]) -> Vec<u8> {
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .unwrap();
        c.compress(b).unwrap()
    }

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| b"log line\n"[i % 9] ^ (i / 7) as u8)
            .collect()
    }

    /// The error of a decode expected to fail (a panic names the decoded length, not the bytes).
    fn refused(r: Result<Bytes, ApiError>) -> ApiError {
        match r {
            Ok(b) => panic!("decoded {} bytes", b.len()),
            Err(e) => e,
        }
    }

    async fn decode_gzip(body: Bytes, max: usize) -> Result<Bytes, ApiError> {
        decode_body(Coding::Gzip, body, max).await
    }

    async fn decode_zstd(body: impl Into<Bytes>, max: usize) -> Result<Bytes, ApiError> {
        decode_body(Coding::Zstd, body.into(), max).await
    }

    #[tokio::test]
    async fn gzip_bodies_decode_inline_or_on_the_blocking_pool() {
        let inline = INLINE_DECODE;
        for n in [0, 10, inline, inline + 1, 5 * inline + 3] {
            let plain = text(n);
            let out = decode_gzip(gzip(&plain).into(), 1 << 20).await.unwrap();
            assert_eq!(out, plain, "{n} bytes");
            assert_eq!(gzip_size_hint(&gzip(&plain)), Some(n));
        }
        // Several members, as a client appending compressed batches sends.
        let (a, b) = (text(inline * 2), text(300));
        let mut two = gzip(&a);
        two.extend_from_slice(&gzip(&b));
        let out = decode_gzip(two.into(), 1 << 20).await.unwrap();
        assert_eq!(out, [a, b].concat());
    }

    #[tokio::test]
    async fn gzip_limits_hold_whatever_the_size_hint_says() {
        let plain = text(300_000);
        let err = decode_gzip(gzip(&plain).into(), 299_999).await.unwrap_err();
        assert!(matches!(err, ApiError::TooLarge(_)), "{err:?}");
        assert!(
            decode_gzip(gzip(&plain).into(), 300_000)
                .await
                .is_ok_and(|b| b == plain)
        );
        // A trailer that lies about the size only sized the first buffer: the decoder refuses it.
        for isize in [0u32, 7, u32::MAX] {
            let mut body = gzip(&plain);
            let n = body.len();
            body[n - 4..].copy_from_slice(&isize.to_le_bytes());
            let err = decode_gzip(body.into(), 1 << 20).await.unwrap_err();
            assert!(matches!(err, ApiError::BadRequest(_)), "{err:?}");
        }
        let err = decode_gzip(Bytes::from_static(b"not gzip"), 1 << 20)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::BadRequest(_)), "{err:?}");
    }

    #[tokio::test]
    async fn zstd_bodies_round_trip_inline_or_on_the_blocking_pool() {
        let inline = INLINE_DECODE;
        for n in [0, 10, inline, inline + 1, 5 * inline + 3] {
            let plain = text(n);
            let out = decode_zstd(zstd(&plain), 1 << 20).await.unwrap();
            assert_eq!(out, plain, "{n} bytes");
            assert_eq!(zstd_size_hint(&zstd(&plain)), Some(n));
        }
        // Several frames (the first announcing more or less than the inline part), and a
        // streamed frame that announces no size.
        let (a, b) = (text(inline * 2), text(300));
        for (a, b) in [(&a, &b), (&b, &a)] {
            let mut two = zstd(a);
            two.extend_from_slice(&zstd(b));
            let out = decode_zstd(two, 1 << 20).await.unwrap();
            assert!(out == [&a[..], b].concat());
        }
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        e.write_all(&a).unwrap();
        let streamed = e.finish().unwrap();
        assert_eq!(zstd_size_hint(&streamed), None);
        assert_eq!(decode_zstd(streamed, 1 << 20).await.unwrap(), a);
    }

    #[tokio::test]
    async fn zstd_limits_hold_whatever_the_header_says() {
        let plain = text(300_000);
        let err = refused(decode_zstd(zstd(&plain), 299_999).await);
        assert!(matches!(err, ApiError::TooLarge(_)), "{err:?}");
        assert!(
            decode_zstd(zstd(&plain), 300_000)
                .await
                .is_ok_and(|b| b == plain)
        );
        // A bomb: 1 GiB of zeros in a few dozen KiB, streamed so that no header announces it.
        // It is refused after the limit, and the buffer never grew past it.
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            e.write_all(&zeros).unwrap();
        }
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        let err = refused(decode_zstd(bomb.clone(), 1 << 20).await);
        assert!(matches!(err, ApiError::TooLarge(_)), "{err:?}");
        let mut out = Vec::new();
        let mut dec = zstd::stream::read::Decoder::new(&bomb[..]).unwrap();
        dec.window_log_max(ZSTD_WINDOW_LOG_MAX).unwrap();
        read_up_to(&mut dec, &mut out, 1 << 20).unwrap();
        assert_eq!(out.len(), (1 << 20) + 1);
        assert!(out.capacity() <= (1 << 20) + 1, "{}", out.capacity());
        // A frame that announces more than the limit: the first buffer is sized to the limit.
        let huge = zstd::bulk::compress(&vec![0u8; 2 << 20], 1).unwrap();
        assert_eq!(zstd_size_hint(&huge), Some(2 << 20));
        let err = refused(decode_zstd(huge, 1 << 20).await);
        assert!(matches!(err, ApiError::TooLarge(_)), "{err:?}");
    }

    #[tokio::test]
    async fn zstd_windows_wider_than_8_mib_are_refused() {
        // Streamed with a 16 MiB window (what `zstd --long=24` asks for): the decoder would
        // allocate it whatever the body decodes to, so it is refused before any of it is.
        let streamed = |window_log| {
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
            e.window_log(window_log).unwrap();
            e.write_all(&text(100_000)).unwrap();
            e.finish().unwrap()
        };
        let err = refused(decode_zstd(streamed(24), 64 << 20).await);
        match err {
            ApiError::BadRequest(m) => assert!(m.contains("memory"), "{m}"),
            other => panic!("{other:?}"),
        }
        let out = decode_zstd(streamed(ZSTD_WINDOW_LOG_MAX), 1 << 20).await;
        assert!(out.is_ok_and(|b| b.len() == 100_000));
    }

    #[tokio::test]
    async fn invalid_zstd_bodies_are_bad_requests() {
        let good = zstd(&text(200_000));
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        let bodies: [(&str, Vec<u8>); 5] = [
            ("garbage", b"not zstd".to_vec()),
            ("gzip", gzip(b"a gzip body sent as zstd\n")),
            ("truncated", good[..good.len() - 10].to_vec()),
            ("corrupt", flipped),
            ("trailing garbage", [&good[..], b"junk"].concat()),
        ];
        for (what, body) in bodies {
            match decode_zstd(body, 1 << 20).await {
                Err(ApiError::BadRequest(m)) => {
                    assert!(m.starts_with("invalid zstd body: "), "{what}: {m}");
                }
                Err(other) => panic!("{what}: {other:?}"),
                Ok(b) => panic!("{what}: decoded {} bytes", b.len()),
            }
        }
    }

    #[test]
    fn reads_stop_one_byte_past_the_limit_with_the_capacity_held_there() {
        let plain = text(1000);
        for (hint, limit) in [(0, 999), (0, 1000), (1000, 1000), (5000, 400), (10, 2000)] {
            let mut out = Vec::with_capacity(hint);
            read_up_to(&mut &plain[..], &mut out, limit).unwrap();
            let want = plain.len().min(limit + 1);
            assert_eq!(out, plain[..want], "hint {hint}, limit {limit}");
            assert!(out.capacity() <= hint.max(limit + 1), "{}", out.capacity());
        }
        // An exact hint is read without growing.
        let mut out = Vec::with_capacity(1000);
        read_up_to(&mut &plain[..], &mut out, 1 << 20).unwrap();
        assert_eq!((out.len(), out.capacity()), (1000, 1000));
    }
}
