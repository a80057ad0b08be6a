//! Compaction: contiguous parts merged into segments of [`SEGMENT`] bytes with their time index,
//! the parts withdrawn only once the segment is stored.

use super::*;

/// The time index of a segment made of `pieces`, when any of them has a time its writer gave.
fn segment_times(cell: Span, pieces: &[Piece]) -> Option<TimeIndex> {
    let data = || {
        pieces.iter().filter_map(|p| match p {
            Piece::Data { span, part } => Some((span, part)),
            Piece::Dropped(..) => None,
        })
    };
    data().any(|(_, p)| p.has_written_time()).then(|| {
        TimeIndex::new(
            cell,
            data().map(|(span, part)| (span.start, part.written_ms)),
        )
    })
}

impl Store {
    /// The segment holding offsets from `k * segment`: cut at the final length, empty past it.
    pub(super) fn cell(&self, k: u64, final_len: Option<u64>) -> Span {
        let start = k.saturating_mul(self.segment);
        let end = start.saturating_add(self.segment);
        Span::new(start, final_len.map_or(end, |n| end.min(n).max(start)))
    }

    /// Whether an object of `span` is a segment: it covers one cell exactly.
    pub(super) fn is_segment(&self, span: Span, final_len: Option<u64>) -> bool {
        span.start.is_multiple_of(self.segment)
            && span == self.cell(span.start / self.segment, final_len)
    }

    /// Whether the stream has bytes to merge that no compaction of this process is merging:
    /// a whole segment stored (or dropped) past what is merged, or the last bytes of a complete
    /// stream.
    /// Cheap: callers ask after every write.
    pub fn wants_compaction(&self, stream: &Stream) -> bool {
        let st = lock(&stream.state);
        if st.compacting || st.compact_after.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        self.next_cell(&st).is_some()
    }

    /// The first cell not merged yet, when nothing of it is pending: every byte stored or
    /// dropped. Most writes end before that cell does, which is answered without building the
    /// union of the two.
    pub(super) fn next_cell(&self, st: &State) -> Option<Span> {
        let cell = self.cell(st.segmented_to.div_ceil(self.segment), st.final_len);
        if cell.is_empty() || st.stored.max_end().max(st.dropped.max_end()) < cell.end {
            return None;
        }
        (st.stored.contains(cell) || st.stored.union(&st.dropped).contains(cell)).then_some(cell)
    }

    /// Merges the stream's stored bytes into segments (see [`SEGMENT`]), cell by cell from the
    /// first not merged yet, up to the first cell with bytes still pending: one conditional put
    /// of the segment, then the removal of every object it and its neighbours cover. A cell with
    /// a dropped range keeps its parts.
    ///
    /// Safe beside writers and readers on any replica, and at every crash point: a segment holds
    /// bytes that were stored and acknowledged (parts of other replicas only once
    /// [`SETTLED_AFTER`] old, so never one that loses a conflict), objects are removed only once
    /// segments that cover them are stored, and a reader that planned a removed object reads its
    /// bytes again from the segment ([`Store::read_piece`]). A segment is no longer than any part
    /// may be, so the check after each write still finds it.
    pub async fn compact(&self, stream: &Stream) -> Result<Compacted, StoreError> {
        self.compact_limited(stream, usize::MAX).await
    }

    /// [`Store::compact`], stopping after `mutations` storage writes and removals as a process
    /// killed there would: the crash points of the model test.
    #[doc(hidden)]
    pub async fn compact_limited(
        &self,
        stream: &Stream,
        mutations: usize,
    ) -> Result<Compacted, StoreError> {
        {
            let mut st = lock(&stream.state);
            if st.compacting {
                return Ok(Compacted::default());
            }
            st.compacting = true;
        }
        let _running = CompactionRunning(stream);
        let result = self.compact_cells(stream, mutations).await;
        if result.is_err() {
            // A storage that keeps failing (a bucket policy without deletes, say) must not cost
            // a merge's reads on every write.
            lock(&stream.state).compact_after = Some(Instant::now() + COMPACT_RETRY);
        }
        result
    }

