//! Reading stored bytes: a planned piece from its part or from the segment it was merged into,
//! the write times of a piece, and where a read that starts at a time or at the last lines begins.

use super::*;

impl Store {
    /// Reads `span` (inside `part`) of `stream`. A part removed since it was planned (merged into
    /// a segment, here or by another replica) is read from the objects that hold its bytes now,
    /// and the stream forgets it.
    pub async fn read_piece(
        &self,
        stream: &Stream,
        span: Span,
        part: &Part,
    ) -> Result<Bytes, StoreError> {
        match self.get_piece(span, part).await {
            Err(StoreError::Storage(object_store::Error::NotFound { .. })) => {
                self.read_moved(stream, span, part).await
            }
            r => r,
        }
    }

    /// Reads `span` (inside `part`) of the object of a stored part.
    pub(super) async fn get_piece(&self, span: Span, part: &Part) -> Result<Bytes, StoreError> {
        let range = (span.start - part.span.start)..(span.end - part.span.start);
        Ok(self
            .timed("get", self.os.get_range(&part.key, range))
            .await?)
    }

    /// [`Store::read_piece`] of a part that is gone: read from a known object that holds all of
    /// `span` now (the segment it was merged into, when this process merged it or learnt of it);
    /// else the objects that can hold its bytes are listed (a segment is no longer than
    /// [`MAX_OBJECT_LEN`], so from that far before) and read.
    pub(super) async fn read_moved(
        &self,
        stream: &Stream,
        span: Span,
        part: &Part,
    ) -> Result<Bytes, StoreError> {
        let holder = {
            let st = lock(&stream.state);
            let from = span.start.saturating_sub(MAX_OBJECT_LEN.max(st.longest));
            st.parts
                .range((from, 0)..=(span.start, u64::MAX))
                .map(|(_, p)| p)
                .find(|p| p.key != part.key && p.span.start <= span.start && span.end <= p.span.end)
                .cloned()
        };
        if let Some(holder) = holder {
            match self.get_piece(span, &holder).await {
                Ok(b) => {
                    stream.forget(&[key_of(part.span)]);
                    return Ok(b);
                }
                Err(StoreError::Storage(object_store::Error::NotFound { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        let listed = self
            .list_parts_from(stream, span.start.saturating_sub(MAX_OBJECT_LEN))
            .await?;
        let mut out = BytesMut::with_capacity(span.len() as usize);
        let mut at = span.start;
        while at < span.end {
            let holder = listed
                .iter()
                .filter(|p| p.key != part.key && p.span.start <= at && at < p.span.end)
                .max_by_key(|p| p.span.end);
            let Some(holder) = holder else {
                return Err(StoreError::Storage(object_store::Error::NotFound {
                    path: part.key.to_string(),
                    source: "removed, and no stored object holds its bytes".into(),
                }));
            };
            let end = holder.span.end.min(span.end);
            out.extend_from_slice(&self.get_piece(Span::new(at, end), holder).await?);
            at = end;
        }
        stream.absorb(Listing {
            parts: listed,
            ..Listing::default()
        });
        stream.forget(&[key_of(part.span)]);
        Ok(out.freeze())
    }

    /// The write times of the bytes of `part`: from its index when it is a segment that has one
    /// (one small GET; the stream's listing says which have), else its own time for all of it.
    pub async fn times(&self, stream: &Stream, part: &Part) -> Result<TimeIndex, StoreError> {
        let single = TimeIndex::single(part.span, part.written_ms);
        if !lock(&stream.state).indexed.contains(&key_of(part.span)) {
            return Ok(single);
        }
        let key = self.key(&stream.id, &format!("times/{}", span_name(part.span)));
        match self.timed("get", self.os.get(&key)).await {
            Ok(r) => Ok(TimeIndex::decode(part.span, &r.bytes().await?).unwrap_or(single)),
            Err(object_store::Error::NotFound { .. }) => Ok(single),
            Err(e) => Err(e.into()),
        }
    }

    /// The first offset of the stream's stored bytes written at or after `ms` (ms since the Unix
    /// epoch), or its readable end when none were: where a read `since` a time starts. Write
    /// times rise with the offset on one stream (one writer reads one pipe in order), so the
    /// objects are searched by the time of their first byte, which their names carry, and only the
    /// index of the one found is read.
    pub async fn offset_since(&self, stream: &Stream, ms: u64) -> Result<u64, StoreError> {
        let (objects, length) = {
            let st = lock(&stream.state);
            let covered = st.stored.union(&st.dropped);
            let length = covered.prefix_end();
            let (pieces, _) = stream.plan_locked(&st, Span::new(0, length));
            let objects: Vec<Part> = pieces
                .into_iter()
                .filter_map(|p| match p {
                    Piece::Data { part, .. } => Some(part),
                    Piece::Dropped(..) => None,
                })
                .collect();
            (objects, length)
        };
        // The last object whose first byte is older than `ms` may hold the first newer one.
        let i = objects.partition_point(|p| p.written_ms < ms);
        if i > 0 {
            let candidate = &objects[i - 1];
            let index = self.times(stream, candidate).await?;
            if let Some(at) = index.first_written_since(ms) {
                return Ok(at.max(candidate.span.start));
            }
        }
        Ok(objects.get(i).map_or(length, |p| p.span.start))
    }

    /// Where the last `lines` lines of the stream's readable bytes begin: the objects are read
    /// backwards from the end, one at a time, until they hold that many line ends, so the cost is
    /// the tail's size, not the stream's. A final line without its newline counts as a line.
    pub async fn offset_of_last_lines(
        &self,
        stream: &Stream,
        lines: u64,
    ) -> Result<u64, StoreError> {
        let (pieces, _) = {
            let st = lock(&stream.state);
            let length = st.stored.union(&st.dropped).prefix_end();
            stream.plan_locked(&st, Span::new(0, length))
        };
        let Some(end) = pieces.last().map(|p| match p {
            Piece::Data { span, .. } | Piece::Dropped(span, _) => span.end,
        }) else {
            return Ok(0);
        };
        if lines == 0 {
            return Ok(end);
        }
        // Newlines to find: one per line, and one more for the line before the first, except
        // that a last line without its newline has none.
        let mut wanted = lines;
        let mut last_byte_seen = false;
        for piece in pieces.iter().rev() {
            let Piece::Data { span, part } = piece else {
                continue;
            };
            let data = self.read_piece(stream, *span, part).await?;
            let mut tail = data.as_ref();
            if !last_byte_seen {
                last_byte_seen = true;
                if span.end == end && tail.last() == Some(&b'\n') {
                    tail = &tail[..tail.len() - 1];
                }
            }
            for i in memchr::memrchr_iter(b'\n', tail) {
                wanted -= 1;
                if wanted == 0 {
                    return Ok(span.start + i as u64 + 1);
                }
            }
        }
        Ok(0)
    }

    /// Reads `span` of the stream into memory (for tests and small reads).
    pub async fn read_all(&self, stream: &Stream, span: Span) -> Result<Bytes, StoreError> {
        let (pieces, _) = stream.plan(span);
        let mut out = BytesMut::new();
        let mut fetched = futures::stream::iter(pieces.into_iter().filter_map(|p| match p {
            Piece::Data { span, part } => {
                Some(async move { self.read_piece(stream, span, &part).await })
            }
            Piece::Dropped(..) => None,
        }))
        .buffered(8);
        while let Some(b) = fetched.next().await {
            out.extend_from_slice(&b?);
        }
        Ok(out.freeze())
    }
}
