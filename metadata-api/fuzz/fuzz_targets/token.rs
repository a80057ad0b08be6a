//! Bearer token verification (JWT, HS256).
//!
//! Mode is chosen by the first byte:
//! - `0x00..=0x07`: mint a real token, tamper with it as the rest of the input says, and check that
//!   verification either fails or yields the original principal (never a different one);
//! - anything else: the whole input is a token text, which must not verify (only `mint` makes
//!   tokens that verify, and the fuzzer does not know the key).
#![no_main]

use std::{sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use metadata_api::auth::{Keys, Scope};

const CONTEXT: &str = "workflows/w/triggers/t";
const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys::from_secret(&[7u8; 32]))
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((&mode, ops)) if mode < 8 => tamper(ops),
        _ => {
            if let Ok(s) = std::str::from_utf8(data) {
                let verified = keys().verify(s);
                assert!(verified.is_none(), "{s:?} verified as {verified:?}");
            }
        }
    }
});

/// Four bytes per edit: `[kind, char, index_hi, index_lo]`. A `char` below 0x80 is used as is (any
/// ASCII), above it picks from the base64url alphabet, which keeps most edits decodable.
fn tamper(ops: &[u8]) {
    let keys = keys();
    let Ok(original) = keys.mint(CONTEXT, Scope::Write, Duration::from_secs(60)) else {
        panic!("cannot mint a token for {CONTEXT}");
    };
    let Some(principal) = keys.verify(&original) else {
        panic!("freshly minted token {original:?} does not verify");
    };
    assert_eq!(principal.context.as_str(), CONTEXT);
    assert_eq!(principal.scope, Scope::Write);

    let mut token = original.clone().into_bytes();
    for op in ops.chunks_exact(4) {
        let ch = if op[1] < 0x80 {
            op[1]
        } else {
            B64URL[usize::from(op[1] & 63)]
        };
        let at = usize::from(u16::from_be_bytes([op[2], op[3]]));
        match op[0] % 4 {
            0 if !token.is_empty() => {
                let i = at % token.len();
                token[i] = ch;
            }
            1 => {
                let i = at % (token.len() + 1);
                token.insert(i, ch);
            }
            2 if !token.is_empty() => {
                let i = at % token.len();
                token.remove(i);
            }
            3 => {
                // Truncate, or duplicate a tail (e.g. a segment), keeping the result bounded.
                if at % 2 == 0 {
                    token.truncate(at / 2 % (token.len() + 1));
                } else if token.len() < 8192 {
                    let from = at / 2 % (token.len() + 1);
                    let tail = token[from..].to_vec();
                    token.extend_from_slice(&tail);
                }
            }
            _ => {}
        }
    }
    // Every edit keeps the bytes ASCII.
    let Ok(tampered) = String::from_utf8(token) else {
        panic!("tampered token is not UTF-8");
    };
    if let Some(got) = keys.verify(&tampered) {
        assert_eq!(
            got, principal,
            "tampered token {tampered:?} (from {original:?}) verified as another principal"
        );
    }
}
