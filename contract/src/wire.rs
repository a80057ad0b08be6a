//! The JSON bodies of the API's write side, as the server reads and writes them and the client
//! sends and reads them: one definition for both.

use serde::{Deserialize, Serialize};

use crate::{reason::DropReason, source::Source};

/// `POST /logs`: the stream to create (or find: creating is idempotent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateStream {
    pub name: String,
    /// Defaults to the token's capture path (entrypoint for write tokens, ebpf for collectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// Only collector tokens name a context; write tokens write in their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Collector tokens only: why the container has no entrypoint stream of this one's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint_absent: Option<String>,
    /// The name of the pod whose output the stream holds, so that reads of a trigger can select
    /// one replica (`pod=`). A pod's own token names its pod itself; the API keeps that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl CreateStream {
    /// A stream in the token's own context, on the token's capture path.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            source: None,
            context: None,
            entrypoint_absent: None,
            pod: None,
        }
    }
}

/// The answer to `POST /logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    pub id: String,
    pub name: String,
    pub source: Source,
    pub context: String,
    /// End of the stored-or-dropped prefix.
    pub length: u64,
    /// Highest offset stored or dropped: a restarted writer continues here.
    pub end: u64,
    pub complete: bool,
}

/// The answer to a write (an append, a marker, a final length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub length: u64,
    pub end: u64,
    pub complete: bool,
}

/// `POST /logs/{id}/markers`: marks `range` (`bytes a-b/*` or `bytes a-b/N`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Markers {
    pub range: String,
    /// What the range is: `dropped` is the one marker there is.
    pub markers: Vec<String>,
    /// Why the range was dropped. Optional so that writers older than reasons keep working:
    /// the API stores their ranges as [`DropReason::Unspecified`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "known_reason"
    )]
    pub reason: Option<DropReason>,
}

/// A reason's code, refused with the codes there are when it names none: serde's own message
/// would not say that it is the reason that is wrong.
fn known_reason<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<DropReason>, D::Error> {
    let Some(code) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    code.parse()
        .map(Some)
        .map_err(|e: crate::reason::UnknownReason| {
            let known: Vec<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
            serde::de::Error::custom(format!("{e}; the reasons are {}", known.join(", ")))
        })
}

impl Markers {
    /// A `dropped` marker of `span` for `reason`.
    pub fn dropped(span: crate::range::Span, reason: DropReason) -> Self {
        Self {
            range: format!("bytes {span}/*"),
            markers: vec!["dropped".to_owned()],
            reason: Some(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_request_names_only_what_it_sets_and_refuses_unknown_fields() {
        let body = serde_json::to_string(&CreateStream::named("stdout")).unwrap();
        assert_eq!(body, r#"{"name":"stdout"}"#);
        assert!(serde_json::from_str::<CreateStream>(r#"{"name":"a","nam":"b"}"#).is_err());
        let c: CreateStream =
            serde_json::from_str(r#"{"name":"a","source":"ebpf","context":"workflows/w"}"#)
                .unwrap();
        assert_eq!(c.source, Some(Source::Ebpf));
    }

    #[test]
    fn a_marker_names_its_reason_and_one_without_a_reason_still_parses() {
        let m = Markers::dropped(crate::range::Span::new(3, 6), DropReason::BufferFull);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"range":"bytes 3-5/*","markers":["dropped"],"reason":"buffer-full"}"#
        );
        let old: Markers =
            serde_json::from_str(r#"{"range":"bytes 3-5/*","markers":["dropped"]}"#).unwrap();
        assert_eq!(old.reason, None);
        let bad = serde_json::from_str::<Markers>(
            r#"{"range":"bytes 3-5/*","markers":["dropped"],"reason":"tired"}"#,
        );
        let msg = bad.unwrap_err().to_string();
        assert!(
            msg.starts_with(
                "unknown drop reason \"tired\"; the reasons are unspecified, buffer-full"
            ),
            "{msg}"
        );
    }
}
