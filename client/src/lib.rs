//! The writer side of the metadata API: one HTTP call per operation ([`Client`]) and a
//! [`Shipper`] that turns a byte stream into batched, compressed, retried appends and accounts for
//! every byte it is handed (stored, or reported as `dropped`).
//!
//! The entrypoint and the collector both ship through this module, so the retry, backoff and
//! accounting rules exist once.

mod args;
mod ship;

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri, header};
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Deserialize;

pub use args::{Defaults, ShipArgs};
pub use ship::{ShipConfig, ShipReport, Shipper};

pub use contract::reason::DropReason;
use contract::{coding::Coding, range::Span};

/// Largest error body kept for a diagnostic.
const MAX_ERROR_BODY: usize = 512;

/// Why a call to the metadata API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid metadata API URL {url:?}: {reason}")]
    Url { url: String, reason: &'static str },
    #[error("failed to read the token file {}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("request to the metadata API failed")]
    Transport {
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("failed to read the metadata API's answer")]
    Body {
        #[source]
        source: hyper::Error,
    },
    #[error("the metadata API did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the metadata API answered {status}: {message}")]
    Status {
        status: u16,
        message: String,
        /// From a `Retry-After` header (429 and 503 carry one).
        retry_after: Option<Duration>,
    },
    #[error("unexpected answer from the metadata API")]
    Decode {
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// Whether the same request may succeed later (network, overload, storage trouble, a token
    /// that is being rotated).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Url { .. } | Self::Decode { .. } => false,
            Self::Token { .. } | Self::Transport { .. } | Self::Body { .. } | Self::Timeout(_) => {
                true
            }
            Self::Status { status, .. } => {
                matches!(status, 401 | 408 | 425 | 429 | 500 | 502 | 503 | 504)
            }
        }
    }

    /// The delay the server asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Where the bearer token comes from.
#[derive(Debug, Clone)]
pub enum Token {
    /// No `Authorization` header.
    None,
    /// A fixed token.
    Value(String),
    /// A file read again whenever it changes (projected service account tokens rotate).
    File(PathBuf),
}

/// A file's identity and version, to notice a rotated token without re-reading it each time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

#[derive(Debug)]
struct TokenCache {
    token: Token,
    cached: Mutex<Option<(FileStamp, String)>>,
}

impl TokenCache {
    fn bearer(&self) -> Result<Option<String>, ClientError> {
        let path = match &self.token {
            Token::None => return Ok(None),
            Token::Value(v) => return Ok(Some(v.clone())),
            Token::File(p) => p,
        };
        let err = |source| ClientError::Token {
            path: path.clone(),
            source,
        };
        // `metadata` follows symlinks: a projected volume swaps its `..data` link on rotation.
        let md = std::fs::metadata(path).map_err(err)?;
        let stamp = FileStamp {
            ino: std::os::unix::fs::MetadataExt::ino(&md),
            len: md.len(),
            modified: md.modified().ok(),
        };
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((s, v)) = cached.as_ref()
            && *s == stamp
        {
            return Ok(Some(v.clone()));
        }
        let value = std::fs::read_to_string(path)
            .map_err(err)?
            .trim()
            .to_owned();
        *cached = Some((stamp, value.clone()));
        Ok(Some(value))
    }
}

/// What a writer asks for when it opens a stream.
/// The stream a writer creates (`POST /logs`).
pub type StreamSpec = contract::wire::CreateStream;
/// The answer to `POST /logs`.
pub use contract::wire::Created;
/// The answer to a write.
pub type Ack = contract::wire::Written;

/// The parts of `GET /logs/{id}` a writer needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StreamStatus {
    pub length: u64,
    pub end: u64,
    pub pending: Vec<Span>,
    /// Ranges dropped and not stored.
    #[serde(default)]
    pub dropped: Vec<Span>,
    pub complete: bool,
    pub final_length: Option<u64>,
}

