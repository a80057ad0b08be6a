//! HTTP routes.

use std::{
    io::Read,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{MatchedPath, Path, Query, Request, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use bytes::{Buf, Bytes};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::{
    auth::{Context, Keys, Principal, Scope},
    coding::Coding,
    error::ApiError,
    limits::Budget,
    metrics::{Metrics, ReasonLabels, RequestLabels},
    range::{ContentRange, Span, parse_range_request},
    read::{Follow, Lane, Record, records},
    store::{Source, Store, StoreError, Stream, StreamMeta},
};

/// Largest JSON request body (stream creation, markers).
const MAX_JSON: usize = 64 << 10;
pub const NDJSON: &str = "application/x-ndjson";

/// Every route and method the service answers; `openapi.json` is checked against this list.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/logs"),
    ("get", "/logs/{id}"),
    ("get", "/logs/{id}/data"),
    ("post", "/logs/{id}/data"),
    ("patch", "/logs/{id}/data"),
    ("post", "/logs/{id}/markers"),
    ("post", "/logs/{id}/settle"),
    ("delete", "/api/workflows/{workflow}"),
    ("delete", "/api/workflows/{workflow}/runs/{run}"),
    ("delete", "/api/workflows/{workflow}/triggers/{trigger}"),
    ("get", "/api/workflows/{workflow}/triggers/{trigger}/logs"),
    (
        "get",
        "/api/workflows/{workflow}/runs/{run}/steps/{step}/logs",
    ),
    (
        "get",
        "/api/workflows/{workflow}/triggers/{trigger}/logs/capture-report",
    ),
    (
        "get",
        "/api/workflows/{workflow}/runs/{run}/steps/{step}/logs/capture-report",
    ),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
];

/// Shared state of the service.
#[derive(Debug)]
pub struct AppState {
    pub store: Arc<Store>,
    pub keys: Keys,
    pub budget: Arc<Budget>,
    pub metrics: Arc<Metrics>,
    /// `/metrics` is served on its own listener (`--metrics-listen`), not by [`app`].
    pub metrics_apart: bool,
    /// The `kubernetes` auth mode's authenticator; `None` in `hmac` mode. Tokens that verify
    /// with [`keys`](Self::keys) are accepted in both modes.
    #[cfg(feature = "kubernetes")]
    pub kube: Option<Arc<crate::kube_auth::KubeAuth>>,
}

type S = State<Arc<AppState>>;

/// The service's router.
pub fn app(state: Arc<AppState>) -> Router {
    let router = Router::new();
    // With `--metrics-listen`, the metrics are served there only (`metrics_app`).
    let router = if state.metrics_apart {
        router
    } else {
        router.route("/metrics", get(render_metrics))
    };
    router
        .route("/logs", post(create_stream))
        .route("/logs/{id}", get(stream_status))
        .route(
            "/logs/{id}/data",
            get(read_stream).post(write_data).patch(write_data),
        )
        .route("/logs/{id}/markers", post(add_markers))
        .route("/logs/{id}/settle", post(settle_writer_gone))
        .route("/api/workflows/{workflow}", delete(delete_workflow))
        .route("/api/workflows/{workflow}/runs/{run}", delete(delete_run))
        .route(
            "/api/workflows/{workflow}/triggers/{trigger}",
            delete(delete_trigger),
        )
        .route(
            "/api/workflows/{workflow}/triggers/{trigger}/logs",
            get(trigger_logs),
        )
        .route(
            "/api/workflows/{workflow}/runs/{run}/steps/{step}/logs",
            get(step_logs),
        )
        .route(
            "/api/workflows/{workflow}/triggers/{trigger}/logs/capture-report",
            get(trigger_report),
        )
        .route(
            "/api/workflows/{workflow}/runs/{run}/steps/{step}/logs/capture-report",
            get(step_report),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .fallback(|| async { ApiError::NotFound })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// The router of `--metrics-listen`: `/metrics` and the probes.
pub fn metrics_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .fallback(|| async { ApiError::NotFound })
        .with_state(state)
}

async fn count_requests(State(s): S, req: Request, next: Next) -> Response {
    let route = match req.extensions().get::<MatchedPath>().map(|p| p.as_str()) {
        Some(p) => ROUTES
            .iter()
            .find(|(_, r)| *r == p)
            .map_or("other", |(_, r)| r),
        None => "unmatched",
    };
    let resp = next.run(req).await;
    s.metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

async fn render_metrics(State(s): S) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn principal(s: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::Unauthorized)?;
    let (scheme, token) = value.split_once(' ').ok_or(ApiError::Unauthorized)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::Unauthorized);
    }
    let token = token.trim();
    if let Some(p) = s.keys.verify(token) {
        return Ok(p);
    }
    #[cfg(feature = "kubernetes")]
    if let Some(kube) = &s.kube {
        return Ok(kube.authenticate(token).await?);
    }
    Err(ApiError::Unauthorized)
}

