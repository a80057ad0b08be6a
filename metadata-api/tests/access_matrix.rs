//! The access matrix: every route of the metadata API × every kind of credential → the status it
//! must answer, over real HTTP to the real binary; in `hmac` mode, and in `--auth kubernetes` mode
//! against the test bed's real kube-apiserver with real bound ServiceAccount tokens.
//!
//! The victim is the tenant of workflow `wf-b`: a step context [`V`] with an entrypoint stream
//! (`{E}`) and a collector stream (`{B}`), and a trigger context [`T`] with a stream (`{ET}`). Its
//! neighbours share prefixes with it (workflow `wf`, step `s`), so a check that compares strings
//! instead of whole segments shows.
//!
//! Besides the status, every refused answer (4xx/5xx) must not leak: no stream id or context of the
//! victim, no stored byte, no echo of the credential, no internal detail (storage paths, object
//! keys, Kubernetes errors), no `X-Relay-*` or `Content-Range` header; all `401`s and all `404`s
//! have one body each, so a foreign stream cannot be told from a missing one. A refused write must
//! have stored nothing: the victim's streams (and the ones a create would have made) read the same
//! before and after it. The whole matrix is printed, and the test fails listing every cell that
//! differs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use common::Server;
use metadata_api::auth::{AUDIENCE, Claims, Context, ISSUER, Keys, Scope};
use reqwest::{
    Client, Method, StatusCode,
    header::{AUTHORIZATION, HeaderMap},
};
use serde_json::json;

/// The victim's step context; its workflow `wf-b` starts with the workflow `wf`, its step `s1`
/// with the step `s`.
const V: &str = "workflows/wf-b/runs/r1/steps/s1";
/// The victim's trigger context.
const T: &str = "workflows/wf-b/triggers/t1";
/// Another tenant's context (the HMAC token and, in `kubernetes` mode, the pod's).
const OTHER: &str = "workflows/other/runs/r1/steps/s1";
/// What the victim's streams hold: no refused answer may contain it.
const SECRET: &str = "s3cr3t-payload";

/// The credentials, one column each. The first seven and `k-aud` are not valid credentials;
/// `k-*` exist only in `kubernetes` mode.
const TOKENS: [&str; 28] = [
    // No Authorization header.
    "none",
    // `Bearer not.a.jwt`.
    "malformed",
    // The victim's own write token, under the `Basic` scheme.
    "basic",
    // A write token of [`V`], signed with the server's key, expired an hour ago.
    "expired",
    // A write token of [`V`] signed with another key.
    "forged",
    // A write token of [`V`] with `alg: none` and no signature.
    "alg-none",
    // The other tenant's write token with its payload changed to [`V`], signature kept.
    "tampered",
    // Write tokens of other contexts: another tenant, the workflow `wf`, the step `s` of `wf-b`.
    "w-other",
    "w-wf",
    "w-sibling",
    // Read tokens of `workflows/other`, `workflows/wf` and `workflows/wf-b/runs/r1/steps/s`.
    "r-other",
    "r-wf",
    "r-sibling",
    // The victim's read token (`workflows/wf-b`).
    "r-right",
    // The victim's write tokens of [`V`] and of [`T`].
    "w-right",
    "w-trigger",
    // HMAC collector tokens of scope `workflows` (every context) and `workflows/other`.
    "coll",
    "coll-other",
    // `kubernetes` mode: the victim pod's token for another audience.
    "k-aud",
    // A pod without log context labels.
    "k-nolabel",
    // A pod of another tenant (namespace `other`, context [`OTHER`]), on the victim's node.
    "k-other",
    // The victim's pod (context [`V`], node `n1`).
    "k-right",
    // Collector pods on the victim's node `n1` and on `n2`.
    "k-coll-n1",
    "k-coll-n2",
    // People and accounts with tokens for the API server itself, read by their RBAC: the user
    // alice, who may `get pods/log` in the victim's namespace through her group; bob, who may
    // `get pods` there but not their logs; carol, who may read pod logs in namespace `other`
    // only; the ServiceAccount `tenant:viewer`, bound to read pod logs in the victim's namespace.
    "k-alice",
    "k-bob",
    "k-carol",
    "k-sa",
];
const COLUMNS: usize = TOKENS.len();

const JSON: &[(&str, &str)] = &[("content-type", "application/json")];
const BYTES: &[(&str, &str)] = &[("content-type", "application/octet-stream")];
const AT_END: &[(&str, &str)] = &[
    ("content-type", "application/octet-stream"),
    ("content-range", "bytes {L}-{L+8}/*"),
];
const FINISH: &[(&str, &str)] = &[("content-range", "bytes */{end}")];
const RANGE: &[(&str, &str)] = &[("range", "bytes=0-3")];
const NDJSON: &[(&str, &str)] = &[("accept", "application/x-ndjson")];
const NO: &[(&str, &str)] = &[];

