//! The admin server: `/metrics` (OpenMetrics text), `/healthz` and, for binaries that have a
//! notion of readiness, `/readyz`. Plain HTTP on its own listener, apart from the binary's work.

use std::{fmt, future::Future, io, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch};

/// The `Content-Type` of `/metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Render = dyn Fn() -> Result<String, fmt::Error> + Send + Sync;

/// What the admin server answers. Build it, then [`serve`](Admin::serve) it.
#[derive(Clone)]
pub struct Admin {
    render: Arc<Render>,
    health: &'static str,
    ready: Option<watch::Receiver<bool>>,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("health", &self.health)
            .field("ready", &self.ready.as_ref().map(|r| *r.borrow()))
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// `/metrics` answers what `render` renders at each scrape (500 with the error when it
    /// fails); `/healthz` answers `ok\n`; there is no `/readyz` until [`Admin::readiness`].
    pub fn new(render: impl Fn() -> Result<String, fmt::Error> + Send + Sync + 'static) -> Self {
        Self {
            render: Arc::new(render),
            health: "ok\n",
            ready: None,
        }
    }

    /// `/metrics` encodes `registry`.
    pub fn registry(registry: Arc<Registry>) -> Self {
        Self::new(move || {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry)?;
            Ok(text)
        })
    }

    /// The body of `/healthz` (its status is always 200): kept per binary, as probes and
    /// scripts already know it.
    pub fn health_body(mut self, body: &'static str) -> Self {
        self.health = body;
        self
    }

    /// Serves `/readyz`: 200 while `ready` holds `true`, 503 otherwise.
    pub fn readiness(mut self, ready: watch::Receiver<bool>) -> Self {
        self.ready = Some(ready);
        self
    }

    /// The routes, for a caller that serves them itself.
    pub fn router(self) -> Router {
        let health = self.health;
        let mut router = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(move || async move { health }));
        if self.ready.is_some() {
            router = router.route("/readyz", get(readyz));
        }
        router.with_state(self)
    }

    /// Serves on `listener` until `shutdown` resolves, then lets open requests finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

async fn metrics(State(admin): State<Admin>) -> Response {
    match (admin.render)() {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(admin): State<Admin>) -> StatusCode {
    match &admin.ready {
        Some(ready) if *ready.borrow() => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use prometheus_client::metrics::counter::Counter;

    use super::*;

    async fn start(admin: Admin) -> (String, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(admin.serve(listener, async {
            let _ = stopped.await;
        }));
        (base, stop)
    }

    async fn get(url: &str) -> (u16, Option<String>, String) {
        let r = reqwest::get(url).await.unwrap();
        let status = r.status().as_u16();
        let kind = r
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        (status, kind, r.text().await.unwrap())
    }

    #[tokio::test]
    async fn metrics_health_and_readiness() {
        let mut registry = Registry::default();
        let requests = Counter::<u64>::default();
        registry.register("requests", "Requests", requests.clone());
        requests.inc();
        let (ready_tx, ready_rx) = watch::channel(false);
        let admin = Admin::registry(Arc::new(registry))
            .health_body("ok")
            .readiness(ready_rx);
        let (base, _stop) = start(admin).await;

        let (status, kind, text) = get(&format!("{base}/metrics")).await;
        assert_eq!(status, 200);
        assert_eq!(kind.as_deref(), Some(OPENMETRICS));
        assert!(text.contains("requests_total 1"), "{text}");
        assert_eq!(get(&format!("{base}/healthz")).await.2, "ok");
        assert_eq!(get(&format!("{base}/readyz")).await.0, 503);
        ready_tx.send(true).unwrap();
        assert_eq!(get(&format!("{base}/readyz")).await.0, 200);
    }

    #[tokio::test]
    async fn without_readiness_there_is_no_readyz_and_render_errors_are_500() {
        let admin = Admin::new(|| Err(fmt::Error));
        let (base, _stop) = start(admin).await;
        assert_eq!(get(&format!("{base}/healthz")).await.2, "ok\n");
        assert_eq!(get(&format!("{base}/readyz")).await.0, 404);
        assert_eq!(get(&format!("{base}/metrics")).await.0, 500);
    }
}
