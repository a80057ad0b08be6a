//! Reads: a stream's status and bytes, and a step's or trigger's logs merged from both capture
//! paths, once or followed.

use std::sync::Arc;

use axum::{
    Json,
    body::Body,
    extract::{Path, Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;

use super::{
    AppState, NDJSON, S,
    access::{readable_context, user_may_read, visible},
};
use crate::{
    auth::Principal,
    error::ApiError,
    lines::{Lines, Window, parse_time, render},
    metrics::Metrics,
    range::{Span, parse_range_request},
    read::{Follow, Lane, Record, records},
    store::{Source, StoreError, Stream},
};

pub(super) async fn stream_status(
    State(s): S,
    Path(id): Path<String>,
    p: Principal,
) -> Result<Json<crate::store::Status>, ApiError> {
    let stream = visible(&s, &p, &id).await?;
    s.store.refresh(&stream).await?;
    Ok(Json(stream.status()))
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct ReadQuery {
    #[serde(default)]
    follow: bool,
    stream: Option<String>,
    source: Option<Source>,
    /// Bytes written at or after: an RFC 3339 time (UTC, `Z`) or a duration before now (`10m`).
    since: Option<String>,
    /// Bytes written at or before, in the same forms.
    until: Option<String>,
    /// The last N lines (of each stream; of the whole read too unless following).
    tail: Option<u64>,
    #[serde(default)]
    timestamps: bool,
    #[serde(default)]
    prefix: bool,
    limit_bytes: Option<u64>,
    /// A line per dropped range in plain text: on by default for step and trigger reads, off for
    /// a stream's bytes (whose plain form is the bytes alone).
    markers: Option<bool>,
    /// Only the streams of this pod (a trigger's replica), by name or UID.
    pod: Option<String>,
}

/// The window a trigger read without `since`, `until` or `tail` covers: a trigger's replicas
/// come and go for as long as its revision serves, so its whole history is not a sensible
/// default (Loki's LogCLI defaults to the last hour as well). Older lines are read by time.
const TRIGGER_DEFAULT_SINCE_MS: u64 = 60 * 60 * 1000;

impl ReadQuery {
    /// Whether a stream's plain read is rendered as lines rather than given as its bytes.
    fn wants_lines(&self) -> bool {
        self.timestamps
            || self.prefix
            || self.since.is_some()
            || self.until.is_some()
            || self.tail.is_some()
            || self.limit_bytes.is_some()
            || self.markers == Some(true)
    }

    /// Whether the read says where in time it starts or ends.
    fn chooses_window(&self) -> bool {
        self.since.is_some() || self.until.is_some() || self.tail.is_some()
    }

    /// The rendering these parameters ask for; `markers` when not said.
    fn lines(&self, markers: bool, default_container: &str) -> Result<Lines, ApiError> {
        let now = crate::store::now_ms();
        let time = |what: &str, v: &Option<String>| {
            v.as_deref()
                .map(|v| parse_time(what, v, now).map_err(ApiError::bad))
                .transpose()
        };
        Ok(Lines {
            timestamps: self.timestamps,
            prefix: self.prefix,
            markers: self.markers.unwrap_or(markers),
            since_ms: time("since", &self.since)?,
            until_ms: time("until", &self.until)?,
            tail: self.tail,
            limit_bytes: self.limit_bytes,
            default_container: default_container.to_owned(),
        })
    }
}

/// Where a read of `stream` begins for `since` and `tail`: the later of the two starts.
async fn start_of(s: &AppState, stream: &Stream, lines: &Lines) -> Result<u64, ApiError> {
    let mut at = 0;
    if let Some(ms) = lines.since_ms {
        at = at.max(s.store.offset_since(stream, ms).await?);
    }
    if let Some(n) = lines.tail {
        at = at.max(s.store.offset_of_last_lines(stream, n).await?);
    }
    Ok(at)
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

/// How a read's records become its body.
enum Form {
    /// The bytes alone, dropped ranges skipped.
    Bytes,
    /// Lines (see [`crate::lines`]).
    Lines(Lines),
    /// NDJSON records, in the window and up to the byte limit of `Lines`.
    Ndjson(Lines),
}

/// Turns records into a response body.
fn body_of(
    s: &AppState,
    recs: impl futures::Stream<Item = Result<Record, StoreError>> + Send + 'static,
    form: Form,
    following: bool,
) -> Body {
    let guard = following.then(|| {
        s.metrics.followers.inc();
        FollowerGuard(s.metrics.clone())
    });
    let out: futures::stream::BoxStream<'static, Result<Bytes, StoreError>> = match form {
        Form::Bytes => Box::pin(recs.map_ok(|r| match r {
            Record::Data { data, .. } => data,
            Record::Dropped { .. } => Bytes::new(),
        })),
        Form::Lines(lines) => Box::pin(render(recs, lines, following)),
        Form::Ndjson(lines) => Box::pin(async_stream::try_stream! {
            let mut window = Window::new(lines.since_ms, lines.until_ms);
            // The byte limit counts data bytes; the record that reaches it is cut.
            let mut left = lines.limit_bytes;
            futures::pin_mut!(recs);
            while let Some(r) = recs.next().await {
                let mut r = r?;
                if left == Some(0) {
                    break;
                }
                if !window.admits(&r) {
                    continue;
                }
                if let (Record::Data { data, .. }, Some(left)) = (&mut r, left.as_mut()) {
                    let take = (data.len() as u64).min(*left);
                    data.truncate(take as usize);
                    *left -= take;
                }
                yield r.to_ndjson();
            }
        }),
    };
    let out = out
        .map_ok(move |b| {
            let _keep = &guard;
            b
        })
        .try_filter(|b| futures::future::ready(!b.is_empty()))
        .inspect_err(|e| tracing::warn!(error = %e, "Read failed mid-stream."));
    Body::from_stream(out)
}

/// The `Content-Type` of a read rendered as lines.
const TEXT: &str = "text/plain; charset=utf-8";

/// The last segment of a context: the step or trigger, which a stream without a container
/// (`stdout`) belongs to in a prefix.
fn last_segment(context: &str) -> &str {
    context.rsplit('/').next().unwrap_or(context)
}

fn dropped_header(spans: &[Span]) -> HeaderValue {
    let list: Vec<String> = spans.iter().map(ToString::to_string).collect();
    HeaderValue::from_str(&list.join(",")).unwrap_or(HeaderValue::from_static(""))
}

pub(super) async fn read_stream(
    State(s): S,
    Path(id): Path<String>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    p: Principal,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
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
    if ranged && (q.since.is_some() || q.tail.is_some()) {
        return Err(ApiError::bad(
            "a Range cannot be combined with since or tail, which choose where the read starts",
        ));
    }
    let lines = q.lines(false, last_segment(stream.meta.context.as_str()))?;
    let start = if ranged {
        start
    } else {
        start_of(&s, &stream, &lines).await?
    };
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
    let (form, content_type) = if wants_ndjson(&headers) {
        (Form::Ndjson(lines), NDJSON)
    } else if q.wants_lines() {
        (Form::Lines(lines), TEXT)
    } else {
        (Form::Bytes, "application/octet-stream")
    };
    let recs = records(s.store.clone(), vec![lane], follow, |l| async move { l });
    let mut resp = Response::new(body_of(&s, recs, form, q.follow));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert("x-relay-length", HeaderValue::from(status.length));
    h.insert(
        "x-relay-complete",
        HeaderValue::from_static(if status.complete { "true" } else { "false" }),
    );
    h.insert("x-relay-dropped", dropped_header(&status.dropped_spans()));
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

async fn context_logs(
    s: Arc<AppState>,
    context: String,
    query: Result<Query<ReadQuery>, QueryRejection>,
    p: Principal,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let context = readable_context(&s, &p, &context)?;
    // Checked after the caller, as for a stream's data.
    let Query(q) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    let mut lines = q.lines(true, last_segment(context.as_str()))?;
    if context.is_trigger() && !q.chooses_window() {
        lines.since_ms = Some(crate::store::now_ms().saturating_sub(TRIGGER_DEFAULT_SINCE_MS));
    }
    if let Some(pod) = &q.pod
        && !contract::names::valid_pod_name(pod)
    {
        return Err(ApiError::bad(format!(
            "pod must be a pod's name or UID, not {pod:?}"
        )));
    }
    let pod = q.pod.clone();
    let p = Arc::new(p);
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
        let p = p.clone();
        move |mut lanes: Vec<Lane>| {
            let s = s.clone();
            let context = context.clone();
            let p = p.clone();
            let pod = pod.clone();
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
                        let st = s.store.open(&id).await.ok().flatten();
                        lane.primary = admitted(&s, &p, pod.as_deref(), st).await;
                    }
                    if let (None, Some(fb)) = (&lane.fallback, fallback) {
                        let id = s.keys.stream_id(&context, &lane.name, fb.as_str());
                        let st = s.store.open(&id).await.ok().flatten();
                        lane.fallback = admitted(&s, &p, pod.as_deref(), st).await;
                    }
                }
                lanes
            }
        }
    };
    let lanes: Vec<Lane> = names.into_iter().map(Lane::new).collect();
    let mut lanes = open(lanes).await;
    // Nothing to read is a 404, as `kubectl logs` of a missing pod is, unless the caller waits
    // for streams to come (a follower of a step that has not started). A person sees a context
    // only through streams they may read: none, and it is not there, followed or not.
    if (p.user.is_some() || !q.follow)
        && lanes
            .iter()
            .all(|l| l.primary.is_none() && l.fallback.is_none())
    {
        // Opening skips a stream it cannot read: ask again, so that storage that fails is a 5xx
        // and only streams that are not there (or not the caller's) are a 404.
        for lane in &lanes {
            for src in std::iter::once(primary).chain(fallback) {
                let id = s.keys.stream_id(&context, &lane.name, src.as_str());
                s.store.open(&id).await?;
            }
        }
        return Err(ApiError::NotFound);
    }
    let opened: Vec<Arc<Stream>> = lanes
        .iter()
        .flat_map(|l| l.primary.iter().chain(l.fallback.iter()))
        .cloned()
        .collect();
    for st in opened {
        s.store.refresh(&st).await?;
    }
    // Both paths hold a stream's bytes at the same offsets: either one finds where it begins.
    for lane in &mut lanes {
        if let Some(stream) = lane.primary.as_ref().or(lane.fallback.as_ref()) {
            lane.offset = start_of(&s, stream, &lines).await?;
        }
    }
    let follow = match (q.follow, context.is_trigger()) {
        (false, _) => Follow::No,
        (true, true) => Follow::Forever,
        (true, false) => Follow::UntilComplete,
    };
    let (form, content_type) = if wants_ndjson(&headers) {
        (Form::Ndjson(lines), NDJSON)
    } else {
        (Form::Lines(lines), TEXT)
    };
    let recs = records(s.store.clone(), lanes, follow, open);
    let mut resp = Response::new(body_of(&s, recs, form, q.follow));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(resp)
}

