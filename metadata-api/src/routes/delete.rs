//! Deleting a workflow's, run's or trigger's streams.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
};

use super::{
    AppState, S,
    access::{Action, allows},
};
use crate::{
    auth::{Context, Principal},
    error::ApiError,
    store::Source,
};

/// Deletes every stream of `context` (a workflow, a run or a trigger) with a delete token that
/// covers it: each stream's objects, then its index entry. Idempotent, and a deletion cut short
/// (a crash, a storage error) is finished by asking again. A writer still writing there starts
/// its streams over.
async fn delete_context(
    s: Arc<AppState>,
    context: String,
    p: Principal,
) -> Result<Json<crate::store::Deleted>, ApiError> {
    let context = Context::prefix(&context).map_err(|e| ApiError::bad(e.to_string()))?;
    if !allows(&s, &p, Action::Delete(&context)) {
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

pub(super) async fn delete_workflow(
    State(s): S,
    Path(workflow): Path<String>,
    p: Principal,
) -> Result<Json<crate::store::Deleted>, ApiError> {
    delete_context(s, format!("workflows/{workflow}"), p).await
}

pub(super) async fn delete_run(
    State(s): S,
    Path((workflow, run)): Path<(String, String)>,
    p: Principal,
) -> Result<Json<crate::store::Deleted>, ApiError> {
    delete_context(s, format!("workflows/{workflow}/runs/{run}"), p).await
}

pub(super) async fn delete_trigger(
    State(s): S,
    Path((workflow, trigger)): Path<(String, String)>,
    p: Principal,
) -> Result<Json<crate::store::Deleted>, ApiError> {
    delete_context(s, format!("workflows/{workflow}/triggers/{trigger}"), p).await
}
