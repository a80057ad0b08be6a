//! Capture reports: a step's or trigger's streams on both capture paths, compared.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
};

use super::{
    AppState, S,
    access::{readable_context, user_may_read},
};
use crate::{auth::Principal, error::ApiError, store::Source};

/// Names always looked for besides the context's index: streams created before the index existed.
const WELL_KNOWN: [&str; 2] = ["stdout", "stderr"];

/// The capture report of a context (see [`crate::report`]).
async fn capture_report(
    s: Arc<AppState>,
    context: String,
    p: Principal,
) -> Result<Json<crate::report::Report>, ApiError> {
    let context = readable_context(&s, &p, &context)?;
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
        if let Some(st) = s.store.open(&id).await?
            && user_may_read(&s, &p, &st.meta).await?
        {
            s.store.refresh(&st).await?;
            streams.push(st);
        }
    }
    // As for reads: a person sees a context only through streams they may read.
    if p.user.is_some() && streams.is_empty() {
        return Err(ApiError::NotFound);
    }
    Ok(Json(
        crate::report::build(&s.store, context.as_str(), streams).await?,
    ))
}

pub(super) async fn trigger_report(
    State(s): S,
    Path((workflow, trigger)): Path<(String, String)>,
    p: Principal,
) -> Result<Json<crate::report::Report>, ApiError> {
    capture_report(s, format!("workflows/{workflow}/triggers/{trigger}"), p).await
}

pub(super) async fn step_report(
    State(s): S,
    Path((workflow, run, step)): Path<(String, String, String)>,
    p: Principal,
) -> Result<Json<crate::report::Report>, ApiError> {
    capture_report(
        s,
        format!("workflows/{workflow}/runs/{run}/steps/{step}"),
        p,
    )
    .await
}
