//! The webhook's routes and its HTTPS server (HTTP/1.1 and HTTP/2, graceful shutdown). The
//! certificate it serves, and how a renewed one replaces it, are in [`crate::tls`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::{MUTATE_PATH, Reply, Webhook};
use crate::tls::{ReloadingCert, WebhookTls, server_config};

async fn mutate_handler(State(webhook): State<Arc<Webhook>>, body: Bytes) -> Reply {
    webhook.review(&body).await
}

/// The webhook's routes: `POST` [`MUTATE_PATH`], with the body limit of the configuration.
pub fn router(webhook: Arc<Webhook>) -> Router {
    let limit = webhook.config.max_body_bytes;
    Router::new()
        .route(MUTATE_PATH, post(mutate_handler))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(webhook)
}

/// Why the webhook server stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid TLS material: {0}")]
    Material(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("accepting connections: {0}")]
    Accept(#[from] std::io::Error),
}

/// Serves the webhook over HTTPS (HTTP/1.1 and HTTP/2) on `listener` until `shutdown`
/// completes, then waits up to 10 s for open connections to finish.
///
/// The certificate is `tls`'s current value and follows its changes: new handshakes get a new
/// certificate as soon as it is sent. Material that does not parse is logged and ignored (the
/// previous certificate stays); at start it is an error.
pub async fn serve(
    listener: TcpListener,
    mut tls: watch::Receiver<WebhookTls>,
    webhook: Arc<Webhook>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cert = Arc::new(ReloadingCert::new(&tls.borrow_and_update(), &provider)?);
    let config = server_config(&provider, Arc::clone(&cert))?;
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let reload = tokio::spawn(cert.follow(tls, Arc::clone(&provider)));

    let service = TowerToHyperService::new(router(Arc::clone(&webhook)));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let handshake_timeout = webhook.config.tls_handshake_timeout;
    let mut shutdown = std::pin::pin!(shutdown);
    let result = loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; continuing");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => break Err(ServeError::Accept(e)),
            },
            () = &mut shutdown => break Ok(()),
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    };
    reload.abort();
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("webhook connections still open after 10 s; closing");
    }
    result
}

/// Errors of `accept` that concern one connection or a momentary shortage, not the listener.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e
        .raw_os_error()
        .is_some_and(|code| code == 24 || code == 23) // EMFILE, ENFILE
}