/// A request body for an append.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The bytes on the wire.
    pub body: Bytes,
    /// Bytes after decoding (the length the `Content-Range` names).
    pub len: u64,
    /// How `body` is encoded (its `Content-Encoding`).
    pub coding: Coding,
}

impl Payload {
    /// Bytes sent as they are.
    pub fn plain(body: Bytes) -> Self {
        Self {
            len: body.len() as u64,
            body,
            coding: Coding::Identity,
        }
    }

    /// Bytes compressed with `coding` at `level` (see [`compress_into`]); sent as they are when
    /// that fails.
    pub fn compressed(data: &[u8], coding: Coding, level: u32) -> Self {
        match compress_into(coding, data, level, Vec::new()) {
            Ok(body) if coding != Coding::Identity => Self {
                body: body.into(),
                len: data.len() as u64,
                coding,
            },
            Ok(body) => Self::plain(body.into()),
            Err(_) => Self::plain(Bytes::copy_from_slice(data)),
        }
    }
}

/// Compresses `data` with `coding` at `level` into `out` (emptied first, its capacity reused):
/// gzip 1 fastest .. 9 smallest, zstd 1 .. 19; a level above a coding's highest means the highest
/// and 0 means its [`Coding::default_level`]. `identity` copies.
///
/// zstd writes one frame with the content size in its header (the server sizes its buffer from
/// it) and a checksum (as gzip's CRC, so a body damaged on the way is refused, not stored). Its
/// output may not outgrow `data`: a batch that does not shrink fails, and is better sent plain.
pub fn compress_into(
    coding: Coding,
    data: &[u8],
    level: u32,
    mut out: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    out.clear();
    let level = match level {
        0 => coding.default_level(),
        l => l.min(coding.max_level()),
    };
    match coding {
        Coding::Identity => {
            out.extend_from_slice(data);
            Ok(out)
        }
        Coding::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::new(level));
            enc.write_all(data)?;
            enc.finish()
        }
        Coding::Zstd => {
            // Room for what came in and no more: zstd writes into the capacity, and a pooled
            // buffer is already that large, so nothing is reallocated.
            out.reserve(data.len());
            let level = i32::try_from(level).unwrap_or(1);
            ZSTD.with_borrow_mut(|slot| {
                let mut zc = match slot.take() {
                    Some((l, zc)) if l == level => zc,
                    _ => {
                        let mut zc = zstd::bulk::Compressor::new(level)?;
                        zc.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
                        zc
                    }
                };
                // A failed job leaves the context ready for the next one (zstd resets it).
                let done = zc.compress_to_buffer(data, &mut out);
                *slot = Some((level, zc));
                done
            })?;
            Ok(out)
        }
    }
}

