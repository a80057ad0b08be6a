//! The lines of the peer benchmark's workload: `SEQ UNIX_NS filler...`, the filler a function of
//! the sequence number, so that a reader can check every line it receives and tell how late it
//! arrived. `workload peer-writer` writes them, the peer benchmark checks them.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::text::generate;

/// The sequence number and timestamp at the start of each line: `SSSSSSSSSS TTTTTTTTTTTTTTTTTTT `.
pub const HEADER: usize = 31;
/// Distinct log text the filler is cut from.
pub const FILLER_SPAN: usize = 64 << 10;

/// The log text lines are filled from: [`generate`]'s lines, newlines made spaces.
pub fn filler_source() -> anyhow::Result<Vec<u8>> {
    let mut text = generate(FILLER_SPAN)?;
    for b in &mut text {
        if *b == b'\n' {
            *b = b' ';
        }
    }
    Ok(text)
}

/// The filler of line `seq`, `len` bytes of `source`.
pub fn filler(source: &[u8], seq: u64, len: usize) -> &[u8] {
    let span = (source.len() - len) as u64;
    let at = (seq.wrapping_mul(7919) % span) as usize;
    &source[at..at + len]
}

pub fn put_digits(dst: &mut [u8], mut v: u64) {
    for b in dst.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

pub fn parse_digits(src: &[u8]) -> Option<u64> {
    src.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.wrapping_mul(10).wrapping_add(u64::from(b - b'0')))
    })
}

pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