/// Whether `p`'s node restriction (kubernetes collectors) lets it touch `context`.
fn node_allows(s: &AppState, p: &Principal, context: &Context) -> bool {
    node_namespace(s, p, context).is_some()
}

/// What `p`'s node restriction says of `context`: `Some(None)` without one (no namespace known),
/// `Some(Some(ns))` when a pod of the context in namespace `ns` runs on the collector's node,
/// `None` when none does.
#[cfg(feature = "kubernetes")]
fn node_namespace(s: &AppState, p: &Principal, context: &Context) -> Option<Option<String>> {
    match (&p.node, &s.kube) {
        (None, _) => Some(None),
        (Some(node), Some(kube)) => kube.node_runs(node, context).map(Some),
        (Some(_), None) => None,
    }
}

#[cfg(not(feature = "kubernetes"))]
fn node_namespace(_: &AppState, p: &Principal, _: &Context) -> Option<Option<String>> {
    p.node.is_none().then_some(None)
}

fn valid_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn may_read(s: &AppState, p: &Principal, m: &StreamMeta) -> bool {
    match p.scope {
        Scope::Read => p.context.covers(&m.context),
        Scope::Write => p.context == m.context && m.source == Source::Entrypoint,
        // The same scope as for creating the stream: a collector token of `workflows/A` does
        // not reach the ebpf streams of `workflows/B`, even knowing their ids.
        Scope::Collector => {
            m.source == Source::Ebpf
                && p.context.covers(&m.context)
                && node_allows(s, p, &m.context)
        }
        Scope::Delete => false,
    }
}

fn may_write(s: &AppState, p: &Principal, m: &StreamMeta) -> bool {
    p.scope != Scope::Read && may_read(s, p, m)
}

