//! Shared by the fuzz targets that go through the HTTP API: the real router (`metadata_api::app`)
//! over an in-memory object store, called without a socket, and the stream every request is
//! about.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{Router, body::Body};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use metadata_api::{
    AppState, app,
    auth::{Context, Keys, Scope},
    limits::{Budget, Limits},
    metrics::Metrics,
    range::Span,
    reason::DropReason,
    store::{Source, Store, Stream, StreamMeta},
};
use object_store::{memory::InMemory, path::Path};
use tower::ServiceExt;

/// The context of the stream requests are about: a trigger.
pub const CONTEXT: &str = "workflows/w/triggers/t";
/// Its name.
pub const NAME: &str = "stdout";

/// Process-wide pieces: the runtime, the keys and the tokens they sign.
pub struct Harness {
    pub rt: tokio::runtime::Runtime,
    pub keys: Keys,
    pub metrics: Arc<Metrics>,
    /// Writes (and reads) the stream's context.
    pub write_token: String,
    /// Reads every workflow.
    pub read_token: String,
}

pub fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let keys = Keys::from_secret(&[7u8; 32]);
        let ttl = Duration::from_secs(10 * 365 * 24 * 3600);
        Harness {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            write_token: keys.mint(CONTEXT, Scope::Write, ttl).expect("token"),
            read_token: keys.mint("workflows", Scope::Read, ttl).expect("token"),
            metrics: Arc::new(Metrics::new()),
            keys,
        }
    })
}

/// A service with fresh storage and its one stream.
pub struct Service {
    pub state: Arc<AppState>,
    pub stream: Arc<Stream>,
}

impl Harness {
    /// A service with `limits` over empty in-memory storage, with the stream created.
    pub fn service(&self, limits: Limits) -> Service {
        let store = Arc::new(Store::new(
            Arc::new(InMemory::new()),
            Path::from("fuzz"),
            self.metrics.clone(),
        ));
        let context = Context::stream(CONTEXT).expect("context");
        let id = self
            .keys
            .stream_id(&context, NAME, Source::Entrypoint.as_str());
        let meta = StreamMeta {
            context,
            name: NAME.to_owned(),
            source: Source::Entrypoint,
            entrypoint_absent: None,
            namespace: None,
            pod: None,
        };
        let stream = self
            .rt
            .block_on(store.create(id, meta))
            .expect("create the stream");
        let state = Arc::new(AppState {
            store,
            keys: self.keys.clone(),
            budget: Budget::new(limits),
            metrics: self.metrics.clone(),
            metrics_apart: false,
            kube: None,
        });
        Service { state, stream }
    }

    /// Sends `req` through the router. The body is read when `read_body` is set (a follower's body
    /// does not end) and must end within a few seconds.
    pub fn send(&self, svc: &Service, req: Request<Body>, read_body: bool) -> Reply {
        let router: Router = app(svc.state.clone());
        self.rt.block_on(async {
            let resp = router.oneshot(req).await.expect("infallible");
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = if read_body {
                let read = axum::body::to_bytes(resp.into_body(), 64 << 20);
                match tokio::time::timeout(Duration::from_secs(5), read).await {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => panic!("{status}: the body broke off: {e}"),
                    Err(_) => panic!("{status}: the body did not end"),
                }
            } else {
                Bytes::new()
            };
            Reply {
                status,
                headers,
                body,
            }
        })
    }

    /// A request with the write token.
    pub fn request(&self, method: http::Method, uri: &str) -> http::request::Builder {
        self.request_with(method, uri, &self.write_token)
    }

    /// A request with `token`.
    pub fn request_with(
        &self,
        method: http::Method,
        uri: &str,
        token: &str,
    ) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
    }

    /// Stores `data` at `offset` through the store.
    pub fn put(&self, svc: &Service, offset: u64, data: &'static [u8]) {
        self.rt
            .block_on(svc.state.store.write(
                &svc.stream,
                Some(offset),
                Bytes::from_static(data),
                None,
            ))
            .expect("store");
    }

    /// Marks `span` dropped for `reason` through the store.
    pub fn drop_range(&self, svc: &Service, span: Span, reason: DropReason) {
        self.rt
            .block_on(svc.state.store.mark_dropped(&svc.stream, span, reason))
            .expect("mark dropped");
    }

    /// Declares the final length through the store.
    pub fn finish(&self, svc: &Service, total: u64) {
        self.rt
            .block_on(svc.state.store.declare_final(&svc.stream, total))
            .expect("declare final");
    }

    /// The stream's bytes in `span` as the store reads them.
    pub fn read(&self, svc: &Service, span: Span) -> Bytes {
        self.rt
            .block_on(svc.state.store.read_all(&svc.stream, span))
            .expect("read")
    }
}

/// A response, its body read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// Panics unless the status is `want`.
    pub fn expect(&self, want: StatusCode, what: &dyn std::fmt::Debug) {
        assert_eq!(
            self.status,
            want,
            "{what:?}: answered {} {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
    }
}