/// The victim's contexts as they appear in request bodies.
const CREATE_V: &str = r#"{"name":"probe","context":"workflows/wf-b/runs/r1/steps/s1"}"#;
const CREATE_V_EBPF: &str =
    r#"{"name":"probe","source":"ebpf","context":"workflows/wf-b/runs/r1/steps/s1"}"#;
const CREATE_T: &str = r#"{"name":"probe","context":"workflows/wf-b/triggers/t1"}"#;
const CREATE_OWN: &str = r#"{"name":"own"}"#;
const INTRUDER: &str = "INTRUDER\n";
const MARKER: &str = r#"{"range":"bytes {L}-{L+9}/*","markers":["dropped"]}"#;

const STEP: &str = "/api/workflows/wf-b/runs/r1/steps/s1/logs";
const TRIGGER: &str = "/api/workflows/wf-b/triggers/t1/logs";

/// One row: the expected status per column, then the request: `METHOD path` (`{E}`, `{B}`,
/// `{missing}` are stream ids, `{STEP}` and `{TRIGGER}` the consumer routes above), headers and
/// body (`{L}`, `{L+8}`, `{L+9}`, `{end}`: the target stream's length and end when sent).
type Row = (
    [u16; COLUMNS],
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[rustfmt::skip]
const MATRIX: &[Row] = &[
    //  none mal  basic exp forg anon tamp  wOth wWf  wSib  rOth rWf  rSib rRig  wRig wTrg  coll colO  kAud kNol kOth kRig kC1  kC2   kAli kBob kCar kSA
    // Creating streams: in the victim's step context, as ebpf there, in its trigger context, in one's own.
    ([401, 401, 401, 401, 401, 401, 401,  403, 403, 403,  403, 403, 403, 403,  200, 403,  200, 403,  401, 403, 403, 200, 200, 403,  403, 403, 403, 403], "POST /logs", JSON, CREATE_V),
    ([401, 401, 401, 401, 401, 401, 401,  403, 403, 403,  403, 403, 403, 403,  403, 403,  200, 403,  401, 403, 403, 403, 200, 403,  403, 403, 403, 403], "POST /logs", JSON, CREATE_V_EBPF),
    // (The victim's trigger pod runs on n1 too, so its collector may create there.)
    ([401, 401, 401, 401, 401, 401, 401,  403, 403, 403,  403, 403, 403, 403,  403, 200,  200, 403,  401, 403, 403, 403, 200, 403,  403, 403, 403, 403], "POST /logs", JSON, CREATE_T),
    ([401, 401, 401, 401, 401, 401, 401,  200, 200, 200,  403, 403, 403, 403,  200, 200,  400, 400,  401, 403, 200, 200, 400, 400,  403, 403, 403, 403], "POST /logs", JSON, CREATE_OWN),
    // The entrypoint stream: status, plain, ranged, NDJSON and followed reads, a malformed query.
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  200, 404,  404, 404,  401, 403, 404, 200, 404, 404,  200, 404, 404, 200], "GET /logs/{E}", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  200, 404,  404, 404,  401, 403, 404, 200, 404, 404,  200, 404, 404, 200], "GET /logs/{E}/data", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 206,  206, 404,  404, 404,  401, 403, 404, 206, 404, 404,  206, 404, 404, 206], "GET /logs/{E}/data", RANGE, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  200, 404,  404, 404,  401, 403, 404, 200, 404, 404,  200, 404, 404, 200], "GET /logs/{E}/data", NDJSON, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  200, 404,  404, 404,  401, 403, 404, 200, 404, 404,  200, 404, 404, 200], "GET /logs/{E}/data?follow=true", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 400,  400, 404,  404, 404,  401, 403, 404, 400, 404, 404,  400, 404, 404, 400], "GET /logs/{E}/data?follow=maybe", NO, ""),
    // The collector's stream.
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  404, 404,  200, 404,  401, 403, 404, 404, 200, 404,  200, 404, 404, 200], "GET /logs/{B}", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  404, 404,  200, 404,  401, 403, 404, 404, 200, 404,  200, 404, 404, 200], "GET /logs/{B}/data", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 206,  404, 404,  206, 404,  401, 403, 404, 404, 206, 404,  206, 404, 404, 206], "GET /logs/{B}/data", RANGE, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  404, 404,  200, 404,  401, 403, 404, 404, 200, 404,  200, 404, 404, 200], "GET /logs/{B}/data?follow=true", NO, ""),
    // Streams that do not exist, or cannot: the same answer as a foreign stream.
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 404,  404, 404,  404, 404,  401, 403, 404, 404, 404, 404,  404, 404, 404, 404], "GET /logs/{missing}", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 404,  404, 404,  404, 404,  401, 403, 404, 404, 404, 404,  404, 404, 404, 404], "GET /logs/{missing}/data", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 404,  404, 404,  404, 404,  401, 403, 404, 404, 404, 404,  404, 404, 404, 404], "GET /logs/not-an-id", NO, ""),
    // Consumer API of the step.
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  200, 404,  404, 404,  401, 403, 404, 200, 404, 404,  200, 404, 404, 200], "GET {STEP}", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  200, 404,  404, 404,  401, 403, 404, 200, 404, 404,  200, 404, 404, 200], "GET {STEP}?stream=stdout", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  200, 404,  404, 404,  401, 403, 404, 200, 404, 404,  200, 404, 404, 200], "GET {STEP}?source=ebpf", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  200, 404,  404, 404,  401, 403, 404, 200, 404, 404,  200, 404, 404, 200], "GET {STEP}", NDJSON, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  200, 404,  404, 404,  401, 403, 404, 200, 404, 404,  200, 404, 404, 200], "GET {STEP}?follow=true", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  200, 404,  404, 404,  401, 403, 404, 200, 404, 404,  200, 404, 404, 200], "GET {STEP}?stream=stdout&follow=true", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 400,  400, 404,  404, 404,  401, 403, 404, 400, 404, 404,  400, 400, 400, 400], "GET {STEP}?follow=maybe", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  200, 404,  404, 404,  401, 403, 404, 200, 404, 404,  200, 404, 404, 200], "GET {STEP}/capture-report", NO, ""),
    // Consumer API of the trigger.
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  404, 200,  404, 404,  401, 403, 404, 404, 404, 404,  200, 404, 404, 200], "GET {TRIGGER}", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  404, 200,  404, 404,  401, 403, 404, 404, 404, 404,  200, 404, 404, 200], "GET {TRIGGER}?stream=stdout", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  404, 200,  404, 404,  401, 403, 404, 404, 404, 404,  200, 404, 404, 200], "GET {TRIGGER}?follow=true", NO, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 200,  404, 200,  404, 404,  401, 403, 404, 404, 404, 404,  200, 404, 404, 200], "GET {TRIGGER}/capture-report", NO, ""),
    // Writes to the entrypoint stream: append, ranged append at the end, a dropped marker.
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 403,  202, 404,  404, 404,  401, 403, 404, 202, 404, 404,  403, 404, 404, 403], "POST /logs/{E}/data", BYTES, INTRUDER),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 403,  202, 404,  404, 404,  401, 403, 404, 202, 404, 404,  403, 404, 404, 403], "PATCH /logs/{E}/data", AT_END, INTRUDER),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 403,  202, 404,  404, 404,  401, 403, 404, 202, 404, 404,  403, 404, 404, 403], "POST /logs/{E}/markers", JSON, MARKER),
    // Writes to the collector's stream.
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 403,  404, 404,  202, 404,  401, 403, 404, 404, 202, 404,  403, 404, 404, 403], "POST /logs/{B}/data", BYTES, INTRUDER),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 403,  404, 404,  202, 404,  401, 403, 404, 404, 202, 404,  403, 404, 404, 403], "PATCH /logs/{B}/data", AT_END, INTRUDER),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 403,  404, 404,  202, 404,  401, 403, 404, 404, 202, 404,  403, 404, 404, 403], "POST /logs/{B}/markers", JSON, MARKER),
    // Writes to streams that do not exist.
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 404,  404, 404,  404, 404,  401, 403, 404, 404, 404, 404,  404, 404, 404, 404], "POST /logs/{missing}/data", BYTES, INTRUDER),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 404,  404, 404,  404, 404,  401, 403, 404, 404, 404, 404,  404, 404, 404, 404], "POST /logs/{missing}/markers", JSON, MARKER),
    // No route deletes.
    ([405, 405, 405, 405, 405, 405, 405,  405, 405, 405,  405, 405, 405, 405,  405, 405,  405, 405,  405, 405, 405, 405, 405, 405,  405, 405, 405, 405], "DELETE /logs/{E}", NO, ""),
    // Public routes, whatever the credential; anything else is 404.
    ([200, 200, 200, 200, 200, 200, 200,  200, 200, 200,  200, 200, 200, 200,  200, 200,  200, 200,  200, 200, 200, 200, 200, 200,  200, 200, 200, 200], "GET /healthz", NO, ""),
    ([200, 200, 200, 200, 200, 200, 200,  200, 200, 200,  200, 200, 200, 200,  200, 200,  200, 200,  200, 200, 200, 200, 200, 200,  200, 200, 200, 200], "GET /readyz", NO, ""),
    ([200, 200, 200, 200, 200, 200, 200,  200, 200, 200,  200, 200, 200, 200,  200, 200,  200, 200,  200, 200, 200, 200, 200, 200,  200, 200, 200, 200], "GET /metrics", NO, ""),
    ([404, 404, 404, 404, 404, 404, 404,  404, 404, 404,  404, 404, 404, 404,  404, 404,  404, 404,  404, 404, 404, 404, 404, 404,  404, 404, 404, 404], "GET /openapi.json", NO, ""),
    // Finishing the streams, last: nothing can be appended afterwards.
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 403,  202, 404,  404, 404,  401, 403, 404, 202, 404, 404,  403, 404, 404, 403], "PATCH /logs/{E}/data", FINISH, ""),
    ([401, 401, 401, 401, 401, 401, 401,  404, 404, 404,  404, 404, 404, 403,  404, 404,  202, 404,  401, 403, 404, 404, 202, 404,  403, 404, 404, 403], "PATCH /logs/{B}/data", FINISH, ""),
];

