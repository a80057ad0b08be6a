//! `POST /logs/{id}/settle`: the collector settles the entrypoint stream of a writer that died.

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use serde::Serialize;

use super::{
    S,
    access::{Action, allows, visible},
    write::compact_when_due,
};
use crate::{
    auth::Principal,
    error::ApiError,
    store::{Source, Store, Stream},
};

/// How long the entrypoint's stream of an output must have received nothing before it is
/// settled: requests its writer sent just before it died may still be on their way.
const SETTLE_QUIET: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize)]
pub(super) struct SettleResponse {
    /// Ids of the other path's streams of this output that will be settled.
    settling: Vec<String>,
}

/// `POST /logs/{id}/settle`: the collector says that the container whose output this (complete)
/// `ebpf` stream holds is gone. Its writer on the other path (the entrypoint, inside the same
/// container) died with it; if that stream never got its final length, it is settled once quiet
/// for [`SETTLE_QUIET`] (see [`crate::store::Store::settle`]): what it left pending becomes
/// dropped, its final length is the one the collector saw, and followers are released.
pub(super) async fn settle_writer_gone(
    State(s): S,
    Path(id): Path<String>,
    p: Principal,
) -> Result<(StatusCode, Json<SettleResponse>), ApiError> {
    let stream = visible(&s, &p, &id).await?;
    if !allows(&s, &p, Action::Settle(&stream.meta)) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