/// Opens a stream the caller may see; 404 for anything else, so ids of others are not revealed.
async fn visible(s: &AppState, p: &Principal, id: &str) -> Result<Arc<Stream>, ApiError> {
    if !valid_id(id) {
        return Err(ApiError::NotFound);
    }
    match s.store.open(id).await? {
        Some(st) if may_read(s, p, &st.meta) => Ok(st),
        _ => Err(ApiError::NotFound),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

/// The body size a request's `Content-Length` declares, if it declares one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads a body of at most `limit` bytes, which must arrive within the deadline its declared
/// size allows (`Content-Length`, else `limit`): a client trickling a body holds its connection
/// only that long.
async fn read_body(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = content_length(headers).map_or(limit as u64, |n| n.min(limit as u64));
    let deadline = s.budget.limits().body_deadline(Some(declared));
    let Ok(read) = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await else {
        s.metrics.body_timeouts.inc();
        return Err(ApiError::BodyTimeout(deadline));
    };
    read.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::TooLarge(format!("request body exceeds {limit} bytes"))
        } else {
            ApiError::bad("failed to read request body")
        }
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    name: String,
    source: Option<Source>,
    context: Option<String>,
    /// Collector tokens only: see [`StreamMeta::entrypoint_absent`].
    entrypoint_absent: Option<String>,
}

/// Longest note a collector may leave on why a container has no entrypoint stream.
const MAX_ABSENT_NOTE: usize = 256;

#[derive(Debug, Serialize)]
struct CreateResponse {
    id: String,
    name: String,
    source: Source,
    context: Context,
    length: u64,
    end: u64,
    complete: bool,
}

async fn create_stream(
    State(s): S,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<CreateResponse>, ApiError> {
    let p = principal(&s, &headers).await?;
    let req: CreateRequest = parse_json(&read_body(&s, &headers, body, MAX_JSON).await?)?;
    if !crate::names::valid_stream_name(&req.name) {
        return Err(ApiError::bad(
            "name must be 1-64 characters of [A-Za-z0-9._-]",
        ));
    }
    if let Some(note) = &req.entrypoint_absent {
        if p.scope != Scope::Collector {
            return Err(ApiError::Forbidden(
                "only collector tokens say why an entrypoint stream is absent",
            ));
        }
        if note.len() > MAX_ABSENT_NOTE || note.chars().any(char::is_control) {
            return Err(ApiError::bad(
                "entrypoint_absent must be at most 256 bytes without control characters",
            ));
        }
    }
    let (context, source, namespace) = match p.scope {
        Scope::Read => return Err(ApiError::Forbidden("read tokens cannot create streams")),
        Scope::Delete => return Err(ApiError::Forbidden("delete tokens cannot create streams")),
        Scope::Write => {
            if req
                .context
                .as_deref()
                .is_some_and(|c| c != p.context.as_str())
            {
                return Err(ApiError::Forbidden(
                    "write tokens create streams only in their own context",
                ));
            }
            match req.source.unwrap_or(Source::Entrypoint) {
                Source::Entrypoint => (p.context.clone(), Source::Entrypoint, p.namespace.clone()),
                Source::Ebpf => {
                    return Err(ApiError::Forbidden(
                        "only collector tokens create ebpf streams",
                    ));
                }
            }
        }
        Scope::Collector => {
            let ctx = req
                .context
                .as_deref()
                .ok_or_else(|| ApiError::bad("collector requests must name a context"))?;
            let ctx = Context::stream(ctx).map_err(|e| ApiError::bad(e.to_string()))?;
            if !p.context.covers(&ctx) && p.context.as_str() != "workflows" {
                return Err(ApiError::Forbidden(
                    "context is outside this collector's scope",
                ));
            }
            let Some(namespace) = node_namespace(&s, &p, &ctx) else {
                return Err(ApiError::Forbidden(
                    "no pod of this context runs on the collector's node",
                ));
            };
            match req.source.unwrap_or(Source::Ebpf) {
                Source::Ebpf => (ctx, Source::Ebpf, namespace),
                Source::Entrypoint => {
                    return Err(ApiError::Forbidden(
                        "collector tokens create only ebpf streams",
                    ));
                }
            }
        }
    };
    let id = s.keys.stream_id(&context, &req.name, source.as_str());
    let stream = s
        .store
        .create(
            id,
            StreamMeta {
                context,
                name: req.name,
                source,
                entrypoint_absent: req.entrypoint_absent,
                namespace,
            },
        )
        .await?;
    let st = stream.status();
    Ok(Json(CreateResponse {
        id: st.id,
        name: st.name,
        source: st.source,
        context: st.context,
        length: st.length,
        end: st.end,
        complete: st.complete,
    }))
}

#[derive(Debug, Serialize)]
struct WriteResponse {
    length: u64,
    end: u64,
    complete: bool,
}

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
async fn decode_body(coding: Coding, body: Bytes, max: usize) -> Result<Bytes, ApiError> {
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

/// The write time a writer gives a part (`x-relay-written`: ms since the Unix epoch of its first
/// byte). A time later than the receive time by more than [`WRITTEN_AHEAD`] is a writer's clock
/// gone wrong: the receive time stands in for it rather than the bytes being refused, as a
/// refusal would cost them. A header that is not a number is a writer's bug: refused.
fn written_at(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(crate::headers::WRITTEN) else {
        return Ok(None);
    };
    let ms: u64 = v
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            ApiError::bad("x-relay-written must be the milliseconds since the Unix epoch")
        })?;
    let now = crate::store::now_ms();
    Ok(Some(if ms > now + WRITTEN_AHEAD.as_millis() as u64 {
        now
    } else {
        ms
    }))
}

/// How far ahead of the API's clock a writer's may run before its times are not believed.
const WRITTEN_AHEAD: Duration = Duration::from_secs(300);

async fn write_data(
    State(s): S,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<WriteResponse>), ApiError> {
    let p = principal(&s, &headers).await?;
    let stream = visible(&s, &p, &id).await?;
    if !may_write(&s, &p, &stream.meta) {
        return Err(ApiError::Forbidden("this token cannot write to the stream"));
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default();
        let essence = ct.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/octet-stream") {
            return Err(ApiError::UnsupportedMedia(format!(
                "Content-Type must be application/octet-stream, not {ct:?}"
            )));
        }
    }
    let coding = match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str()) {
        None => Coding::Identity,
        Some(Ok(v)) => v.parse::<Coding>().map_err(|_| {
            ApiError::UnsupportedMedia(format!(
                "Content-Encoding must be gzip, zstd or identity, not {v:?}"
            ))
        })?,
        Some(Err(_)) => {
            return Err(ApiError::UnsupportedMedia(
                "Content-Encoding must be gzip, zstd or identity".into(),
            ));
        }
    };
    let range = match headers.get(header::CONTENT_RANGE) {
        Some(v) => Some(ContentRange::parse(
            v.to_str()
                .map_err(|_| ApiError::bad("Content-Range is not ASCII"))?,
        )?),
        None if method == Method::PATCH => {
            return Err(ApiError::bad("PATCH requires a Content-Range header"));
        }
        None => None,
    };
    let written_ms = written_at(&headers)?;
    let limits = *s.budget.limits();
    let declared = content_length(&headers);
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        s.metrics
            .rejected("too_large", declared.unwrap_or_default());
        return Err(ApiError::TooLarge(format!(
            "request body exceeds {} bytes",
            limits.max_body
        )));
    }
    let throttled = |s: &AppState, t: crate::limits::Throttled, bytes: u64| {
        s.metrics
            .throttled
            .get_or_create(&ReasonLabels {
                reason: t.budget.as_str(),
            })
            .inc();
        s.metrics.rejected("throttled", bytes);
        ApiError::Throttled {
            budget: t.budget.as_str(),
            retry_after: t.retry_after,
        }
    };
    let wire = declared.unwrap_or(limits.max_body as u64);
    // Back before its `Retry-After`: refused again, the body left unread.
    s.budget
        .check_retry_after(&stream.id)
        .map_err(|t| throttled(&s, t, wire))?;
    // Over its rate: refused before the body is read. At least the declared length arrives
    // unless compressed; a compressed body brings at least a byte.
    let at_least = match declared {
        Some(0) => 0,
        Some(n) if coding == Coding::Identity => n,
        _ => 1,
    };
    let tenant = stream.meta.tenant();
    s.budget
        .precheck(&stream.id, &tenant, at_least)
        .map_err(|t| throttled(&s, t, wire))?;
    let _permit = s
        .budget
        .admit(&stream.id, &tenant, wire)
        .map_err(|t| throttled(&s, t, wire))?;
    let raw = read_body(&s, &headers, body, limits.max_body).await?;
    let data: Bytes = if coding == Coding::Identity {
        raw
    } else {
        let wire = raw.len() as u64;
        decode_body(coding, raw, limits.max_decoded)
            .await
            .inspect_err(|e| {
                if matches!(e, ApiError::TooLarge(_)) {
                    s.metrics.rejected("too_large", wire);
                }
            })?
    };
    let n = data.len() as u64;
    let (start, total) = match range {
        Some(ContentRange::Bytes { start, end, total }) => {
            if end - start != n {
                s.metrics.rejected("bad_range", n);
                return Err(ApiError::bad(format!(
                    "Content-Range covers {} bytes but the body has {n}",
                    end - start
                )));
            }
            (Some(start), total)
        }
        Some(ContentRange::Final { total }) => {
            if n != 0 {
                return Err(ApiError::bad(
                    "`bytes */N` requests must have an empty body",
                ));
            }
            s.store
                .declare_final(&stream, total)
                .await
                .map_err(|e| match e {
                    StoreError::FinalLength { .. } => ApiError::RangeNotSatisfiable(e.to_string()),
                    e => e.into(),
                })?;
            compact_when_due(&s.store, &stream);
            return Ok(written(&stream));
        }
        None => (None, None),
    };
    if n > 0 {
        s.budget
            .charge(&stream.id, &tenant, n)
            .map_err(|t| throttled(&s, t, n))?;
    }
    let t = Instant::now();
    let result = s
        .store
        .write_timed(&stream, start, data, total, written_ms)
        .await;
    match &result {
        Ok(_) => {
            s.metrics.bytes_accepted.inc_by(n);
        }
        Err(StoreError::Conflict { .. }) => s.metrics.rejected("conflict", n),
        Err(StoreError::Storage(_)) => s.metrics.rejected("storage", n),
        Err(_) => s.metrics.rejected("bad_range", n),
    }
    result.map_err(|e| match e {
        // A declared length below what is stored is a range problem, not a conflict.
        StoreError::FinalLength { .. } if total.is_some() => {
            ApiError::RangeNotSatisfiable(e.to_string())
        }
        e => e.into(),
    })?;
    tracing::debug!(stream = %stream.id, bytes = n, elapsed_ms = t.elapsed().as_millis() as u64, "Stored part.");
    compact_when_due(&s.store, &stream);
    Ok(written(&stream))
}