/// The victim's streams and the ids a refused create must not have made.
struct Victim {
    e: String,
    b: String,
    et: String,
    missing: String,
    /// `probe` in [`V`] and [`T`], from either path: the creates above name it.
    probes: Vec<String>,
}

impl Victim {
    fn new(keys: &Keys) -> Self {
        let id = |ctx: &str, name: &str, source: &str| {
            keys.stream_id(&Context::stream(ctx).unwrap(), name, source)
        };
        Self {
            e: id(V, "stdout", "entrypoint"),
            b: id(V, "stdout", "ebpf"),
            et: id(T, "stdout", "entrypoint"),
            missing: id(V, "never-created", "entrypoint"),
            probes: [V, T]
                .iter()
                .flat_map(|c| ["entrypoint", "ebpf"].map(|s| id(c, "probe", s)))
                .collect(),
        }
    }

    fn ids(&self) -> impl Iterator<Item = &String> {
        [&self.e, &self.b, &self.et, &self.missing]
            .into_iter()
            .chain(&self.probes)
    }
}

/// One column's credential: the Authorization header it sends (`None`: no header), when this mode
/// has the column at all.
type Credentials = [Option<Option<String>>; COLUMNS];

fn column(name: &str) -> usize {
    TOKENS.iter().position(|t| *t == name).unwrap()
}

