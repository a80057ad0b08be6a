//! Secret values named by `RELAY_REDACT_ENV` never reach the metadata API: the real entrypoint
//! binary ships to the real metadata-api, and the stored bytes are read back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{process::Command, time::Duration};

use common::{Api, Wrap, assert_accounted, wait_for};

const S1: &str = "hunter2-Secret";
/// Overlaps the end of `S1` when printed right after it.
const S2: &str = "Secret-overlap";
/// `S4` starts with it.
const S3: &str = "Tok3n-ABCD";
const S4: &str = "Tok3n-ABCD-EXTENDED";
/// From an `envFrom` with a prefix (`PFX_*`).
const S5: &str = "prefixed-VALUE-77";

fn with_secrets(cmd: &mut Command) -> &mut Command {
    cmd.env("RELAY_REDACT_ENV", "S1,S2, S3,S4,PFX_*,SHORT")
        .env("S1", S1)
        .env("S2", S2)
        .env("S3", S3)
        .env("S4", S4)
        .env("PFX_ANY", S5)
        .env("SHORT", "abc")
        .env("NOT_SECRET", "public-value")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn secret_values_are_stored_as_stars_however_they_are_written() {
    let api = Api::start(&[]);
    // The child reads its secrets from its environment (it must still get them), and writes:
    // a value whole, split across writes with a pause between, repeated, overlapping another,
    // a value that is a prefix of another (both ways), a short one, a non-secret, and a value at
    // the very end with no newline after it.
    let script = r#"
        echo "whole: $S1."
        printf 'split: %s' "${S1%%-*}"; sleep 0.3; printf '%s\n' "-${S1#*-}"
        echo "repeated: $S1$S1 $S1"
        echo "overlap: hunter2-Secret-overlap"
        echo "prefix: $S3 and $S4 and ${S4}X"
        echo "prefixed: $PFX_ANY; short: $SHORT; public: $NOT_SECRET"
        echo "err: $S2" >&2
        printf 'end: %s' "$S1"
    "#;
    let mut cmd = api.wrap(&["sh", "-c", script]);
    let status = with_secrets(&mut cmd).status().unwrap();
    assert_eq!(status.code(), Some(0));

    let (st, out) = api.read("stdout");
    let want = "whole: ***.\n\
                split: ***\n\
                repeated: *** ***\n\
                overlap: ***\n\
                prefix: *** and *** and ***X\n\
                prefixed: ***; short: abc; public: public-value\n\
                end: ***";
    assert_eq!(text(&out), want);
    assert_accounted(&st, &out, want.as_bytes());
    let (_, err) = api.read("stderr");
    assert_eq!(text(&err), "err: ***\n");
    for secret in [S1, S2, S3, S4, S5, "hunter2", "Secret"] {
        assert!(
            !text(&out).contains(secret),
            "{secret} leaked: {}",
            text(&out)
        );
    }
}

#[test]
fn output_is_not_held_back_only_a_possible_secret_start_is() {
    let api = Api::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // The first half of a secret, then a pause until the test says go.
    let script = r#"printf 'ready\nhunter2-'; while [ ! -e "$1" ]; do sleep 0.02; done; printf 'Secret done\n'"#;
    let mut cmd = api.wrap(&["--batch-interval", "20ms", "sh", "-c", script, "sh"]);
    let mut child = with_secrets(cmd.arg(&go)).spawn().unwrap();
    wait_for(
        Duration::from_secs(10),
        "the text before the secret to be stored",
        || api.read("stdout").1 == b"ready\n",
    );
    // Held back: the start of the value must not have been shipped meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(text(&api.read("stdout").1), "ready\n");
    std::fs::write(&go, "").unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(text(&api.read("stdout").1), "ready\n*** done\n");
}

#[test]
fn secrets_in_a_large_stream_are_redacted_at_every_read_boundary() {
    use rand::{Rng, SeedableRng};
    let api = Api::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    // Lowercase noise (no secret can appear in it by chance: the values have capitals) with
    // values inserted at random places, so that reads of the pipe cut through some of them.
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (mut raw, mut want) = (Vec::new(), Vec::new());
    while raw.len() < 8 << 20 {
        let n = rng.random_range(0..100_000);
        let noise: Vec<u8> = (0..n)
            .map(|_| match rng.random_range(0..27u8) {
                26 => b'\n',
                c => b'a' + c,
            })
            .collect();
        raw.extend_from_slice(&noise);
        want.extend_from_slice(&noise);
        let secret = [S1, S3, S4, S5][rng.random_range(0..4)];
        raw.extend_from_slice(secret.as_bytes());
        want.extend_from_slice(b"***\n");
        raw.push(b'\n');
    }
    std::fs::write(dir.path().join("out"), &raw).unwrap();
    let mut cmd = api.wrap(&["--buffer-limit", "64M", "--", "cat"]);
    let status = with_secrets(cmd.arg(dir.path().join("out")))
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let (st, out) = api.read("stdout");
    let dropped = assert_accounted(&st, &out, &want);
    assert_eq!(dropped, 0);
    assert!(out == want, "stored bytes differ from the redacted input");
}

#[test]
fn without_a_list_nothing_is_redacted() {
    let api = Api::start(&[]);
    let status = api
        .wrap(&["sh", "-c", "echo $S1"])
        .env("S1", S1)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(text(&api.read("stdout").1), format!("{S1}\n"));
}
