//! The context index (`index/{context}/{source}/{hex(name)}`), retention's claims, and deleting
//! streams with their index entries.

use super::*;

impl Store {
    pub(super) fn index_dir(&self, context: &Context) -> Path {
        let mut p = self.prefix.clone().join("index");
        for seg in context.as_str().split('/') {
            p = p.join(seg);
        }
        p
    }

    /// `index/{context}/{source}/{hex(name)}`: names may be `.` or `..`, which are not path segments.
    pub(super) fn index_key(&self, meta: &StreamMeta) -> Path {
        self.index_dir(&meta.context)
            .join(meta.source.as_str())
            .join(hex::encode(meta.name.as_bytes()))
    }

    /// The streams created in `context` (by this version or later: older streams are indexed when
    /// their writer creates them again), as (source, name), sorted.
    pub async fn context_streams(
        &self,
        context: &Context,
    ) -> Result<Vec<(Source, String)>, StoreError> {
        // The context's own streams only: a context is never a prefix of another stream's.
        let mut out: Vec<(Source, String)> = self
            .indexed(Some(context))
            .await?
            .into_iter()
            .filter(|e| e.context == *context)
            .map(|e| (e.source, e.name))
            .collect();
        out.sort_by(|a, b| (&a.1, a.0.as_str()).cmp(&(&b.1, b.0.as_str())));
        out.dedup();
        Ok(out)
    }

    /// The streams indexed under `under` (every stream when `None`), with when each was indexed.
    pub async fn indexed(&self, under: Option<&Context>) -> Result<Vec<Indexed>, StoreError> {
        let root = self.prefix.clone().join("index");
        let dir = under.map_or_else(|| root.clone(), |c| self.index_dir(c));
        let depth = root.parts().count();
        let metas: Vec<object_store::ObjectMeta> = self
            .timed("list", self.os.list(Some(&dir)).try_collect())
            .await?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let segs: Vec<String> = m
                    .location
                    .parts()
                    .skip(depth)
                    .map(|p| p.as_ref().to_owned())
                    .collect();
                let [context @ .., source, name] = segs.as_slice() else {
                    return None;
                };
                let context = Context::stream(&context.join("/")).ok()?;
                let source = match source.as_str() {
                    "entrypoint" => Source::Entrypoint,
                    "ebpf" => Source::Ebpf,
                    _ => return None,
                };
                let name = String::from_utf8(hex::decode(name).ok()?).ok()?;
                Some(Indexed {
                    context,
                    source,
                    name,
                    indexed_ms: m.last_modified.timestamp_millis().max(0) as u64,
                    key: m.location,
                })
            })
            .collect())
    }

    /// When anything of stream `id` was last stored (ms since the epoch), `None` when nothing is.
    pub async fn last_stored_ms(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let prefix = self.prefix.clone().join("streams").join(id);
        let metas: Vec<object_store::ObjectMeta> = self
            .timed("list", self.os.list(Some(&prefix)).try_collect())
            .await?;
        Ok(metas
            .iter()
            .map(|m| m.last_modified.timestamp_millis().max(0) as u64)
            .max())
    }

    /// The workflows that have indexed streams.
    pub async fn indexed_workflows(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.prefix.clone().join("index").join("workflows");
        let listed = self
            .timed("list", self.os.list_with_delimiter(Some(&dir)))
            .await?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }

    /// Claims run `n` of a periodic `kind` of work among the replicas sharing the storage (a
    /// conditional create of `claims/{kind}/{n:016x}`): true for the one replica that made it.
    /// The claims of earlier runs are removed.
    pub async fn claim(&self, kind: &str, n: u64) -> Result<bool, StoreError> {
        let dir = self.prefix.clone().join("claims").join(kind);
        let key = dir.clone().join(format!("{n:016x}"));
        let create = PutOptions::from(PutMode::Create);
        match self
            .timed("put", self.os.put_opts(&key, PutPayload::new(), create))
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        let old: Vec<Path> = self
            .timed("list", self.os.list(Some(&dir)).try_collect::<Vec<_>>())
            .await?
            .into_iter()
            .map(|m| m.location)
            .filter(|l| *l != key)
            .collect();
        for l in old {
            if let Err(e) = self.timed("delete", self.os.delete(&l)).await {
                tracing::debug!(claim = %l, error = %e, "An old claim stays.");
            }
        }
        Ok(true)
    }

    /// Deletes every object of stream `id` and forgets it here; returns how many were deleted.
    /// Idempotent: deleting a stream that is gone deletes nothing.
    pub async fn delete_stream(&self, id: &str) -> Result<usize, StoreError> {
        let prefix = self.prefix.clone().join("streams").join(id);
        let paths: Vec<Path> = self
            .timed(
                "list",
                self.os
                    .list(Some(&prefix))
                    .map_ok(|m| m.location)
                    .try_collect(),
            )
            .await?;
        let n = paths.len();
        let results: Vec<object_store::Result<Path>> = self
            .os
            .delete_stream(futures::stream::iter(paths.into_iter().map(Ok)).boxed())
            .collect()
            .await;
        for r in results {
            match r {
                // Deleted meanwhile by another replica.
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.streams.remove(id);
        Ok(n)
    }

    /// Deletes the streams of `entries` (from [`Store::indexed`]): each stream's objects first,
    /// then its index entry, so that after a crash halfway the index still names what is left and
    /// deleting again finishes. `id_of` names the stream of (context, name, source).
    pub async fn delete_indexed(
        &self,
        entries: &[Indexed],
        id_of: &(dyn Fn(&Context, &str, Source) -> String + Sync),
    ) -> Result<Deleted, StoreError> {
        let mut out = Deleted::default();
        for e in entries {
            out.objects += self
                .delete_stream(&id_of(&e.context, &e.name, e.source))
                .await?;
            match self.timed("delete", self.os.delete(&e.key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            out.streams += 1;
        }
        Ok(out)
    }
}