thread_local! {
    /// One zstd context per thread and level, kept: the shipper compresses on the blocking pool,
    /// whose threads live on, and a fresh context allocates and clears its tables for every batch
    /// (+10% CPU at 64 KiB batches, +35% at 8 KiB, more under musl's allocator).
    static ZSTD: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// One connection pool to one metadata API.
#[derive(Debug)]
pub struct Client {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    base: String,
    token: TokenCache,
    timeout: Duration,
}

impl Client {
    /// A client for `url` (`http://host:port`, optionally with a path prefix). Each request,
    /// including reading its answer, must finish within `timeout`.
    pub fn new(url: &str, token: Token, timeout: Duration) -> Result<Self, ClientError> {
        let base = url.trim_end_matches('/').to_owned();
        let bad = |reason| ClientError::Url {
            url: url.to_owned(),
            reason,
        };
        let uri: Uri = base.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad("https is not supported; use http inside the cluster"));
            }
            _ => return Err(bad("the scheme must be http")),
        }
        if uri.host().is_none() {
            return Err(bad("no host"));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout.min(Duration::from_secs(3))));
        let http = HttpClient::builder(TokioExecutor::new())
            // Below the server's idle deadline (`--head-timeout`, 10 s by default): a pooled
            // connection is retired here before the server closes it under a request.
            .pool_idle_timeout(Duration::from_secs(5))
            .build(connector);
        Ok(Self {
            http,
            base,
            token: TokenCache {
                token,
                cached: Mutex::new(None),
            },
            timeout,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(header::HeaderName, String)],
        body: Bytes,
    ) -> Result<Bytes, ClientError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = self.token.bearer()? {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let req = req.body(Full::new(body)).map_err(|_| ClientError::Url {
            url: format!("{}{path}", self.base),
            reason: "cannot build a request for it",
        })?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|source| ClientError::Transport { source })?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|source| ClientError::Body { source })?
                .to_bytes();
            if status.is_success() {
                return Ok(body);
            }
            Err(ClientError::Status {
                status: status.as_u16(),
                message: error_message(status, &body),
                retry_after,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }

    /// [`Client::call`], with the answer decoded from JSON.
    async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        headers: &[(header::HeaderName, String)],
        body: Bytes,
    ) -> Result<T, ClientError> {
        let b = self.call(method, path, headers, body).await?;
        serde_json::from_slice(&b).map_err(|source| ClientError::Decode { source })
    }

    /// `POST /logs`: creates the stream or finds it (idempotent). An API older than streams that
    /// record their pod refuses the field (400, ``unknown field `pod` ``): the stream is created
    /// again without it, as a stream whose pod is not known is better than none.
    pub async fn create(&self, spec: &StreamSpec) -> Result<Created, ClientError> {
        match self.post_create(spec).await {
            Err(ClientError::Status {
                status: 400,
                message,
                ..
            }) if spec.pod.is_some() && message.contains("`pod`") => {
                let mut spec = spec.clone();
                spec.pod = None;
                self.post_create(&spec).await
            }
            other => other,
        }
    }

    async fn post_create(&self, spec: &StreamSpec) -> Result<Created, ClientError> {
        let body = serde_json::to_vec(spec).map_err(|source| ClientError::Decode { source })?;
        let json = [(header::CONTENT_TYPE, "application/json".to_owned())];
        self.call_json(Method::POST, "/logs", &json, body.into())
            .await
    }

    /// `GET /logs/{id}`.
    pub async fn status(&self, id: &str) -> Result<StreamStatus, ClientError> {
        self.call_json(Method::GET, &format!("/logs/{id}"), &[], Bytes::new())
            .await
    }

    /// `PATCH /logs/{id}/data`: stores `payload` at `start`; `written_ms`, when its first byte was
    /// written (see [`contract::headers::WRITTEN`]).
    pub async fn append(
        &self,
        id: &str,
        start: u64,
        payload: &Payload,
        written_ms: Option<u64>,
    ) -> Result<Ack, ClientError> {
        let mut headers = vec![
            (
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/*", start + payload.len - 1),
            ),
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        ];
        if payload.coding != Coding::Identity {
            headers.push((header::CONTENT_ENCODING, payload.coding.as_str().to_owned()));
        }
        if let Some(ms) = written_ms {
            headers.push((
                header::HeaderName::from_static(contract::headers::WRITTEN),
                ms.to_string(),
            ));
        }
        self.call_json(
            Method::PATCH,
            &format!("/logs/{id}/data"),
            &headers,
            payload.body.clone(),
        )
        .await
    }

    /// `PATCH /logs/{id}/data` with `bytes */total`: declares the final length.
    pub async fn finish(&self, id: &str, total: u64) -> Result<Ack, ClientError> {
        let headers = [(header::CONTENT_RANGE, format!("bytes */{total}"))];
        self.call_json(
            Method::PATCH,
            &format!("/logs/{id}/data"),
            &headers,
            Bytes::new(),
        )
        .await
    }

    /// `POST /logs/{id}/markers`: reports `span` as dropped for `reason`. An API older than
    /// reasons refuses the field (400, ``unknown field `reason` ``), and one older than this
    /// reason refuses the code (400, `unknown drop reason`): the marker is sent again without
    /// it, since a range stored as `unspecified` is better than a range left pending.
    pub async fn mark_dropped(
        &self,
        id: &str,
        span: Span,
        reason: DropReason,
    ) -> Result<Ack, ClientError> {
        let mut body = contract::wire::Markers::dropped(span, reason);
        match self.post_markers(id, &body).await {
            Err(ClientError::Status {
                status: 400,
                message,
                ..
            }) if message.contains("reason") => {
                body.reason = None;
                self.post_markers(id, &body).await
            }
            other => other,
        }
    }

    async fn post_markers(
        &self,
        id: &str,
        body: &contract::wire::Markers,
    ) -> Result<Ack, ClientError> {
        let body = serde_json::to_vec(body).map_err(|source| ClientError::Decode { source })?;
        let json = [(header::CONTENT_TYPE, "application/json".to_owned())];
        self.call_json(
            Method::POST,
            &format!("/logs/{id}/markers"),
            &json,
            body.into(),
        )
        .await
    }

    /// `POST /logs/{id}/settle`: the container whose output the complete `ebpf` stream `id`
    /// holds is gone, so the entrypoint's stream of the same output, if it never ended (its
    /// writer died with the container), is settled to this stream's final length.
    pub async fn settle(&self, id: &str) -> Result<(), ClientError> {
        self.call(
            Method::POST,
            &format!("/logs/{id}/settle"),
            &[],
            Bytes::new(),
        )
        .await
        .map(drop)
    }
}

/// The server's JSON `message`, or a short excerpt of the body.
fn error_message(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        message: String,
    }
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        return e.message;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY)]);
    if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text.trim().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// An API older than reasons and pod names: a body naming either is refused as serde refuses
    /// an unknown field; returns its URL and the bodies it was sent.
    async fn api_without_reasons() -> (String, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers, then as many body bytes as Content-Length says.
                let body = loop {
                    let n = conn.read(&mut buf).await.unwrap();
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(str::to_owned)
                            })
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if body.len() >= len || n == 0 {
                            break body.to_owned();
                        }
                    }
                };
                log.lock().unwrap().push(body.clone());
                let (status, answer) = if body.contains("reason") {
                    (
                        "400 Bad Request",
                        r#"{"error":"bad_request","message":"invalid JSON body: unknown field `reason`, expected `range` or `markers`"}"#,
                    )
                } else if body.contains("\"pod\"") {
                    (
                        "400 Bad Request",
                        r#"{"error":"bad_request","message":"invalid JSON body: unknown field `pod`, expected one of `name`, `source`, `context`, `entrypoint_absent`"}"#,
                    )
                } else if body.contains("\"name\"") {
                    (
                        "200 OK",
                        r#"{"id":"s","name":"stdout","source":"ebpf","context":"workflows/w/triggers/t","length":0,"end":0,"complete":false}"#,
                    )
                } else {
                    ("202 Accepted", r#"{"length":0,"end":6,"complete":false}"#)
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                conn.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn a_marker_an_older_api_refuses_for_its_reason_goes_again_without_it() {
        let (url, seen) = api_without_reasons().await;
        let c = Client::new(&url, Token::None, Duration::from_secs(5)).unwrap();
        let ack = c
            .mark_dropped("s", Span::new(3, 6), DropReason::BufferFull)
            .await
            .unwrap();
        assert_eq!(ack.end, 6);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                r#"{"range":"bytes 3-5/*","markers":["dropped"],"reason":"buffer-full"}"#,
                r#"{"range":"bytes 3-5/*","markers":["dropped"]}"#,
            ]
        );
    }

    #[tokio::test]
    async fn a_stream_an_older_api_refuses_for_its_pod_is_created_again_without_it() {
        let (url, seen) = api_without_reasons().await;
        let c = Client::new(&url, Token::None, Duration::from_secs(5)).unwrap();
        let mut spec = StreamSpec::named("stdout");
        spec.pod = Some("hook-7d9f8-aaaaa".to_owned());
        let created = c.create(&spec).await.unwrap();
        assert_eq!(created.id, "s");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                r#"{"name":"stdout","pod":"hook-7d9f8-aaaaa"}"#,
                r#"{"name":"stdout"}"#,
            ]
        );
    }

    #[test]
    fn retry_rules_follow_the_status() {
        let st = |status| ClientError::Status {
            status,
            message: String::new(),
            retry_after: None,
        };
        for s in [401, 429, 500, 503] {
            assert!(st(s).is_retryable(), "{s}");
        }
        for s in [400, 403, 404, 409, 413, 415, 416] {
            assert!(!st(s).is_retryable(), "{s}");
        }
    }

    #[test]
    fn urls_must_be_plain_http() {
        for bad in ["ftp://x", "https://x:1", "not a url", "/relative"] {
            assert!(
                Client::new(bad, Token::None, Duration::from_secs(1)).is_err(),
                "{bad}"
            );
        }
    }

    fn log_text(lines: usize) -> Vec<u8> {
        (0..lines)
            .flat_map(|i| {
                format!(
                    "2024-05-01T12:00:{:02}.{i:06}Z INFO building /src/crate{}/lib.rs\n",
                    i % 60,
                    i % 17
                )
                .into_bytes()
            })
            .collect()
    }

    #[test]
    fn gzip_payload_round_trips() {
        use std::io::Read;
        let data = log_text(10_000);
        let p = Payload::compressed(&data, Coding::Gzip, 1);
        assert_eq!(p.coding, Coding::Gzip);
        assert_eq!(p.len, data.len() as u64);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&p.body[..])
            .read_to_end(&mut out)
            .expect("valid gzip");
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_payload_round_trips_with_its_size_and_a_checksum() {
        let data = log_text(10_000);
        for level in [0, 1, 3, 19, 100] {
            let p = Payload::compressed(&data, Coding::Zstd, level);
            assert_eq!(p.coding, Coding::Zstd, "level {level}");
            assert_eq!(p.len, data.len() as u64);
            assert!(p.body.len() < data.len() / 4, "{} bytes", p.body.len());
            let size = zstd::zstd_safe::get_frame_content_size(&p.body);
            assert_eq!(size.ok(), Some(Some(data.len() as u64)));
            let out = zstd::stream::decode_all(&p.body[..]).expect("valid zstd");
            assert_eq!(out, data);
            // The frame ends in a checksum: a flipped bit in the content is caught.
            let mut bad = p.body.to_vec();
            let n = bad.len();
            bad[n - 2] ^= 1;
            assert!(zstd::stream::decode_all(&bad[..]).is_err());
        }
    }

    #[test]
    fn compressing_reuses_the_buffer_and_incompressible_bytes_go_plain() {
        let data = log_text(20_000);
        let buf = Vec::with_capacity(data.len());
        let ptr = buf.as_ptr();
        let out = compress_into(Coding::Zstd, &data, 1, buf).expect("compresses");
        assert_eq!(out.as_ptr(), ptr, "the pooled buffer was reallocated");
        let noise: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let p = Payload::compressed(&noise, Coding::Zstd, 1);
        assert!(p.coding == Coding::Identity || p.body.len() <= noise.len());
        assert_eq!(p.len, noise.len() as u64);
        let p = Payload::compressed(&data, Coding::Identity, 1);
        assert_eq!((p.coding, &p.body[..]), (Coding::Identity, &data[..]));
    }

    #[test]
    fn token_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "one\n").expect("write");
        let cache = TokenCache {
            token: Token::File(path.clone()),
            cached: Mutex::new(None),
        };
        assert_eq!(cache.bearer().expect("read").as_deref(), Some("one"));
        // Rotation as a projected volume does it: a new file renamed over the old one.
        let next = dir.path().join("token.new");
        std::fs::write(&next, "two-rotated").expect("write");
        std::fs::rename(&next, &path).expect("rename");
        assert_eq!(
            cache.bearer().expect("read").as_deref(),
            Some("two-rotated")
        );
    }
}