/// Merges the stream's parts into segments in the background once a segment's worth of bytes is
/// stored (or the stream is complete): its object count then follows its bytes, not its writes.
fn compact_when_due(store: &Arc<Store>, stream: &Arc<Stream>) {
    if !store.wants_compaction(stream) {
        return;
    }
    let (store, stream) = (Arc::clone(store), Arc::clone(stream));
    tokio::spawn(async move {
        match store.compact(&stream).await {
            Ok(c) => tracing::debug!(
                stream = %stream.id,
                segments = c.segments,
                removed = c.removed,
                "Merged parts into segments."
            ),
            Err(e) => tracing::warn!(
                stream = %stream.id,
                error = %e,
                "Cannot merge parts into segments; tried again after a write 30 s on."
            ),
        }
    });
}

fn written(stream: &Stream) -> (StatusCode, Json<WriteResponse>) {
    let st = stream.status();
    (
        StatusCode::ACCEPTED,
        Json(WriteResponse {
            length: st.length,
            end: st.end,
            complete: st.complete,
        }),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkerRequest {
    range: String,
    markers: Vec<String>,
}

async fn add_markers(
    State(s): S,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<WriteResponse>), ApiError> {
    let p = principal(&s, &headers).await?;
    let stream = visible(&s, &p, &id).await?;
    if !may_write(&s, &p, &stream.meta) {
        return Err(ApiError::Forbidden("this token cannot write to the stream"));
    }
    let req: MarkerRequest = parse_json(&read_body(&s, &headers, body, MAX_JSON).await?)?;
    if req.markers.is_empty() {
        return Err(ApiError::bad("markers must name at least one marker"));
    }
    if let Some(bad) = req.markers.iter().find(|m| m.as_str() != "dropped") {
        return Err(ApiError::bad(format!(
            "unknown marker {bad:?}; the only marker is \"dropped\""
        )));
    }
    let (span, total) = match ContentRange::parse(&req.range)? {
        ContentRange::Bytes { start, end, total } => (Span::new(start, end), total),
        ContentRange::Final { .. } => {
            return Err(ApiError::bad("a marker needs a byte range, not `*`"));
        }
    };
    s.store.mark_dropped(&stream, span).await?;
    if let Some(t) = total {
        s.store.declare_final(&stream, t).await?;
    }
    compact_when_due(&s.store, &stream);
    Ok(written(&stream))
}

/// How long the entrypoint's stream of an output must have received nothing before it is
/// settled: requests its writer sent just before it died may still be on their way.
const SETTLE_QUIET: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize)]
struct SettleResponse {
    /// Ids of the other path's streams of this output that will be settled.
    settling: Vec<String>,
}

