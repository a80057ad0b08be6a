//! Who may do what, in one place: the caller's credentials (a bearer token, verified with the
//! service's keys or, in `--auth kubernetes` mode, with TokenReview) as an extractor, and the
//! rules of access to streams and contexts as one table ([`allows`]) beside the rules for new
//! streams, which also decide where they go ([`creation`]).

use std::sync::Arc;

use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, header, request::Parts},
};

use super::{AppState, valid_id};
use crate::{
    auth::{Context, Principal, Scope},
    error::ApiError,
    store::{Source, Stream, StreamMeta},
};

/// The caller of a route: `401` before the handler runs when its token is missing or invalid.
impl FromRequestParts<Arc<AppState>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        s: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        principal(s, &parts.headers).await
    }
}

async fn principal(s: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .or_else(|| headers.get(contract::headers::PROXIED_AUTHORIZATION))
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
    if let Some(kube) = &s.kube {
        return Ok(kube.authenticate(token).await?);
    }
    Err(ApiError::Unauthorized)
}

/// What a caller asks to do, and to what.
#[derive(Debug, Clone, Copy)]
pub(super) enum Action<'a> {
    /// Read a stream's status or bytes.
    Read(&'a StreamMeta),
    /// Append to a stream, mark its dropped ranges.
    Write(&'a StreamMeta),
    /// Settle the entrypoint stream of a dead writer through this (ebpf) stream.
    Settle(&'a StreamMeta),
    /// Read a step's or trigger's logs, or its capture report.
    ReadContext(&'a Context),
    /// Delete a workflow's, run's or trigger's streams.
    Delete(&'a Context),
}

/// The access policy: whether `p` may do `action`.
pub(super) fn allows(s: &AppState, p: &Principal, action: Action<'_>) -> bool {
    match (p.scope, action) {
        (Scope::Read, Action::Read(m)) => p.context.covers(&m.context),
        (Scope::Read, Action::ReadContext(c)) => p.context.covers(c),
        // A writer reads back what it wrote (a restarted one resumes after it), in its context.
        (Scope::Write, Action::Read(m) | Action::Write(m)) => {
            p.context == m.context && m.source == Source::Entrypoint
        }
        (Scope::Write, Action::ReadContext(c)) => p.context == *c,
        // The same scope as for creating the stream: a collector token of `workflows/A` does
        // not reach the ebpf streams of `workflows/B`, even knowing their ids.
        (Scope::Collector, Action::Read(m) | Action::Write(m) | Action::Settle(m)) => {
            m.source == Source::Ebpf
                && p.context.covers(&m.context)
                && node_allows(s, p, &m.context)
        }
        (Scope::Delete, Action::Delete(c)) => p.context.covers(c),
        _ => false,
    }
}

/// Whether `p` may say, creating a stream, why the other path's stream is absent.
pub(super) fn may_explain_absence(p: &Principal) -> Result<(), ApiError> {
    if p.scope != Scope::Collector {
        return Err(ApiError::Forbidden(
            "only collector tokens say why an entrypoint stream is absent",
        ));
    }
    Ok(())
}

/// Where a stream `p` creates goes: its context, source and namespace. `context` and `source`
/// are what the request asked for.
pub(super) fn creation(
    s: &AppState,
    p: &Principal,
    context: Option<&str>,
    source: Option<Source>,
) -> Result<(Context, Source, Option<String>), ApiError> {
    match p.scope {
        Scope::Read => Err(ApiError::Forbidden("read tokens cannot create streams")),
        Scope::Delete => Err(ApiError::Forbidden("delete tokens cannot create streams")),
        Scope::Write => {
            if context.is_some_and(|c| c != p.context.as_str()) {
                return Err(ApiError::Forbidden(
                    "write tokens create streams only in their own context",
                ));
            }
            match source.unwrap_or(Source::Entrypoint) {
                Source::Entrypoint => {
                    Ok((p.context.clone(), Source::Entrypoint, p.namespace.clone()))
                }
                Source::Ebpf => Err(ApiError::Forbidden(
                    "only collector tokens create ebpf streams",
                )),
            }
        }
        Scope::Collector => {
            let ctx =
                context.ok_or_else(|| ApiError::bad("collector requests must name a context"))?;
            let ctx = Context::stream(ctx).map_err(|e| ApiError::bad(e.to_string()))?;
            if !p.context.covers(&ctx) && p.context.as_str() != "workflows" {
                return Err(ApiError::Forbidden(
                    "context is outside this collector's scope",
                ));
            }
            let Some(namespace) = node_namespace(s, p, &ctx) else {
                return Err(ApiError::Forbidden(
                    "no pod of this context runs on the collector's node",
                ));
            };
            match source.unwrap_or(Source::Ebpf) {
                Source::Ebpf => Ok((ctx, Source::Ebpf, namespace)),
                Source::Entrypoint => Err(ApiError::Forbidden(
                    "collector tokens create only ebpf streams",
                )),
            }
        }
    }
}

/// Whether `p`'s node restriction (kubernetes collectors) lets it touch `context`.
fn node_allows(s: &AppState, p: &Principal, context: &Context) -> bool {
    node_namespace(s, p, context).is_some()
}

/// What `p`'s node restriction says of `context`: `Some(None)` without one (no namespace known),
/// `Some(Some(ns))` when a pod of the context in namespace `ns` runs on the collector's node,
/// `None` when none does.
fn node_namespace(s: &AppState, p: &Principal, context: &Context) -> Option<Option<String>> {
    match (&p.node, &s.kube) {
        (None, _) => Some(None),
        (Some(node), Some(kube)) => kube.node_runs(node, context).map(Some),
        (Some(_), None) => None,
    }
}

/// Opens a stream the caller may read; 404 for anything else, so ids of others are not revealed.
pub(super) async fn visible(
    s: &AppState,
    p: &Principal,
    id: &str,
) -> Result<Arc<Stream>, ApiError> {
    if !valid_id(id) {
        return Err(ApiError::NotFound);
    }
    match s.store.open(id).await? {
        Some(st)
            if allows(s, p, Action::Read(&st.meta)) && user_may_read(s, p, &st.meta).await? =>
        {
            Ok(st)
        }
        _ => Err(ApiError::NotFound),
    }
}

/// For a person of the `kubernetes` auth mode, whether the API server's authorizer lets them
/// `get pods/log` in the namespace of the stream's pod (see [`crate::kube_auth`]); `true` for
/// every other principal, whom [`allows`] alone decides. A stream of no known namespace is
/// nobody's to read this way.
pub(super) async fn user_may_read(
    s: &AppState,
    p: &Principal,
    meta: &StreamMeta,
) -> Result<bool, ApiError> {
    let Some(user) = &p.user else {
        return Ok(true);
    };
    match (&s.kube, &meta.namespace) {
        (Some(kube), Some(ns)) => Ok(kube.may_read_logs(user, ns).await?),
        _ => Ok(false),
    }
}

/// The context a step or trigger read names, when `p` may read it; 404 otherwise, as for streams.
pub(super) fn readable_context(
    s: &AppState,
    p: &Principal,
    context: &str,
) -> Result<Context, ApiError> {
    let context = Context::stream(context).map_err(|e| ApiError::bad(e.to_string()))?;
    if !allows(s, p, Action::ReadContext(&context)) {
        return Err(ApiError::NotFound);
    }
    Ok(context)
}