fn b64(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The HMAC columns, minted from the server's key file (and another key, for the forgeries).
fn hmac_credentials(server: &Server) -> Credentials {
    let keys = server.keys();
    let bearer = |t: String| Some(Some(format!("Bearer {t}")));
    let mut c: Credentials = std::array::from_fn(|_| None);
    let right = server.token(V, Scope::Write);
    let other = server.token(OTHER, Scope::Write);
    c[column("none")] = Some(None);
    c[column("malformed")] = bearer("not.a.jwt".into());
    c[column("basic")] = Some(Some(format!("Basic {right}")));
    let claims = |exp: u64| json!({"sub": V, "scope": "write", "aud": AUDIENCE, "iss": ISSUER, "iat": now(), "exp": exp});
    let expired = keys
        .sign(&Claims {
            sub: Context::stream(V).unwrap(),
            scope: Scope::Write,
            aud: AUDIENCE.into(),
            iss: ISSUER.into(),
            iat: now() - 7200,
            exp: now() - 3600,
        })
        .unwrap();
    c[column("expired")] = bearer(expired);
    let forged = Keys::from_secret(&[0x42; 32])
        .mint(V, Scope::Write, Duration::from_secs(3600))
        .unwrap();
    c[column("forged")] = bearer(forged);
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(now() + 3600))
    );
    c[column("alg-none")] = bearer(alg_none);
    let mut parts = other.split('.');
    let (head, _, sig) = (parts.next().unwrap(), parts.next(), parts.next().unwrap());
    c[column("tampered")] = bearer(format!("{head}.{}.{sig}", b64(&claims(now() + 3600))));
    for (col, ctx, scope) in [
        ("w-other", OTHER, Scope::Write),
        ("w-wf", "workflows/wf/runs/r1/steps/s1", Scope::Write),
        ("w-sibling", "workflows/wf-b/runs/r1/steps/s", Scope::Write),
        ("r-other", "workflows/other", Scope::Read),
        ("r-wf", "workflows/wf", Scope::Read),
        ("r-sibling", "workflows/wf-b/runs/r1/steps/s", Scope::Read),
        ("r-right", "workflows/wf-b", Scope::Read),
        ("w-right", V, Scope::Write),
        ("w-trigger", T, Scope::Write),
        ("coll", "workflows", Scope::Collector),
        ("coll-other", "workflows/other", Scope::Collector),
    ] {
        c[column(col)] = bearer(server.token(ctx, scope));
    }
    c
}

