//! Log contexts as they arrive in request bodies and token subjects: `Context::prefix` and
//! `Context::stream`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metadata_api::auth::Context;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let prefix = Context::prefix(s);
    let stream = Context::stream(s);
    if let Ok(ctx) = &prefix {
        check(s, ctx);
    }
    if let Ok(ctx) = &stream {
        check(s, ctx);
        // A stream context is also a valid prefix, the same one.
        assert_eq!(
            prefix.as_ref().ok(),
            Some(ctx),
            "{s:?}: stream but not prefix"
        );
        let segs = s.split('/').count();
        assert!(
            segs == 4 || segs == 6,
            "{s:?}: stream context with {segs} segments"
        );
        // Every whole-segment prefix that parses covers it; cutting inside a segment does not.
        for (i, _) in s.match_indices('/') {
            if let Ok(p) = Context::prefix(&s[..i]) {
                assert!(p.covers(ctx), "{:?} does not cover {s:?}", &s[..i]);
                assert!(!ctx.covers(&p), "{s:?} covers its own prefix {:?}", &s[..i]);
            }
            if i > 1
                && let Ok(p) = Context::prefix(&s[..i - 1])
            {
                assert!(!p.covers(ctx), "{:?} covers {s:?} mid-segment", &s[..i - 1]);
            }
        }
    }
});

fn check(s: &str, ctx: &Context) {
    let c = ctx.as_str();
    assert_eq!(c, s, "context changed its text");
    assert!(!c.is_empty(), "empty context accepted");
    assert!(
        !c.starts_with('/') && !c.ends_with('/'),
        "{c:?}: leading or trailing '/'"
    );
    for seg in c.split('/') {
        assert!(!seg.is_empty(), "{c:?}: empty segment");
        // `a..b` is a fine segment name; `.` and `..` as whole segments are what path traversal needs.
        assert!(seg != "." && seg != "..", "{c:?}: dot segment");
        assert!(seg.len() <= 253, "{c:?}: segment longer than 253");
        assert!(
            seg.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
            "{c:?}: segment {seg:?} has a character outside [A-Za-z0-9._-]"
        );
    }
    assert!(c.starts_with("workflows"), "{c:?}: not under workflows");
    assert!(ctx.covers(ctx), "{c:?}: covers is not reflexive");
    let again = Context::prefix(c);
    assert_eq!(
        again.as_ref().ok(),
        Some(ctx),
        "{c:?}: does not parse again"
    );
}