/// `st` when a context read includes it: of the pod asked for, if one was, and readable by the
/// caller (a person's right to read its namespace's pod logs, see [`user_may_read`]).
async fn admitted(
    s: &AppState,
    p: &Principal,
    pod: Option<&str>,
    st: Option<Arc<Stream>>,
) -> Option<Arc<Stream>> {
    let st = st?;
    if let Some(pod) = pod
        && !of_pod(&st.meta, pod)
    {
        return None;
    }
    match user_may_read(s, p, &st.meta).await {
        Ok(true) => Some(st),
        Ok(false) => None,
        Err(e) => {
            // Asked again when the lanes are next opened (a follower's next refresh).
            tracing::warn!(error = %e, "Cannot tell whether the caller may read a stream.");
            None
        }
    }
}

/// Whether a stream holds the output of `pod`, a pod's name or UID: the name it was recorded
/// with, or the UID in its name (a trigger's streams are `<container>.<pod uid>.stdout`, and
/// `.N` after that for a restart).
fn of_pod(meta: &crate::store::StreamMeta, pod: &str) -> bool {
    let mut parts = meta.name.split('.');
    let uid = parts.nth(1).filter(|_| parts.next().is_some());
    meta.pod.as_deref() == Some(pod) || uid == Some(pod)
}

pub(super) async fn trigger_logs(
    State(s): S,
    Path((workflow, trigger)): Path<(String, String)>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    p: Principal,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    context_logs(
        s,
        format!("workflows/{workflow}/triggers/{trigger}"),
        query,
        p,
        headers,
    )
    .await
}

pub(super) async fn step_logs(
    State(s): S,
    Path((workflow, run, step)): Path<(String, String, String)>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    p: Principal,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    context_logs(
        s,
        format!("workflows/{workflow}/runs/{run}/steps/{step}"),
        query,
        p,
        headers,
    )
    .await
}