/// Writes the victim's streams with the victim's own HMAC tokens.
async fn seed(server: &Server, victim: &Victim) {
    let writer = server.client(&server.token(V, Scope::Write));
    assert_eq!(writer.stream("stdout").await, victim.e);
    writer
        .put_at(&victim.e, 0, format!("{SECRET}-entrypoint\n").as_bytes())
        .await;
    let collector = server.client(&server.token("workflows", Scope::Collector));
    let r = collector
        .create(json!({"name": "stdout", "source": "ebpf", "context": V}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    collector
        .put_at(&victim.b, 0, format!("{SECRET}-ebpf\n").as_bytes())
        .await;
    let trigger = server.client(&server.token(T, Scope::Write));
    assert_eq!(trigger.stream("stdout").await, victim.et);
    trigger
        .put_at(&victim.et, 0, format!("{SECRET}-trigger\n").as_bytes())
        .await;
}

/// What one request got.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

/// Everything that differs from what the matrix wants, collected over the whole run.
#[derive(Default)]
struct Findings {
    /// (row, column) → status received.
    got: BTreeMap<(usize, usize), u16>,
    wrong: Vec<String>,
    leaks: Vec<String>,
    stored: Vec<String>,
    /// Distinct bodies of `401` and `404` answers, with a cell that got each.
    bodies: BTreeMap<u16, BTreeMap<String, String>>,
}

struct Run<'a> {
    http: Client,
    url: String,
    victim: &'a Victim,
    /// An HMAC read token of every context, for the state before and after refused writes.
    admin: String,
    /// Strings no refused answer may contain, besides the credential sent.
    forbidden: Vec<String>,
}

impl Run<'_> {
    fn expand(&self, template: &str, target: Option<(u64, u64)>) -> String {
        let mut s = template
            .replace("{STEP}", STEP)
            .replace("{TRIGGER}", TRIGGER)
            .replace("{E}", &self.victim.e)
            .replace("{B}", &self.victim.b)
            .replace("{missing}", &self.victim.missing);
        if let Some((length, end)) = target {
            s = s
                .replace("{L}", &length.to_string())
                .replace("{L+8}", &(length + 8).to_string())
                .replace("{L+9}", &(length + 9).to_string())
                .replace("{end}", &end.to_string());
        }
        s
    }

    /// The stream a row's path names, if any.
    fn target(&self, path: &str) -> Option<&str> {
        [("{E}", &self.victim.e), ("{B}", &self.victim.b)]
            .into_iter()
            .find(|(p, _)| path.contains(p))
            .map(|(_, id)| id.as_str())
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .header(AUTHORIZATION, &self.admin)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Length and end of a stream, read with the admin token.
    async fn extent(&self, id: &str) -> (u64, u64) {
        let (status, body) = self.get(&format!("/logs/{id}")).await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        (v["length"].as_u64().unwrap(), v["end"].as_u64().unwrap())
    }

    /// The state of every victim stream (and of the ones a create would have made).
    async fn snapshot(&self) -> Vec<(String, u16, String)> {
        let mut out = Vec::new();
        for id in self.victim.ids() {
            let (status, body) = self.get(&format!("/logs/{id}")).await;
            out.push((id.clone(), status, body));
        }
        out
    }

    async fn send(&self, row: &Row, auth: Option<&str>) -> Answer {
        let (_, request, headers, body) = row;
        let (method, path) = request.split_once(' ').unwrap();
        let target = match self.target(path) {
            Some(id) if headers.iter().any(|(_, v)| v.contains('{')) || body.contains("{L") => {
                Some(self.extent(id).await)
            }
            _ => None,
        };
        let mut req = self
            .http
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{}", self.url, self.expand(path, None)),
            )
            .body(self.expand(body, target));
        for (name, value) in *headers {
            req = req.header(*name, self.expand(value, target));
        }
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        // A follower with access never ends: its status and headers are the answer.
        let body = if path.contains("follow=true") && r.status().is_success() {
            String::new()
        } else {
            r.text().await.unwrap()
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    /// Runs every row for every column this mode has.
    async fn matrix(&self, creds: &Credentials) -> Findings {
        let mut f = Findings::default();
        for (r, row) in MATRIX.iter().enumerate() {
            let (expect, request, headers, body) = row;
            let writes = request.starts_with("POST") || request.starts_with("PATCH");
            let mut before = None;
            for (c, cred) in creds.iter().enumerate() {
                let Some(auth) = cred else { continue };
                if writes && before.is_none() {
                    before = Some(self.snapshot().await);
                }
                let answer = self.send(row, auth.as_deref()).await;
                let cell = format!("{} × {}", label(request, headers, body), TOKENS[c]);
                f.got.insert((r, c), answer.status);
                if answer.status != expect[c] {
                    f.wrong.push(format!(
                        "{cell}: expected {}, got {}: {}",
                        expect[c],
                        answer.status,
                        excerpt(&answer.body)
                    ));
                }
                if answer.status >= 400 {
                    self.check_refusal(&cell, auth.as_deref(), &answer, &mut f);
                    if writes {
                        let after = self.snapshot().await;
                        if before.as_ref() != Some(&after) {
                            f.stored.push(format!(
                                "{cell}: refused with {} but the victim's streams changed",
                                answer.status
                            ));
                        }
                        before = Some(after);
                    }
                } else {
                    // An allowed write changes the state the next refusal is compared with.
                    before = None;
                    if !self.shows_victim(request, &answer) {
                        f.wrong.push(format!(
                            "{cell}: {} without the victim's stream: {}",
                            answer.status,
                            excerpt(&answer.body)
                        ));
                    }
                }
            }
        }
        f
    }

    /// Whether an allowed read of the victim's streams really answered with them (its bytes, or
    /// its stream ids in a status or report): a 200 alone could be an empty answer. Followers and
    /// the routes that name no victim stream are not read.
    fn shows_victim(&self, request: &str, a: &Answer) -> bool {
        let reads_victim = request.starts_with("GET ")
            && ["{E}", "{B}", "{STEP}", "{TRIGGER}"]
                .iter()
                .any(|p| request.contains(p))
            && !request.contains("follow=true");
        !reads_victim
            || a.body.contains(&SECRET[..4])
            || self.victim.ids().any(|id| a.body.contains(id.as_str()))
    }

    fn check_refusal(&self, cell: &str, auth: Option<&str>, a: &Answer, f: &mut Findings) {
        // The credential, and each of its parts long enough to mean something.
        let mut forbidden: Vec<&str> = self.forbidden.iter().map(String::as_str).collect();
        if let Some(auth) = auth {
            let token = auth.split_once(' ').map_or(auth, |(_, t)| t);
            forbidden.push(token);
            forbidden.extend(token.split('.').filter(|p| p.len() >= 16));
        }
        let mut texts = vec![("body".to_owned(), a.body.clone())];
        for (name, value) in &a.headers {
            let name = name.as_str();
            if name.starts_with("x-relay-") || name == "content-range" {
                f.leaks
                    .push(format!("{cell}: refused answer carries header {name}"));
            }
            texts.push((
                format!("header {name}"),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            ));
        }
        for (place, text) in &texts {
            let lower = text.to_lowercase();
            for bad in &forbidden {
                if lower.contains(&bad.to_lowercase()) {
                    f.leaks.push(format!(
                        "{cell}: {place} contains {:?}: {}",
                        excerpt(bad),
                        excerpt(text)
                    ));
                }
            }
        }
        if matches!(a.status, 401 | 404) {
            f.bodies
                .entry(a.status)
                .or_default()
                .entry(a.body.clone())
                .or_insert_with(|| cell.to_owned());
        }
    }
}

fn excerpt(s: &str) -> String {
    let s: String = s.chars().take(160).collect();
    s.replace('\n', "\\n")
}

/// The matrix as a table: each cell is the status received, `*` marks those that differ.
fn render(creds: &Credentials, f: &Findings) -> String {
    let cols: Vec<usize> = (0..COLUMNS).filter(|c| creds[*c].is_some()).collect();
    let width = MATRIX
        .iter()
        .map(|(_, req, h, b)| label(req, h, b).len())
        .max()
        .unwrap_or(0);
    let mut out = format!("{:width$}", "route \\ credential");
    for c in &cols {
        write!(out, " {:>w$}", TOKENS[*c], w = TOKENS[*c].len().max(4)).unwrap();
    }
    out.push('\n');
    for (r, (expect, req, h, b)) in MATRIX.iter().enumerate() {
        write!(out, "{:width$}", label(req, h, b)).unwrap();
        for c in &cols {
            let got = f.got.get(&(r, *c)).copied().unwrap_or_default();
            let mark = if got == expect[*c] { ' ' } else { '*' };
            write!(
                out,
                " {:>w$}",
                format!("{got}{mark}"),
                w = TOKENS[*c].len().max(4)
            )
            .unwrap();
        }
        out.push('\n');
    }
    out
}

/// A row's name: the request, and what sets it apart from rows of the same route.
fn label(request: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut s = request.to_owned();
    for (name, value) in headers {
        if *name != "content-type" {
            write!(s, " [{name}: {value}]").unwrap();
        }
    }
    match body {
        CREATE_V => s.push_str(" {context: V}"),
        CREATE_V_EBPF => s.push_str(" {source: ebpf, context: V}"),
        CREATE_T => s.push_str(" {context: T}"),
        CREATE_OWN => s.push_str(" {own context}"),
        _ => {}
    }
    s
}

/// Runs the matrix and fails listing every wrong status, leak and stored refusal.
async fn check(server: &Server, victim: &Victim, creds: &Credentials, extra_forbidden: &[String]) {
    let storage_dir: PathBuf = server.dir.clone();
    let mut forbidden: Vec<String> = victim.ids().cloned().collect();
    forbidden.extend(
        [
            "wf-b",
            SECRET,
            "streams/",
            "parts/",
            "index/",
            "object_store",
            "os error",
            "panicked",
            "TokenReview",
            "serviceaccount",
        ]
        .map(String::from),
    );
    forbidden.push(storage_dir.display().to_string());
    forbidden.extend_from_slice(extra_forbidden);
    let run = Run {
        http: Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
        url: server.url.clone(),
        victim,
        admin: format!("Bearer {}", server.token("workflows", Scope::Read)),
        forbidden,
    };
    let started = std::time::Instant::now();
    let mut f = run.matrix(creds).await;
    let cells = f.got.len();
    eprintln!(
        "{}\n{cells} cells in {:?}",
        render(creds, &f),
        started.elapsed()
    );
    for (status, bodies) in &f.bodies {
        if bodies.len() > 1 {
            let list: Vec<String> = bodies
                .iter()
                .map(|(body, cell)| format!("{} (first: {cell})", excerpt(body)))
                .collect();
            f.leaks.push(format!(
                "{status} answers differ, so they tell cases apart: {}",
                list.join(" | ")
            ));
        }
    }
    let expected_cells = MATRIX.len() * creds.iter().filter(|c| c.is_some()).count();
    assert_eq!(cells, expected_cells);
    let mut report = String::new();
    for (what, list) in [
        ("wrong status", &f.wrong),
        ("leak", &f.leaks),
        ("stored by a refused write", &f.stored),
    ] {
        let unique: BTreeSet<&String> = list.iter().collect();
        for line in unique {
            writeln!(report, "{what}: {line}").unwrap();
        }
    }
    assert!(report.is_empty(), "access matrix failures:\n{report}");
}

#[tokio::test]
async fn hmac_tokens() {
    let server = Server::start(&[]);
    let victim = Victim::new(&server.keys());
    seed(&server, &victim).await;
    check(&server, &victim, &hmac_credentials(&server), &[]).await;
}
/// Writes the victim's streams as the pods of `--auth kubernetes` do, so that each records its
/// namespace (which people's reads are authorized against): the step's with its pod's token, the
/// ebpf one with the collector's on the victim's node, the trigger's with the trigger pod's.
async fn seed_as_pods(
    bed: &common::kube_bed::Bed,
    victim: &Victim,
    step: &str,
    trigger: &str,
    collector: &str,
) {
    let writer = bed.http(step);
    assert_eq!(writer.stream("stdout").await, victim.e);
    writer
        .put_at(&victim.e, 0, format!("{SECRET}-entrypoint\n").as_bytes())
        .await;
    // The API learns where pods run from its watch: the collector may create the victim's ebpf
    // stream once it places the victim's pod on n1.
    let n1 = bed.http(collector);
    common::eventually(Duration::from_secs(30), "the victim pod on n1", || {
        let n1 = n1.clone();
        async move {
            let r = n1
                .create(json!({"name": "stdout", "source": "ebpf", "context": V}))
                .await;
            (r.status() == StatusCode::OK).then_some(())
        }
    })
    .await;
    n1.put_at(&victim.b, 0, format!("{SECRET}-ebpf\n").as_bytes())
        .await;
    let trigger = bed.http(trigger);
    assert_eq!(trigger.stream("stdout").await, victim.et);
    trigger
        .put_at(&victim.et, 0, format!("{SECRET}-trigger\n").as_bytes())
        .await;
}

/// The RBAC of the people columns (see [`TOKENS`]): a role to read pod logs, one to read pods,
/// and who has which where.
async fn grant_readers(bed: &common::kube_bed::Bed) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
    use kube::api::{Api, PostParams};

    let roles = Api::<ClusterRole>::all(bed.client.clone());
    for (name, resource) in [("pod-log-reader", "pods/log"), ("pod-reader", "pods")] {
        let role = serde_json::from_value(json!({
            "metadata": {"name": name},
            "rules": [{"apiGroups": [""], "resources": [resource], "verbs": ["get"]}],
        }))
        .unwrap();
        roles.create(&PostParams::default(), &role).await.unwrap();
    }
    for (ns, name, role, subject) in [
        (
            "tenant",
            "devs",
            "pod-log-reader",
            json!({"kind": "Group", "name": "tenant-devs", "apiGroup": "rbac.authorization.k8s.io"}),
        ),
        (
            "tenant",
            "bob",
            "pod-reader",
            json!({"kind": "User", "name": "bob", "apiGroup": "rbac.authorization.k8s.io"}),
        ),
        (
            "other",
            "carol",
            "pod-log-reader",
            json!({"kind": "User", "name": "carol", "apiGroup": "rbac.authorization.k8s.io"}),
        ),
        (
            "tenant",
            "viewer",
            "pod-log-reader",
            json!({"kind": "ServiceAccount", "name": "viewer", "namespace": "tenant"}),
        ),
    ] {
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [subject],
        }))
        .unwrap();
        Api::<RoleBinding>::namespaced(bed.client.clone(), ns)
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn kubernetes_tokens() {
    use common::kube_bed::{
        AUDIENCE as POD_AUDIENCE, Bed, COLLECTOR_NS, COLLECTOR_SA, TENANT, step_labels,
        trigger_labels,
    };

    let Some(bed) = Bed::start(&[]).await else {
        return;
    };
    bed.tenant("other", "runner").await;
    let victim_uid = bed
        .pod(
            TENANT,
            "victim",
            "runner",
            "n1",
            step_labels("wf-b", "r1", "s1"),
        )
        .await;
    let plain_uid = bed.pod(TENANT, "plain", "runner", "n1", json!({})).await;
    let other_uid = bed
        .pod(
            "other",
            "other",
            "runner",
            "n1",
            step_labels("other", "r1", "s1"),
        )
        .await;
    let trigger_uid = bed
        .pod(
            TENANT,
            "trigger",
            "runner",
            "n1",
            trigger_labels("wf-b", "t1"),
        )
        .await;
    let mut collectors = Vec::new();
    for node in ["n1", "n2"] {
        let name = format!("collector-{node}");
        let uid = bed
            .pod(COLLECTOR_NS, &name, COLLECTOR_SA, node, json!({}))
            .await;
        collectors.push(
            bed.token(COLLECTOR_NS, COLLECTOR_SA, &name, &uid, POD_AUDIENCE)
                .await,
        );
    }
    let victim = Victim::new(&bed.api.keys());
    let step_token = bed
        .token(TENANT, "runner", "victim", &victim_uid, POD_AUDIENCE)
        .await;
    let trigger_token = bed
        .token(TENANT, "runner", "trigger", &trigger_uid, POD_AUDIENCE)
        .await;
    seed_as_pods(&bed, &victim, &step_token, &trigger_token, &collectors[0]).await;

    let mut creds = hmac_credentials(&bed.api);
    let bearer = |t: &str| Some(Some(format!("Bearer {t}")));
    let pod_tokens = [
        ("k-aud", TENANT, "victim", &victim_uid, "some-other-service"),
        ("k-nolabel", TENANT, "plain", &plain_uid, POD_AUDIENCE),
        ("k-other", "other", "other", &other_uid, POD_AUDIENCE),
        ("k-right", TENANT, "victim", &victim_uid, POD_AUDIENCE),
    ];
    for (col, ns, pod, uid, audience) in pod_tokens {
        creds[column(col)] = bearer(&bed.token(ns, "runner", pod, uid, audience).await);
    }
    creds[column("k-coll-n1")] = bearer(&collectors[0]);
    creds[column("k-coll-n2")] = bearer(&collectors[1]);
    grant_readers(&bed).await;
    for user in ["alice", "bob", "carol"] {
        creds[column(&format!("k-{user}"))] = bearer(&bed.kube.user_token(user));
    }
    bed.account(TENANT, "viewer").await;
    creds[column("k-sa")] = bearer(&bed.account_token(TENANT, "viewer").await);
    // Besides the HMAC strings: the tenant's namespace and pod names, the kubeconfig.
    let extra = [
        format!("{TENANT}/victim"),
        "system:serviceaccount".to_owned(),
        bed.kube.dir().display().to_string(),
    ];
    check(&bed.api, &victim, &creds, &extra).await;
}