/// `POST /logs/{id}/settle`: the collector says that the container whose output this (complete)
/// `ebpf` stream holds is gone. Its writer on the other path (the entrypoint, inside the same
/// container) died with it; if that stream never got its final length, it is settled once quiet
/// for [`SETTLE_QUIET`] (see [`crate::store::Store::settle`]): what it left pending becomes
/// dropped, its final length is the one the collector saw, and followers are released.
async fn settle_writer_gone(
    State(s): S,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<SettleResponse>), ApiError> {
    let p = principal(&s, &headers).await?;
    let stream = visible(&s, &p, &id).await?;
    if p.scope != Scope::Collector
        || stream.meta.source != Source::Ebpf
        || !may_write(&s, &p, &stream.meta)
    {
        return Err(ApiError::Forbidden(
            "only the collector settles, through a stream of its own",
        ));
    }
    s.store.refresh(&stream).await?;
    let Some(total) = stream.status().final_length else {
        return Err(ApiError::Conflict(
            "declare this stream's final length first: it is what the other path is settled to"
                .to_owned(),
        ));
    };
    let ctx = &stream.meta.context;
    let mut settling = Vec::new();
    // The entrypoint's stream of this output, to the length the collector saw...
    let mut targets = vec![(stream.meta.name.clone(), Some(total))];
    // ...and of the container's other output when the collector has no stream of it (the
    // container wrote nothing there): to what the entrypoint stored or dropped of it.
    if let Some(other) = other_output(&stream.meta.name)
        && s.store
            .open(&s.keys.stream_id(ctx, &other, Source::Ebpf.as_str()))
            .await?
            .is_none()
    {
        targets.push((other, None));
    }
    for (name, total) in targets {
        let id = s.keys.stream_id(ctx, &name, Source::Entrypoint.as_str());
        let Some(sibling) = s.store.open(&id).await? else {
            continue;
        };
        if sibling.status().final_length.is_some() {
            continue;
        }
        settle_when_quiet(s.store.clone(), sibling, total.unwrap_or(0));
        settling.push(id);
    }
    let code = if settling.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((code, Json(SettleResponse { settling })))
}

