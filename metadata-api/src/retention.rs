//! Retention: the streams of a context are deleted once nothing of any of them has been stored
//! for the configured age (`--retention`), index entries included.
//!
//! The replicas share the work without talking to each other: the sweep of each interval is
//! claimed with a conditional create (`claims/retention/{interval:016x}`), and only the replica
//! whose create succeeds sweeps. A sweep is idempotent: a stream's objects are deleted before its
//! index entry, so a sweep that dies halfway leaves the index naming what is left, and the next
//! interval's sweep (on any replica) finishes it.
//!
//! A context's age is its newest object's: a trigger that still writes keeps its whole history.
//! Workflows are swept one at a time, so memory follows the largest workflow, not the store.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    auth::{Context, Keys},
    store::{Deleted, Indexed, Store, StoreError, now_ms},
};

/// The settings of `--retention`.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Contexts nothing was stored in for this long are deleted.
    pub age: Duration,
    /// How often a sweep runs (on one replica).
    pub every: Duration,
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Contexts looked at.
    pub contexts: usize,
    /// Contexts deleted.
    pub deleted: usize,
    pub streams: usize,
    pub objects: usize,
}

/// Deletes the contexts in which nothing was stored before `cutoff_ms` (ms since the epoch).
pub async fn sweep(store: &Store, keys: &Keys, cutoff_ms: u64) -> Result<Swept, StoreError> {
    let id_of = |c: &Context, name: &str, source: crate::store::Source| {
        keys.stream_id(c, name, source.as_str())
    };
    let mut out = Swept::default();
    for workflow in store.indexed_workflows().await? {
        let Ok(under) = Context::prefix(&format!("workflows/{workflow}")) else {
            continue;
        };
        let mut contexts: BTreeMap<String, Vec<Indexed>> = BTreeMap::new();
        for e in store.indexed(Some(&under)).await? {
            contexts
                .entry(e.context.as_str().to_owned())
                .or_default()
                .push(e);
        }
        for entries in contexts.values() {
            out.contexts += 1;
            if !expired(store, &id_of, entries, cutoff_ms).await? {
                continue;
            }
            let Deleted { streams, objects } = store.delete_indexed(entries, &id_of).await?;
            out.deleted += 1;
            out.streams += streams;
            out.objects += objects;
            if let Some(e) = entries.first() {
                tracing::info!(context = %e.context, streams, objects, "Retention deleted a context.");
            }
        }
    }
    Ok(out)
}

