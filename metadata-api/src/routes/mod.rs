//! HTTP routes: the router ([`app`], [`ROUTES`]) and what handlers share (state, bodies).
//!
//! - `access`: who the caller is (the [`Principal`](crate::auth::Principal) extractor) and
//!   what it may do (the one policy table);
//! - `create`: `POST /logs`;
//! - `write` (appends, markers) and `decode` (their compressed bodies);
//! - `settle`: the collector settles a dead writer's stream;
//! - `read`: a stream's status and bytes, a step's or trigger's logs;
//! - `report`: capture reports;
//! - `delete`: deleting a context's streams.

mod access;
mod create;
mod decode;
mod delete;
mod read;
mod report;
mod settle;
mod write;

use std::sync::Arc;

use axum::{
    Router,
    body::Body,
    extract::{MatchedPath, Request, State},
    http::{HeaderMap, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use bytes::Bytes;

use crate::{
    auth::Keys,
    error::ApiError,
    limits::Budget,
    metrics::{Metrics, RequestLabels},
    store::Store,
};
use {
    create::create_stream,
    delete::{delete_run, delete_trigger, delete_workflow},
    read::{read_stream, step_logs, stream_status, trigger_logs},
    report::{step_report, trigger_report},
    settle::settle_writer_gone,
    write::{add_markers, write_data},
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

fn valid_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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
