//! Appends (`POST`/`PATCH /logs/{id}/data`) and `dropped` markers (`POST /logs/{id}/markers`).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, Method, StatusCode, header},
};
use bytes::Bytes;
use contract::wire::{Markers, Written};

use super::{
    AppState, MAX_JSON, S,
    access::{Action, allows, visible},
    content_length,
    decode::decode_body,
    parse_json, read_body,
};
use crate::{
    auth::Principal,
    coding::Coding,
    error::ApiError,
    metrics::ReasonLabels,
    range::{ContentRange, Span},
    store::{Store, StoreError, Stream},
};

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

pub(super) async fn write_data(
    State(s): S,
    Path(id): Path<String>,
    method: Method,
    p: Principal,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Written>), ApiError> {
    let stream = visible(&s, &p, &id).await?;
    if !allows(&s, &p, Action::Write(&stream.meta)) {
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
pub(super) fn compact_when_due(store: &Arc<Store>, stream: &Arc<Stream>) {
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

fn written(stream: &Stream) -> (StatusCode, Json<Written>) {
    let st = stream.status();
    (
        StatusCode::ACCEPTED,
        Json(Written {
            length: st.length,
            end: st.end,
            complete: st.complete,
        }),
    )
}

pub(super) async fn add_markers(
    State(s): S,
    Path(id): Path<String>,
    p: Principal,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Written>), ApiError> {
    let stream = visible(&s, &p, &id).await?;
    if !allows(&s, &p, Action::Write(&stream.meta)) {
        return Err(ApiError::Forbidden("this token cannot write to the stream"));
    }
    let req: Markers = parse_json(&read_body(&s, &headers, body, MAX_JSON).await?)?;
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
    // A writer older than reasons sends none (an unknown one was refused as the body was read).
    let reason = req.reason.unwrap_or_default();
    s.store.mark_dropped(&stream, span, reason).await?;
    if let Some(t) = total {
        s.store.declare_final(&stream, t).await?;
    }
    compact_when_due(&s.store, &stream);
    Ok(written(&stream))
}