    pub(super) async fn compact_cells(
        &self,
        stream: &Stream,
        mutations: usize,
    ) -> Result<Compacted, StoreError> {
        let mut left = mutations;
        let mut out = Compacted::default();
        loop {
            let (cell, objects, final_len) = {
                let st = lock(&stream.state);
                let Some(cell) = self.next_cell(&st) else {
                    break;
                };
                if st.inflight.iter().any(|s| s.overlaps(&cell)) {
                    break;
                }
                if !st.stored.contains(cell) {
                    // Bytes of it were lost (dropped): its parts stay as they are, and the
                    // cells after it are merged all the same.
                    drop(st);
                    lock(&stream.state).segmented_to = cell.end;
                    continue;
                }
                let from = (cell.start.saturating_sub(st.longest), 0);
                let objects: Vec<Part> = st
                    .parts
                    .range(from..(cell.end, 0))
                    .map(|(_, p)| p)
                    .filter(|p| p.span.overlaps(&cell))
                    .cloned()
                    .collect();
                (cell, objects, st.final_len)
            };
            if objects.len() <= self.merge_above {
                // Few objects, large ones: merging would copy every byte again (on a file system
                // it doubled the CPU a GB of 1 MiB parts costs) to save no more than a few.
                lock(&stream.state).segmented_to = cell.end;
                continue;
            }
            if !objects.iter().any(|p| p.span == cell) {
                let settled = now_ms().saturating_sub(self.settled_after.as_millis() as u64);
                if objects.iter().any(|p| !p.local && p.received_ms > settled) {
                    lock(&stream.state).compact_after = Some(Instant::now() + self.settled_after);
                    break;
                }
                let (pieces, _) = stream.plan(cell);
                let times = segment_times(cell, &pieces);
                let data = self.read_all(stream, cell).await?;
                if data.len() as u64 != cell.len() {
                    // Bytes went missing under the read (another replica's removals): next time.
                    break;
                }
                // The segment's name carries the time of its first byte, and the times of the
                // rest go in its index, stored first: a segment is never without its index
                // (rewritten whole by a compaction that crashed in between).
                let first_ms = times.as_ref().and_then(|t| t.entries.first()).map(|e| e.1);
                if let Some(times) = &times {
                    if left == 0 {
                        return Ok(out);
                    }
                    left -= 1;
                    let key = self.key(&stream.id, &format!("times/{}", span_name(cell)));
                    let put = self.os.put(&key, PutPayload::from(times.encode()));
                    self.timed("put", put).await?;
                    lock(&stream.state).indexed.insert(key_of(cell));
                }
                if left == 0 {
                    return Ok(out);
                }
                left -= 1;
                let written = self.put_part(&stream.id, cell, first_ms, data).await?;
                let received_ms = objects.iter().map(|p| p.received_ms).max().unwrap_or(0);
                lock(&stream.state)
                    .parts
                    .entry(key_of(cell))
                    .or_insert_with(|| Part {
                        span: cell,
                        key: self.part_key(&stream.id, cell, first_ms),
                        received_ms,
                        written_ms: first_ms.unwrap_or(received_ms),
                        local: true,
                    });
                if written == Written::Stored {
                    out.segments += 1;
                    self.metrics.segments_stored.inc();
                }
            }
            // Every object of the cell that segments cover (a part reaching into the next cell
            // goes with that cell's segment).
            let removable: Vec<Part> = {
                let st = lock(&stream.state);
                let mut segments = RangeSet::new();
                for p in st.parts.values() {
                    if self.is_segment(p.span, final_len) {
                        segments.insert(p.span);
                    }
                }
                objects
                    .into_iter()
                    .filter(|p| !self.is_segment(p.span, final_len) && segments.contains(p.span))
                    .collect()
            };
            let removing: Vec<Part> = removable.into_iter().take(left).collect();
            left -= removing.len();
            let paths: Vec<Result<Path, object_store::Error>> =
                removing.iter().map(|p| Ok(p.key.clone())).collect();
            let t = Instant::now();
            let removed: Vec<Result<Path, object_store::Error>> = self
                .os
                .delete_stream(futures::stream::iter(paths).boxed())
                .collect()
                .await;
            self.metrics.storage_latency("delete", t.elapsed(), true);
            // One answer per path, perhaps in another order (S3 deletes in batches); a path not
            // found is gone as surely as a deleted one, and names itself in the error in a
            // backend's own way, so only the paths confirmed deleted count when others failed.
            let mut deleted: HashSet<String> = HashSet::new();
            let mut failed = None;
            for r in removed {
                match r {
                    Ok(path) => {
                        deleted.insert(path.to_string());
                    }
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => failed = Some(e),
                }
            }
            let gone: Vec<(u64, u64)> = removing
                .iter()
                .filter(|p| failed.is_none() || deleted.contains(p.key.as_ref()))
                .map(|p| key_of(p.span))
                .collect();
            out.removed += gone.len();
            self.metrics.objects_merged.inc_by(gone.len() as u64);
            let next = {
                let mut st = lock(&stream.state);
                st.remove_parts(&gone);
                let all_gone = gone.len() == removing.len();
                if all_gone && left > 0 {
                    st.segmented_to = cell.end;
                }
                all_gone && left > 0
            };
            if let Some(e) = failed {
                return Err(e.into());
            }
            if !next {
                break;
            }
        }
        Ok(out)
    }
}
