//! `POST /logs`: creating a stream (idempotent: a stream's id follows from its context, name
//! and source).

use axum::{Json, body::Body, extract::State, http::HeaderMap};
use contract::wire::{CreateStream, Created};

use super::{
    MAX_JSON, S,
    access::{creation, may_explain_absence},
    parse_json, read_body,
};
use crate::{auth::Principal, error::ApiError, store::StreamMeta};

/// Longest note a collector may leave on why a container has no entrypoint stream.
const MAX_ABSENT_NOTE: usize = 256;

pub(super) async fn create_stream(
    State(s): S,
    p: Principal,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Created>, ApiError> {
    let req: CreateStream = parse_json(&read_body(&s, &headers, body, MAX_JSON).await?)?;
    if !crate::names::valid_stream_name(&req.name) {
        return Err(ApiError::bad(
            "name must be 1-64 characters of [A-Za-z0-9._-]",
        ));
    }
    if let Some(note) = &req.entrypoint_absent {
        may_explain_absence(&p)?;
        if note.len() > MAX_ABSENT_NOTE || note.chars().any(char::is_control) {
            return Err(ApiError::bad(
                "entrypoint_absent must be at most 256 bytes without control characters",
            ));
        }
    }
    if let Some(pod) = &req.pod
        && !contract::names::valid_pod_name(pod)
    {
        return Err(ApiError::bad(
            "pod must be a pod name: at most 253 characters of [a-z0-9.-]",
        ));
    }
    let (context, source, namespace) = creation(&s, &p, req.context.as_deref(), req.source)?;
    // A pod's own token says which pod it is; other writers (collectors, key-file tokens) say.
    let pod = p.pod.clone().or(req.pod);
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
                pod,
            },
        )
        .await?;
    let st = stream.status();
    Ok(Json(Created {
        id: st.id,
        name: st.name,
        source: st.source,
        context: st.context.to_string(),
        length: st.length,
        end: st.end,
        complete: st.complete,
    }))
}