/// The name of the container's other output: `stderr` for `stdout` and back, with the same
/// container prefix and generation.
fn other_output(name: &str) -> Option<String> {
    let (base, generation) = crate::report::split_generation(name);
    let other = if let Some(prefix) = base.strip_suffix("stdout") {
        format!("{prefix}stderr")
    } else {
        format!("{}stdout", base.strip_suffix("stderr")?)
    };
    Some(if generation == 0 {
        other
    } else {
        format!("{other}.{generation}")
    })
}

/// Settles `sibling` to `total` (at least what it holds) once it has received nothing for
/// [`SETTLE_QUIET`].
fn settle_when_quiet(store: Arc<Store>, sibling: Arc<Stream>, total: u64) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = store.refresh(&sibling).await {
                tracing::warn!(stream = %sibling.id, error = %e, "Cannot settle a stream.");
                return;
            }
            let last = sibling.status().last_received_ms.unwrap_or(0);
            let quiet_until = last + SETTLE_QUIET.as_millis() as u64;
            let now = crate::store::now_ms();
            if now >= quiet_until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(quiet_until - now)).await;
        }
        let settled = store.settle(&sibling, total).await;
        compact_when_due(&store, &sibling);
        match settled {
            Ok(Some(at)) => tracing::info!(
                stream = %sibling.id,
                writer_died_at = at,
                final_length = total,
                "Settled a stream whose writer died."
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(stream = %sibling.id, error = %e, "Cannot settle a stream."),
        }
    });
}

async fn stream_status(
    State(s): S,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<crate::store::Status>, ApiError> {
    let p = principal(&s, &headers).await?;
    let stream = visible(&s, &p, &id).await?;
    s.store.refresh(&stream).await?;
    Ok(Json(stream.status()))
}

#[derive(Debug, Deserialize, Default)]
struct ReadQuery {
    #[serde(default)]
    follow: bool,
    stream: Option<String>,
    source: Option<Source>,
}

fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().starts_with(NDJSON)))
}

struct FollowerGuard(Arc<Metrics>);

impl Drop for FollowerGuard {
    fn drop(&mut self) {
        self.0.followers.dec();
    }
}

/// Turns records into a response body: plain bytes, or NDJSON records.
fn body_of(
    s: &AppState,
    recs: impl futures::Stream<Item = Result<Record, StoreError>> + Send + 'static,
    ndjson: bool,
    following: bool,
) -> Body {
    let guard = following.then(|| {
        s.metrics.followers.inc();
        FollowerGuard(s.metrics.clone())
    });
    let out = recs
        .map_ok(move |r| {
            let _keep = &guard;
            if ndjson {
                r.to_ndjson()
            } else {
                match r {
                    Record::Data { data, .. } => data,
                    Record::Dropped { .. } => Bytes::new(),
                }
            }
        })
        .try_filter(|b| futures::future::ready(!b.is_empty()))
        .inspect_err(|e| tracing::warn!(error = %e, "Read failed mid-stream."));
    Body::from_stream(out)
}

fn dropped_header(spans: &[Span]) -> HeaderValue {
    let list: Vec<String> = spans.iter().map(ToString::to_string).collect();
    HeaderValue::from_str(&list.join(",")).unwrap_or(HeaderValue::from_static(""))
}

