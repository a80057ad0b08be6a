//! Object keys: the names of parts, segments, markers and registrations, and listing a stream's
//! parts from a local directory without a request per part.

use super::*;

/// The writer epoch now (see [`WRITER_EPOCH_SECS`]).
pub(super) fn writer_epoch() -> u64 {
    now_ms() / 1000 / WRITER_EPOCH_SECS
}

pub(super) fn span_name(span: Span) -> String {
    format!("{:016x}-{:016x}", span.start, span.end)
}

/// The name of a part object: its span, and the time its first byte was written when the writer
/// said (`{start:016x}-{end:016x}.{ms}`). The time is part of the name so that a listing, which
/// every reader makes anyway, yields it with no request per part; a writer's retries send the same
/// time, so they still meet their earlier attempt under the same name.
pub(super) fn part_name(span: Span, written_ms: Option<u64>) -> String {
    match written_ms {
        Some(ms) => format!("{}.{ms}", span_name(span)),
        None => span_name(span),
    }
}

/// A part object's span and write time (see [`part_name`]).
pub(super) fn parse_part_name(name: &str) -> Option<(Span, Option<u64>)> {
    match name.split_once('.') {
        Some((span, ms)) if !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()) => {
            Some((parse_span_name(span)?, Some(ms.parse().ok()?)))
        }
        Some(_) => None,
        None => Some((parse_span_name(name)?, None)),
    }
}

/// The name of a `dropped` marker: its span and its reason (`{start:016x}-{end:016x}.{reason}`),
/// so that the listing every load makes yields each range's reason with no request per marker.
pub(super) fn marker_name(span: Span, reason: DropReason) -> String {
    format!("{}.{reason}", span_name(span))
}

/// A marker's span and reason (see [`marker_name`]). A marker stored before reasons has none in
/// its name, and one a newer version stored may have a reason this one does not know: both are
/// dropped ranges all the same, of [`DropReason::Unspecified`].
pub(super) fn parse_marker_name(name: &str) -> Option<(Span, DropReason)> {
    match name.split_once('.') {
        Some((span, reason)) => Some((
            parse_span_name(span)?,
            reason.parse().unwrap_or(DropReason::Unspecified),
        )),
        None => Some((parse_span_name(name)?, DropReason::Unspecified)),
    }
}

pub(super) fn parse_span_name(name: &str) -> Option<Span> {
    let (a, b) = name.split_once('-')?;
    if a.len() != 16 || b.len() != 16 {
        return None;
    }
    let span = Span::new(
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    );
    (!span.is_empty()).then_some(span)
}

/// The objects a write of `span` is stored in: consecutive pieces of at most [`MAX_OBJECT_LEN`].
pub(super) fn objects(span: Span) -> impl Iterator<Item = Span> {
    (span.start..span.end)
        .step_by(MAX_OBJECT_LEN as usize)
        .map(move |a| Span::new(a, a.saturating_add(MAX_OBJECT_LEN).min(span.end)))
}

/// The part a listed object is, when it is one (`.../parts/{start}-{end}`).
pub(super) fn part_of(m: object_store::ObjectMeta) -> Option<Part> {
    let mut segs = m.location.parts().collect::<Vec<_>>().into_iter().rev();
    let name = segs.next()?;
    if segs.next()?.as_ref() != "parts" {
        return None;
    }
    let (span, written_ms) = parse_part_name(name.as_ref())?;
    let received_ms = m.last_modified.timestamp_millis().max(0) as u64;
    Some(Part {
        span,
        received_ms,
        written_ms: written_ms.unwrap_or(received_ms),
        key: m.location,
        local: false,
    })
}

/// The parts in the local directory `fs_dir` (object key `dir`) that start at or after `from`:
/// every name is read, and the metadata (for the receive time) of those not in `known`.
pub(super) async fn list_local_parts_from(
    fs_dir: std::path::PathBuf,
    dir: Path,
    from: u64,
    known: HashMap<(u64, u64), u64>,
) -> Result<Vec<Part>, StoreError> {
    let io = |e: std::io::Error| {
        StoreError::Storage(object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(e),
        })
    };
    let listed = tokio::task::spawn_blocking(move || {
        let entries = match std::fs::read_dir(&fs_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut parts = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            // Staging files of a put in progress are not part names.
            let Some((span, written_ms)) = name.to_str().and_then(parse_part_name) else {
                continue;
            };
            if span.start < from {
                continue;
            }
            let received_ms = match known.get(&key_of(span)) {
                Some(&ms) => ms,
                None => match entry.metadata() {
                    Ok(m) => m
                        .modified()?
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    // Removed since the directory was read (merged into a segment).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                },
            };
            parts.push(Part {
                span,
                key: dir.clone().join(part_name(span, written_ms)),
                received_ms,
                written_ms: written_ms.unwrap_or(received_ms),
                local: false,
            });
        }
        Ok(parts)
    })
    .await
    .map_err(|e| io(std::io::Error::other(e)))?;
    listed.map_err(io)
}

pub(super) fn key_of(span: Span) -> (u64, u64) {
    (span.start, span.end)
}