/// Whether nothing of the streams of one context was stored at or after `cutoff_ms`.
async fn expired(
    store: &Store,
    id_of: &(dyn Fn(&Context, &str, crate::store::Source) -> String + Sync),
    entries: &[Indexed],
    cutoff_ms: u64,
) -> Result<bool, StoreError> {
    // A stream indexed since is young without a listing.
    if entries.iter().any(|e| e.indexed_ms >= cutoff_ms) {
        return Ok(false);
    }
    for e in entries {
        let id = id_of(&e.context, &e.name, e.source);
        if store
            .last_stored_ms(&id)
            .await?
            .is_some_and(|t| t >= cutoff_ms)
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Sweeps every `retention.every`, on whichever replica claims the interval first; runs until
/// the process ends. Failures are logged and retried at the next interval.
pub async fn run(store: Arc<Store>, keys: Keys, retention: Retention) {
    let every_ms = retention.every.as_millis().max(1) as u64;
    loop {
        // Sleep to the next interval's start: every replica wakes at about the same time, and
        // one wins the claim.
        let now = now_ms();
        let next = (now / every_ms + 1) * every_ms;
        tokio::time::sleep(Duration::from_millis(next - now)).await;
        let interval = now_ms() / every_ms;
        match store.claim("retention", interval).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot claim the retention sweep.");
                continue;
            }
        }
        let cutoff = SystemTime::now()
            .checked_sub(retention.age)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        match sweep(&store, &keys, cutoff).await {
            Ok(s) => tracing::info!(
                contexts = s.contexts,
                deleted = s.deleted,
                streams = s.streams,
                objects = s.objects,
                "Retention sweep done."
            ),
            Err(e) => {
                tracing::warn!(error = %e, "Retention sweep failed; the next one resumes it.")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use object_store::{ObjectStore, memory::InMemory, path::Path};

    use super::*;
    use crate::{
        metrics::Metrics,
        range::Span,
        store::{Source, StreamMeta},
    };

    struct Fixture {
        store: Store,
        keys: Keys,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let keys = Keys::load_or_create(&dir.path().join("key")).unwrap();
            let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
            let store = Store::new(os, Path::from("t"), Arc::new(Metrics::new()));
            Self {
                store,
                keys,
                _dir: dir,
            }
        }

        /// Writes `data` to stream `name` of `context` (created when missing); returns its id.
        async fn write(&self, context: &str, name: &str, data: &'static [u8]) -> String {
            let context = Context::stream(context).unwrap();
            let id = self.keys.stream_id(&context, name, "entrypoint");
            let meta = StreamMeta {
                context,
                name: name.into(),
                source: Source::Entrypoint,
                entrypoint_absent: None,
                namespace: None,
                pod: None,
            };
            let s = self.store.create(id.clone(), meta).await.unwrap();
            self.store
                .write(&s, None, Bytes::from_static(data), None)
                .await
                .unwrap();
            id
        }

        async fn exists(&self, id: &str) -> bool {
            self.store.last_stored_ms(id).await.unwrap().is_some()
        }
    }

    async fn pause() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn idle_contexts_are_deleted_whole_and_active_ones_kept() {
        let f = Fixture::new();
        let step = "workflows/w/runs/r1/steps/build";
        let out = f.write(step, "stdout", b"old\n").await;
        let err = f.write(step, "stderr", b"old\n").await;
        let other_run = f
            .write("workflows/w/runs/r2/steps/build", "stdout", b"x\n")
            .await;
        let trigger = f.write("workflows/v/triggers/t", "stdout", b"a\n").await;
        pause().await;
        let cutoff = now_ms();
        pause().await;
        // The trigger and the second run still write: they stay, whole.
        f.write("workflows/v/triggers/t", "stdout", b"b\n").await;
        f.write("workflows/w/runs/r2/steps/build", "stderr", b"y\n")
            .await;

        let none = sweep(&f.store, &f.keys, cutoff - 60_000).await.unwrap();
        assert_eq!((none.contexts, none.deleted), (3, 0));
        let swept = sweep(&f.store, &f.keys, cutoff).await.unwrap();
        assert_eq!((swept.contexts, swept.deleted, swept.streams), (3, 1, 2));
        assert!(swept.objects >= 4, "{swept:?}");
        for id in [&out, &err] {
            assert!(!f.exists(id).await, "{id} is deleted");
            assert!(f.store.open(id).await.unwrap().is_none());
        }
        let w = Context::prefix("workflows/w").unwrap();
        let left: Vec<String> = f
            .store
            .indexed(Some(&w))
            .await
            .unwrap()
            .iter()
            .map(|e| format!("{}/{}", e.context, e.name))
            .collect();
        assert_eq!(
            left,
            [
                "workflows/w/runs/r2/steps/build/stderr",
                "workflows/w/runs/r2/steps/build/stdout"
            ]
        );
        let s = f.store.open(&trigger).await.unwrap().unwrap();
        assert_eq!(
            f.store.read_all(&s, Span::new(0, 4)).await.unwrap(),
            &b"a\nb\n"[..]
        );
        assert!(f.exists(&other_run).await);
        // Again: nothing more to do.
        let again = sweep(&f.store, &f.keys, cutoff).await.unwrap();
        assert_eq!((again.contexts, again.deleted), (2, 0));
    }

    #[tokio::test]
    async fn a_sweep_that_died_halfway_is_finished_by_the_next() {
        let f = Fixture::new();
        let step = "workflows/w/runs/r/steps/s";
        let a = f.write(step, "stdout", b"1\n").await;
        let b = f.write(step, "stderr", b"2\n").await;
        pause().await;
        let cutoff = now_ms();
        // The sweep died after deleting one stream's objects, before its index entry.
        assert!(f.store.delete_stream(&a).await.unwrap() > 0);
        let swept = sweep(&f.store, &f.keys, cutoff).await.unwrap();
        assert_eq!((swept.deleted, swept.streams), (1, 2));
        assert!(!f.exists(&a).await && !f.exists(&b).await);
        assert!(f.store.indexed(None).await.unwrap().is_empty());
        // Deleting what is gone deletes nothing and fails nothing.
        assert_eq!(f.store.delete_stream(&a).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn one_replica_claims_each_interval() {
        let f = Fixture::new();
        assert!(f.store.claim("retention", 7).await.unwrap());
        assert!(!f.store.claim("retention", 7).await.unwrap());
        assert!(f.store.claim("retention", 8).await.unwrap());
        assert!(!f.store.claim("retention", 8).await.unwrap());
    }
}