async fn read_stream(
    State(s): S,
    Path(id): Path<String>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let p = principal(&s, &headers).await?;
    let stream = visible(&s, &p, &id).await?;
    // Only once the caller may see the stream: a bad query does not get past a missing token.
    let Query(q) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    s.store.refresh(&stream).await?;
    let status = stream.status();
    let (start, end) = match headers.get(header::RANGE) {
        Some(v) => {
            let (a, b) = parse_range_request(
                v.to_str()
                    .map_err(|_| ApiError::bad("Range is not ASCII"))?,
            )?;
            (a, b)
        }
        None => (0, None),
    };
    let ranged = headers.contains_key(header::RANGE);
    if ranged && !q.follow && start >= status.length.max(1) && !(start == 0 && status.length == 0) {
        let mut resp = ApiError::RangeNotSatisfiable(format!(
            "range starts at {start}; {} bytes are readable",
            status.length
        ))
        .into_response();
        resp.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes */{}", status.length))
                .unwrap_or(HeaderValue::from_static("bytes */0")),
        );
        return Ok(resp);
    }
    // A plain read stops at what is readable now; a follower goes on to the end.
    let stop = if q.follow {
        end
    } else {
        Some(end.map_or(status.length, |e| e.min(status.length)))
    };
    let lane = Lane {
        name: stream.meta.name.clone(),
        primary: Some(stream.clone()),
        fallback: None,
        offset: start,
        end: stop,
    };
    let follow = if q.follow {
        Follow::UntilComplete
    } else {
        Follow::No
    };
    let ndjson = wants_ndjson(&headers);
    let recs = records(s.store.clone(), vec![lane], follow, |l| async move { l });
    let mut resp = Response::new(body_of(&s, recs, ndjson, q.follow));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if ndjson {
            NDJSON
        } else {
            "application/octet-stream"
        }),
    );
    h.insert("x-relay-length", HeaderValue::from(status.length));
    h.insert(
        "x-relay-complete",
        HeaderValue::from_static(if status.complete { "true" } else { "false" }),
    );
    h.insert("x-relay-dropped", dropped_header(&status.dropped));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if ranged && !q.follow {
        let last = stop.unwrap_or(status.length).max(start + 1) - 1;
        let total = status
            .final_length
            .map_or("*".to_owned(), |n| n.to_string());
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{last}/{total}")) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

/// The context a consumer request names, when the caller may read it: read tokens covering it,
/// write tokens of exactly it. 404 otherwise, as for stream ids: do not reveal whether a foreign
/// context has logs.
async fn readable_context(
    s: &AppState,
    headers: &HeaderMap,
    context: &str,
) -> Result<Context, ApiError> {
    let p = principal(s, headers).await?;
    let context = Context::stream(context).map_err(|e| ApiError::bad(e.to_string()))?;
    let allowed = match p.scope {
        Scope::Read => p.context.covers(&context),
        Scope::Write => p.context == context,
        Scope::Collector | Scope::Delete => false,
    };
    if !allowed {
        return Err(ApiError::NotFound);
    }
    Ok(context)
}

/// Deletes every stream of `context` (a workflow, a run or a trigger) with a delete token that
/// covers it: each stream's objects, then its index entry. Idempotent, and a deletion cut short
/// (a crash, a storage error) is finished by asking again. A writer still writing there starts
/// its streams over.
async fn delete_context(
    s: Arc<AppState>,
    context: String,
    headers: HeaderMap,
) -> Result<Json<crate::store::Deleted>, ApiError> {
    let p = principal(&s, &headers).await?;
    let context = Context::prefix(&context).map_err(|e| ApiError::bad(e.to_string()))?;
    if p.scope != Scope::Delete || !p.context.covers(&context) {
        return Err(ApiError::Forbidden(
            "deleting needs a delete token of this context or one above it",
        ));
    }
    let entries = s.store.indexed(Some(&context)).await?;
    let id_of =
        |c: &Context, name: &str, source: Source| s.keys.stream_id(c, name, source.as_str());
    let deleted = s.store.delete_indexed(&entries, &id_of).await?;
    tracing::info!(%context, streams = deleted.streams, objects = deleted.objects, "Deleted a context.");
    Ok(Json(deleted))
}

async fn delete_workflow(
    State(s): S,
    Path(workflow): Path<String>,
    headers: HeaderMap,
) -> Result<Json<crate::store::Deleted>, ApiError> {
    delete_context(s, format!("workflows/{workflow}"), headers).await
}

async fn delete_run(
    State(s): S,
    Path((workflow, run)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<crate::store::Deleted>, ApiError> {
    delete_context(s, format!("workflows/{workflow}/runs/{run}"), headers).await
}

async fn delete_trigger(
    State(s): S,
    Path((workflow, trigger)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<crate::store::Deleted>, ApiError> {
    delete_context(
        s,
        format!("workflows/{workflow}/triggers/{trigger}"),
        headers,
    )
    .await
}

/// Names always looked for besides the context's index: streams created before the index existed.
const WELL_KNOWN: [&str; 2] = ["stdout", "stderr"];

/// The capture report of a context (see [`crate::report`]).
async fn capture_report(
    s: Arc<AppState>,
    context: String,
    headers: HeaderMap,
) -> Result<Json<crate::report::Report>, ApiError> {
    let context = readable_context(&s, &headers, &context).await?;
    let mut wanted = s.store.context_streams(&context).await?;
    for name in WELL_KNOWN {
        for src in [Source::Entrypoint, Source::Ebpf] {
            if !wanted.iter().any(|(s, n)| *s == src && n == name) {
                wanted.push((src, name.to_owned()));
            }
        }
    }
    let mut streams = Vec::with_capacity(wanted.len());
    for (src, name) in wanted {
        let id = s.keys.stream_id(&context, &name, src.as_str());
        if let Some(st) = s.store.open(&id).await? {
            s.store.refresh(&st).await?;
            streams.push(st);
        }
    }
    Ok(Json(
        crate::report::build(&s.store, context.as_str(), streams).await?,
    ))
}

async fn trigger_report(
    State(s): S,
    Path((workflow, trigger)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<crate::report::Report>, ApiError> {
    capture_report(
        s,
        format!("workflows/{workflow}/triggers/{trigger}"),
        headers,
    )
    .await
}

async fn step_report(
    State(s): S,
    Path((workflow, run, step)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Json<crate::report::Report>, ApiError> {
    capture_report(
        s,
        format!("workflows/{workflow}/runs/{run}/steps/{step}"),
        headers,
    )
    .await
}

async fn context_logs(
    s: Arc<AppState>,
    context: String,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let context = readable_context(&s, &headers, &context).await?;
    // Checked after the caller, as for a stream's data.
    let Query(q) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    let every_stream = q.stream.is_none();
    let names: Vec<String> = match q.stream {
        Some(name) if crate::names::valid_stream_name(&name) => vec![name],
        Some(other) => {
            return Err(ApiError::bad(format!(
                "stream must be a stream name such as stdout or <container>.stderr, not {other:?}"
            )));
        }
        // Every stream of the context, from either path: `stdout` and `stderr` (single-process
        // writers) first, then the per-container ones (`<container>.stdout`, generations `.N`)
        // in name order, so a stream only the collector saw (a sidecar, a pod admitted before
        // its tenant's tools were ready) is served from the ebpf path.
        None => {
            let mut names: Vec<String> = vec!["stdout".to_owned(), "stderr".to_owned()];
            let listed = s.store.context_streams(&context).await?;
            for (_, name) in listed {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            names
        }
    };
    let (primary, fallback) = match q.source {
        None => (Source::Entrypoint, Some(Source::Ebpf)),
        Some(src) => (src, None),
    };
    let open = {
        let s = s.clone();
        let context = context.clone();
        move |mut lanes: Vec<Lane>| {
            let s = s.clone();
            let context = context.clone();
            async move {
                // A follower of every stream also picks up the streams created since it began:
                // a container that starts later, a restart's next generation. A listing that
                // fails now is tried again at the next refresh.
                if every_stream && let Ok(listed) = s.store.context_streams(&context).await {
                    for (_, name) in listed {
                        if !lanes.iter().any(|l| l.name == name) {
                            lanes.push(Lane::new(name));
                        }
                    }
                }
                for lane in &mut lanes {
                    if lane.primary.is_none() {
                        let id = s.keys.stream_id(&context, &lane.name, primary.as_str());
                        lane.primary = s.store.open(&id).await.ok().flatten();
                    }
                    if let (None, Some(fb)) = (&lane.fallback, fallback) {
                        let id = s.keys.stream_id(&context, &lane.name, fb.as_str());
                        lane.fallback = s.store.open(&id).await.ok().flatten();
                    }
                }
                lanes
            }
        }
    };
    let lanes: Vec<Lane> = names.into_iter().map(Lane::new).collect();
    let lanes = open(lanes).await;
    let opened: Vec<Arc<Stream>> = lanes
        .iter()
        .flat_map(|l| l.primary.iter().chain(l.fallback.iter()))
        .cloned()
        .collect();
    for st in opened {
        s.store.refresh(&st).await?;
    }
    let follow = match (q.follow, context.is_trigger()) {
        (false, _) => Follow::No,
        (true, true) => Follow::Forever,
        (true, false) => Follow::UntilComplete,
    };
    let ndjson = wants_ndjson(&headers);
    let recs = records(s.store.clone(), lanes, follow, open);
    let mut resp = Response::new(body_of(&s, recs, ndjson, q.follow));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if ndjson {
            NDJSON
        } else {
            "text/plain; charset=utf-8"
        }),
    );
    Ok(resp)
}

async fn trigger_logs(
    State(s): S,
    Path((workflow, trigger)): Path<(String, String)>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    context_logs(
        s,
        format!("workflows/{workflow}/triggers/{trigger}"),
        query,
        headers,
    )
    .await
}

async fn step_logs(
    State(s): S,
    Path((workflow, run, step)): Path<(String, String, String)>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    context_logs(
        s,
        format!("workflows/{workflow}/runs/{run}/steps/{step}"),
        query,
        headers,
    )
    .await
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_other_output_keeps_the_container_prefix_and_the_generation() {
        assert_eq!(other_output("stdout").as_deref(), Some("stderr"));
        assert_eq!(
            other_output("build.stderr").as_deref(),
            Some("build.stdout")
        );
        assert_eq!(
            other_output("build.stdout.2").as_deref(),
            Some("build.stderr.2")
        );
        assert_eq!(other_output("notes"), None);
    }

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
