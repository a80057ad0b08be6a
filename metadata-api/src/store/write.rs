//! The write path: a part stored with a conditional put and checked against other replicas (see
//! the notes of [`super`]), the writers' registrations, and the markers: `dropped`, the final
//! length, and settling a stream whose writer died.

use super::*;

impl Store {
    /// Checks `data` (bytes at `start`) against the stored parts in `parts` that overlap it.
    /// Returns the keys of the parts that are gone from storage.
    pub(super) async fn compare(
        &self,
        parts: &[Part],
        start: u64,
        data: &[u8],
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let mine = Span::new(start, start + data.len() as u64);
        let mut gone = Vec::new();
        for p in parts {
            if !p.span.overlaps(&mine) {
                continue;
            }
            let ov = Span::new(p.span.start.max(mine.start), p.span.end.min(mine.end));
            let theirs = match self.get_piece(ov, p).await {
                Ok(b) => b,
                // Removed since the listing: its writer lost a race and never acknowledged it.
                Err(StoreError::Storage(object_store::Error::NotFound { .. })) => {
                    gone.push(key_of(p.span));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let ours = &data[(ov.start - start) as usize..(ov.end - start) as usize];
            if theirs.as_ref() != ours {
                return Err(StoreError::Conflict { span: ov });
            }
        }
        Ok(gone)
    }

    /// Stores `data` at `start`; when `total` is given, also declares the final length.
    ///
    /// With `start` of `None` the bytes are appended after everything stored, dropped or being
    /// written now.
    pub async fn write(
        &self,
        stream: &Stream,
        start: Option<u64>,
        data: Bytes,
        total: Option<u64>,
    ) -> Result<Written, StoreError> {
        self.write_timed(stream, start, data, total, None).await
    }

    /// [`Store::write`] of bytes whose first one was written at `written_ms` (ms since the Unix
    /// epoch), as their writer says: the time goes into the names of the part's objects (see
    /// [`part_name`]). `None`: the receive time stands in for it, and the names carry none.
    pub async fn write_timed(
        &self,
        stream: &Stream,
        start: Option<u64>,
        data: Bytes,
        total: Option<u64>,
        written_ms: Option<u64>,
    ) -> Result<Written, StoreError> {
        let len = data.len() as u64;
        // Reserve the range against concurrent writers in this process, then see what overlaps.
        let (reservation, overlapping) = loop {
            let mut rx = stream.subscribe();
            {
                let mut st = lock(&stream.state);
                let start = start.unwrap_or_else(|| {
                    let inflight = st.inflight.iter().map(|s| s.end).max().unwrap_or(0);
                    st.stored.max_end().max(st.dropped.max_end()).max(inflight)
                });
                let span = Span::new(start, start + len);
                if let Some(n) = st.final_len {
                    if span.end > n {
                        return Err(StoreError::BeyondFinal {
                            end: span.end,
                            length: n,
                        });
                    }
                    if total.is_some_and(|t| t != n) {
                        return Err(StoreError::FinalLength {
                            wanted: total.unwrap_or(n),
                            reason: format!("the declared final length {n}"),
                        });
                    }
                }
                if let Some(t) = total {
                    let max = st.stored.max_end();
                    if t < max {
                        return Err(StoreError::FinalLength {
                            wanted: t,
                            reason: format!("bytes stored up to {max}"),
                        });
                    }
                }
                if span.is_empty() || !st.inflight.iter().any(|s| s.overlaps(&span)) {
                    let overlapping: Vec<Part> = st
                        .parts
                        .values()
                        .filter(|p| p.span.overlaps(&span))
                        .cloned()
                        .collect();
                    let fully = st.stored.contains(span);
                    if !span.is_empty() {
                        st.inflight.push(span);
                    }
                    break (Reservation { stream, span }, (overlapping, fully));
                }
            }
            // Wait for the overlapping write in flight to finish.
            let _ = rx.changed().await;
        };
        let span = reservation.span;
        let result = self
            .write_reserved(stream, span, data, overlapping, written_ms)
            .await;
        drop(reservation);
        let written = result?;
        if let Some(t) = total {
            self.declare_final(stream, t).await?;
        }
        Ok(written)
    }

    pub(super) async fn write_reserved(
        &self,
        stream: &Stream,
        span: Span,
        data: Bytes,
        (overlapping, fully): (Vec<Part>, bool),
        written_ms: Option<u64>,
    ) -> Result<Written, StoreError> {
        if span.is_empty() {
            return Ok(Written::Unchanged);
        }
        let gone = self.compare(&overlapping, span.start, &data).await?;
        // A part that vanished no longer holds its bytes: they must be written again.
        stream.forget(&gone);
        if fully && gone.is_empty() {
            return Ok(Written::Unchanged);
        }
        self.register_writer(stream).await?;
        self.before_put(stream).await?;
        let objects: Vec<Span> = objects(span).collect();
        // The futures are made before they are streamed: a closure inside the stream's type
        // would make the handler's future lose `Send`.
        let puts: Vec<_> = objects
            .iter()
            .map(|&o| {
                let bytes =
                    data.slice((o.start - span.start) as usize..(o.end - span.start) as usize);
                self.put_part(&stream.id, o, written_ms, bytes)
            })
            .collect();
        let puts: Vec<Result<Written, StoreError>> = futures::stream::iter(puts)
            .buffered(PUT_CONCURRENCY)
            .collect()
            .await;
        let stored_at = Instant::now();
        let mine: HashMap<(u64, u64), Path> = objects
            .iter()
            .map(|&o| (key_of(o), self.part_key(&stream.id, o, written_ms)))
            .collect();
        // Objects of this write whose bytes another writer stored first under another name.
        let mut twins: HashMap<(u64, u64), Part> = HashMap::new();
        let mut created: Vec<Span> = objects
            .iter()
            .zip(&puts)
            .filter(|(_, r)| matches!(r, Ok(Written::Stored)))
            .map(|(o, _)| *o)
            .collect();
        // A write that is not acknowledged leaves none of its objects behind unchecked.
        let withdraw = |created: &[Span]| {
            let keys: Vec<Path> = created
                .iter()
                .map(|&o| self.part_key(&stream.id, o, written_ms))
                .collect();
            async move { self.withdraw(&stream.id, &keys).await }
        };
        if let Some(e) = puts.into_iter().find_map(Result::err) {
            withdraw(&created).await;
            return Err(e);
        }
        let check = match self.check_for(stream, stored_at).await {
            Ok(check) => check,
            Err(e) => {
                withdraw(&created).await;
                return Err(e);
            }
        };
        if check != Check::Alone {
            if let Check::Shared { wait_until } = check {
                tokio::time::sleep_until(wait_until.into()).await;
            }
            // Another replica may have stored different bytes over part of this range since our
            // snapshot: list the parts that can reach it again and compare with those we did not know.
            let reach = MAX_OBJECT_LEN.max(lock(&stream.state).longest);
            let from = span.start.saturating_sub(reach);
            let listed = match self.list_parts_from(stream, from).await {
                Ok(listed) => listed,
                Err(e) => {
                    withdraw(&created).await;
                    return Err(e);
                }
            };
            // Known by name, not by span: another writer's part of the same span under another
            // write time is another object, and its bytes must be compared all the same.
            let known: HashSet<&Path> = overlapping
                .iter()
                .filter(|p| !gone.contains(&key_of(p.span)))
                .map(|p| &p.key)
                .chain(mine.values())
                .collect();
            let unknown: Vec<Part> = listed
                .iter()
                .filter(|p| p.span.overlaps(&span) && !known.contains(&p.key))
                .cloned()
                .collect();
            match self.compare(&unknown, span.start, &data).await {
                Ok(gone) => {
                    // The same bytes under two names (two writers' times): the name that sorts
                    // first stays, and the other's writer removes its own once it sees it. One
                    // that does not see the other keeps its own, so never both go.
                    let mut dominated: HashSet<Path> = HashSet::new();
                    for p in listed.iter().filter(|p| !gone.contains(&key_of(p.span))) {
                        match mine.get(&key_of(p.span)) {
                            Some(k) if p.key != *k && p.key.as_ref() < k.as_ref() => {
                                twins.insert(key_of(p.span), p.clone());
                            }
                            Some(k) if p.key != *k => {
                                dominated.insert(p.key.clone());
                            }
                            _ => {}
                        }
                    }
                    let yielded: Vec<Span> = created
                        .iter()
                        .copied()
                        .filter(|o| twins.contains_key(&key_of(*o)))
                        .collect();
                    withdraw(&yielded).await;
                    created.retain(|o| !twins.contains_key(&key_of(*o)));
                    stream.absorb(Listing {
                        parts: listed
                            .into_iter()
                            .filter(|p| {
                                !gone.contains(&key_of(p.span)) && !dominated.contains(&p.key)
                            })
                            .collect(),
                        complete_from: Some(from),
                        ..Listing::default()
                    });
                }
                Err(e) => {
                    // Ours lost the race (or could not be checked): remove it so readers never see
                    // two versions.
                    withdraw(&created).await;
                    let created: HashSet<(u64, u64)> = created.into_iter().map(key_of).collect();
                    stream.absorb(Listing {
                        parts: listed
                            .into_iter()
                            .filter(|p| !created.contains(&key_of(p.span)))
                            .collect(),
                        ..Listing::default()
                    });
                    return Err(e);
                }
            }
            if let Check::Rejoined { listed_at } = check {
                // The others' parts anywhere in the stream, before its cache is trusted alone.
                // This write is checked already: a failure only leaves the next one to retry.
                match self.refresh(stream).await {
                    Ok(_) => {
                        let mut st = lock(&stream.state);
                        if st.writers.listed == Some((listed_at, true)) {
                            st.writers.others_seen = false;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(stream = %stream.id, error = %e, "Relisting the stream failed.");
                    }
                }
            }
        }
        let now = now_ms();
        {
            let mut st = lock(&stream.state);
            for o in objects {
                let part = match twins.remove(&key_of(o)) {
                    Some(twin) => twin,
                    None => Part {
                        span: o,
                        key: mine
                            .get(&key_of(o))
                            .cloned()
                            .unwrap_or_else(|| self.part_key(&stream.id, o, written_ms)),
                        received_ms: now,
                        written_ms: written_ms.unwrap_or(now),
                        local: true,
                    },
                };
                match st.parts.entry(key_of(o)) {
                    Entry::Occupied(mut e) if e.get().key == part.key => e.get_mut().local = true,
                    Entry::Occupied(mut e) => {
                        e.insert(part);
                    }
                    Entry::Vacant(e) => {
                        e.insert(part);
                    }
                }
                st.stored.insert(o);
                st.longest = st.longest.max(o.len());
            }
            if !created.is_empty() {
                note_received(&mut st.received, now);
            }
        }
        let new_bytes: u64 = created.iter().map(Span::len).sum();
        self.metrics.bytes_stored.inc_by(new_bytes);
        self.metrics
            .workflow_bytes(&stream.meta, crate::metrics::Kind::Stored, new_bytes);
        Ok(if created.is_empty() {
            Written::Unchanged
        } else {
            Written::Stored
        })
    }

    /// Registers this process as a writer of `stream` in the current epoch, unless it is already.
    pub(super) async fn register_writer(&self, stream: &Stream) -> Result<(), StoreError> {
        let epoch = writer_epoch();
        let last = lock(&stream.state).writers.registered.map(|(e, _)| e);
        if last == Some(epoch) {
            return Ok(());
        }
        let key = self.writer_key(&stream.id, epoch);
        let create = PutOptions::from(PutMode::Create);
        match self
            .timed("put", self.os.put_opts(&key, PutPayload::new(), create))
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let done = Instant::now();
        {
            let mut st = lock(&stream.state);
            let w = &mut st.writers;
            let since = match w.registered {
                // The previous registration is of the epoch before (or after, when the clock
                // was set back a little): every other writer still sees one of the two.
                Some((e, since)) if e.abs_diff(epoch) <= 1 => since,
                _ => done,
            };
            w.registered = Some((epoch, since));
        }
        // The new registration covers the old one: a stream written for a year keeps one.
        if let Some(prev) = last.filter(|&e| e < epoch) {
            let old = self.writer_key(&stream.id, prev);
            if let Err(e) = self.timed("delete", self.os.delete(&old)).await {
                tracing::debug!(stream = %stream.id, error = %e, "An old writer registration stays.");
            }
        }
        Ok(())
    }

    pub(super) fn writer_key(&self, id: &str, epoch: u64) -> Path {
        self.key(id, &format!("writers/{epoch:016x}-{}", self.replica))
    }

    /// Lists the writers registered in the epochs around now: whether this process is the only
    /// one, and when the listing began. A name it cannot read counts as another writer.
    pub(super) async fn list_writers(
        &self,
        stream: &Stream,
    ) -> Result<(bool, Instant), StoreError> {
        let epoch = writer_epoch();
        let dir = self.key(&stream.id, "writers");
        // Every key of the epochs seen sorts after this one (the epoch is a strict prefix).
        let first = epoch.saturating_sub(WRITER_EPOCHS_SEEN);
        let from = dir.clone().join(format!("{first:016x}"));
        let started = Instant::now();
        let metas: Vec<object_store::ObjectMeta> = self
            .timed(
                "list",
                self.os.list_with_offset(Some(&dir), &from).try_collect(),
            )
            .await?;
        let alone = metas.iter().all(|m| {
            let Some((e, who)) = m.location.filename().and_then(|n| n.split_once('-')) else {
                return false;
            };
            match u64::from_str_radix(e, 16) {
                Ok(e) => who == self.replica || e > epoch + WRITER_EPOCHS_SEEN,
                Err(_) => false,
            }
        });
        let mut st = lock(&stream.state);
        let w = &mut st.writers;
        if w.listed.is_none_or(|(t, _)| t <= started) {
            w.listed = Some((started, alone));
        }
        w.others_seen |= !alone;
        Ok((alone, started))
    }

    /// Before a write's objects are stored: lists the writers unless a listing within the window
    /// did, and when others write the stream, waits until this process's run of registrations is
    /// a quarter more than the window old (see the module's notes). Waiting here rather than
    /// between the store and the check after it means that a request given up meanwhile leaves
    /// nothing stored unchecked.
    pub(super) async fn before_put(&self, stream: &Stream) -> Result<(), StoreError> {
        let (listed, since) = {
            let st = lock(&stream.state);
            (st.writers.listed, st.writers.registered.map(|(_, s)| s))
        };
        let alone = match listed {
            Some((t, alone)) if Instant::now() < t + self.writer_window => alone,
            _ => self.list_writers(stream).await?.0,
        };
        if let (false, Some(since)) = (alone, since) {
            tokio::time::sleep_until((since + self.writer_window * 5 / 4).into()).await;
        }
        Ok(())
    }

    /// How a write whose objects were all stored by `stored_at` is checked against the parts of
    /// other replicas (see the module's notes).
    pub(super) async fn check_for(
        &self,
        stream: &Stream,
        stored_at: Instant,
    ) -> Result<Check, StoreError> {
        let (listed, others_seen, since) = {
            let st = lock(&stream.state);
            let w = &st.writers;
            (w.listed, w.others_seen, w.registered.map(|(_, s)| s))
        };
        let (alone, listed_at) = match listed {
            Some((t, alone)) if stored_at < t + self.writer_window => (alone, t),
            _ => self.list_writers(stream).await?,
        };
        Ok(match (alone, others_seen) {
            (true, false) => Check::Alone,
            (true, true) => Check::Rejoined { listed_at },
            (false, _) => Check::Shared {
                wait_until: since.unwrap_or(listed_at) + self.writer_window * 5 / 4,
            },
        })
    }

    /// Stores one object of a part with a conditional create: `Unchanged` when the same bytes
    /// were stored under its key before (a retry, or another replica), a conflict when others were.
    pub(super) async fn put_part(
        &self,
        id: &str,
        span: Span,
        written_ms: Option<u64>,
        data: Bytes,
    ) -> Result<Written, StoreError> {
        let key = self.part_key(id, span, written_ms);
        let put = |data: Bytes| {
            self.timed(
                "put",
                self.os.put_opts(
                    &key,
                    PutPayload::from_bytes(data),
                    PutOptions::from(PutMode::Create),
                ),
            )
        };
        match put(data.clone()).await {
            Ok(_) => Ok(Written::Stored),
            Err(object_store::Error::AlreadyExists { .. }) => {
                match self.timed("get", self.os.get(&key)).await {
                    Ok(existing) => {
                        if existing.bytes().await? == data {
                            Ok(Written::Unchanged)
                        } else {
                            Err(StoreError::Conflict { span })
                        }
                    }
                    // It lost a race and was removed: ours may take its place.
                    Err(object_store::Error::NotFound { .. }) => match put(data).await {
                        Ok(_) => Ok(Written::Stored),
                        Err(object_store::Error::AlreadyExists { .. }) => {
                            Err(StoreError::Conflict { span })
                        }
                        Err(e) => Err(e.into()),
                    },
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the objects a failed write created; best effort, as a part left behind is still
    /// found and compared by the next writer of its range.
    pub(super) async fn withdraw(&self, id: &str, keys: &[Path]) {
        for key in keys {
            if let Err(e) = self.timed("delete", self.os.delete(key)).await {
                tracing::warn!(stream = id, part = %key, error = %e, "Cannot remove a part of a failed write.");
            }
        }
    }

    /// The key of the object of a part.
    pub(super) fn part_key(&self, id: &str, span: Span, written_ms: Option<u64>) -> Path {
        self.key(id, &format!("parts/{}", part_name(span, written_ms)))
    }

    /// Declares the final length of the stream.
    pub async fn declare_final(&self, stream: &Stream, total: u64) -> Result<(), StoreError> {
        {
            let st = lock(&stream.state);
            match st.final_len {
                Some(n) if n == total => return Ok(()),
                Some(n) => {
                    return Err(StoreError::FinalLength {
                        wanted: total,
                        reason: format!("the declared final length {n}"),
                    });
                }
                None => {}
            }
            let covered = st.stored.union(&st.dropped).max_end();
            if total < covered {
                return Err(StoreError::FinalLength {
                    wanted: total,
                    reason: format!("bytes stored or dropped up to {covered}"),
                });
            }
        }
        let key = self.key(&stream.id, "final");
        let put = self.os.put_opts(
            &key,
            PutPayload::from(total.to_string()),
            PutOptions::from(PutMode::Create),
        );
        match self.timed("put", put).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                let b = self.timed("get", self.os.get(&key)).await?.bytes().await?;
                let n: Option<u64> = std::str::from_utf8(&b).ok().and_then(|s| s.parse().ok());
                if n != Some(total) {
                    return Err(StoreError::FinalLength {
                        wanted: total,
                        reason: format!("the declared final length {}", n.unwrap_or_default()),
                    });
                }
            }
            Err(e) => return Err(e.into()),
        }
        lock(&stream.state).final_len = Some(total);
        stream.notify();
        Ok(())
    }

    /// Records a `dropped` range for `reason`. Never refused for load: it is what lets readers
    /// move on. A range this process knows as dropped already stores nothing and keeps the
    /// reason it has; markers that overlap anyway (from replicas that did not know of each
    /// other's) are ranked as [`super::dropped`] says.
    pub async fn mark_dropped(
        &self,
        stream: &Stream,
        span: Span,
        reason: DropReason,
    ) -> Result<(), StoreError> {
        {
            let st = lock(&stream.state);
            if let Some(n) = st.final_len
                && span.end > n
            {
                return Err(StoreError::BeyondFinal {
                    end: span.end,
                    length: n,
                });
            }
            if st.dropped.contains(span) {
                return Ok(());
            }
        }
        self.put_marker(
            &stream.id,
            &format!("dropped/{}", marker_name(span, reason)),
        )
        .await?;
        let new = {
            let mut st = lock(&stream.state);
            let mut only = RangeSet::new();
            only.insert(span);
            let new = only.difference(&st.dropped).covered();
            st.dropped.insert(span);
            st.reasons.insert(span, reason);
            new
        };
        self.metrics.bytes_dropped.inc_by(span.len());
        self.metrics
            .workflow_bytes(&stream.meta, crate::metrics::Kind::Dropped, new);
        stream.notify();
        Ok(())
    }

    /// Settles a stream whose writer died (its container is gone) without declaring its end:
    /// every range below `total` (the length the other capture path saw; at least what is stored
    /// or dropped) that is neither stored nor dropped becomes dropped, `total` becomes its final
    /// length, and the first such offset is recorded as where the writer died. Returns that
    /// offset; `None` when nothing was pending, or when the stream had ended after all.
    pub async fn settle(&self, stream: &Stream, total: u64) -> Result<Option<u64>, StoreError> {
        self.refresh(stream).await?;
        let (pending, total) = {
            let st = lock(&stream.state);
            if st.final_len.is_some() {
                return Ok(None);
            }
            let covered = st.stored.union(&st.dropped);
            let total = total.max(covered.max_end());
            (covered.gaps(Span::new(0, total)), total)
        };
        let died_at = pending.first().map(|s| s.start);
        if let Some(at) = died_at {
            self.put_marker(&stream.id, &format!("writer-died/{at:016x}"))
                .await?;
            let mut st = lock(&stream.state);
            st.writer_died_at = Some(st.writer_died_at.map_or(at, |known| known.min(at)));
        }
        for span in pending {
            self.mark_dropped(stream, span, DropReason::WriterDied)
                .await?;
        }
        self.declare_final(stream, total).await?;
        Ok(died_at)
    }

    /// Creates the empty marker object `name` of stream `id`; one there already is the same
    /// marker (another replica, or a retry, wrote it).
    pub(super) async fn put_marker(&self, id: &str, name: &str) -> Result<(), StoreError> {
        let key = self.key(id, name);
        let put = self
            .os
            .put_opts(&key, PutPayload::new(), PutOptions::from(PutMode::Create));
        match self.timed("put", put).await {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
