//! Configuration and start-up of the service.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use object_store::{
    BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig,
    aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut},
    gcp::{GoogleCloudStorageBuilder, GoogleConfigKey},
    local::LocalFileSystem,
    memory::InMemory,
    path::Path,
};

use crate::{
    auth::Keys,
    conn::{self, ConnLimits},
    limits::{Budget, Limits},
    metrics::Metrics,
    routes::{AppState, app, metrics_app},
    store::Store,
};

/// How callers prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// JWTs signed with the key in `--key-file` (mint them with `metadata-api token`).
    Hmac,
    /// Projected ServiceAccount tokens, checked with TokenReview; the pod's labels give its
    /// context ([`crate::kube_auth`]). `hmac` tokens keep working alongside.
    Kubernetes,
}

/// `metadata-api serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "RELAY_METADATA_API_LISTEN",
        default_value = "127.0.0.1:7070"
    )]
    pub listen: SocketAddr,
    /// Serve `/metrics` (and `/healthz`, `/readyz`) on this address instead of `--listen`. The
    /// metrics name workflows; in a cluster where tenant pods reach the API, give Prometheus this
    /// port and keep it from tenants (the deploy manifests' NetworkPolicy does).
    #[arg(long, env = "RELAY_METADATA_API_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Storage URL: `file:///dir`, `memory://`, `s3://bucket/prefix` or `gs://bucket/prefix`
    /// (endpoint and credentials from the usual AWS_* / GOOGLE_* variables). Default: `./data/streams`.
    #[arg(long, env = "RELAY_METADATA_API_STORAGE")]
    pub storage: Option<String>,
    /// Authentication mode.
    #[arg(
        long,
        env = "RELAY_METADATA_API_AUTH",
        value_enum,
        default_value = "hmac"
    )]
    pub auth: AuthMode,
    /// Secret key file (created with mode 0600 when missing).
    #[arg(
        long,
        env = "RELAY_METADATA_API_KEY_FILE",
        default_value = "data/metadata-api.key"
    )]
    pub key_file: PathBuf,
    /// Token keys of their own (repeat the flag, or comma-separate the variable): new tokens are
    /// signed with the first, tokens of any are accepted, and stream ids stay derived from
    /// `--key-file`. To rotate: put a new file first and keep the old one (the `--key-file`
    /// itself when no token keys were set) after it until tokens it signed have expired, then
    /// drop it. Files are created (32 random bytes as hex) when missing.
    #[arg(
        long = "token-key-file",
        env = "RELAY_METADATA_API_TOKEN_KEY_FILES",
        value_delimiter = ','
    )]
    pub token_key_files: Vec<PathBuf>,
    /// Largest request body on the wire (bytes; K/M/G suffixes are binary).
    #[arg(long, env = "RELAY_METADATA_API_MAX_BODY", default_value = "16M", value_parser = parse_size)]
    pub max_body: u64,
    /// Largest body after gzip or zstd decoding.
    #[arg(long, env = "RELAY_METADATA_API_MAX_DECODED", default_value = "64M", value_parser = parse_size)]
    pub max_decoded: u64,
    /// Bytes per second one stream may append.
    #[arg(long, env = "RELAY_METADATA_API_STREAM_RATE", default_value = "64M", value_parser = parse_size)]
    pub stream_rate: u64,
    /// Bytes per second the service accepts in all.
    #[arg(long, env = "RELAY_METADATA_API_GLOBAL_RATE", default_value = "1G", value_parser = parse_size)]
    pub global_rate: u64,
    /// Body bytes one stream may have in flight.
    #[arg(long, env = "RELAY_METADATA_API_STREAM_INFLIGHT", default_value = "64M", value_parser = parse_size)]
    pub stream_inflight: u64,
    /// Body bytes the service may have in flight.
    #[arg(long, env = "RELAY_METADATA_API_GLOBAL_INFLIGHT", default_value = "512M", value_parser = parse_size)]
    pub global_inflight: u64,
    /// Bytes per second one tenant (its namespace under `--auth kubernetes`, else its workflow)
    /// may append over all its streams: a quarter of the service's by default, so that one tenant
    /// at many times its share leaves the others theirs.
    #[arg(long, env = "RELAY_METADATA_API_TENANT_RATE", default_value = "256M", value_parser = parse_size)]
    pub tenant_rate: u64,
    /// Body bytes one tenant may have in flight.
    #[arg(long, env = "RELAY_METADATA_API_TENANT_INFLIGHT", default_value = "128M", value_parser = parse_size)]
    pub tenant_inflight: u64,
    /// Open client connections in all; lowered to fit under the open-files limit (which is
    /// raised to the host's hard limit at start).
    #[arg(long, env = "RELAY_METADATA_API_MAX_CONNECTIONS", default_value_t = ConnLimits::default().max_connections)]
    pub max_connections: usize,
    /// Open connections from one peer address (a pod, a node's collector): one tenant cannot
    /// take the connections of the others.
    #[arg(long, env = "RELAY_METADATA_API_MAX_CONNECTIONS_PER_PEER", default_value_t = ConnLimits::default().max_per_peer)]
    pub max_connections_per_peer: usize,
    /// Time for a request's head to arrive whole; also how long a kept-alive connection may
    /// stay idle.
    #[arg(long, env = "RELAY_METADATA_API_HEAD_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub head_timeout: Duration,
    /// Slowest accepted upload (bytes per second, K/M/G suffixes): a body must arrive within
    /// `--head-timeout` plus its declared size at this rate (its largest allowed size when
    /// undeclared).
    #[arg(long, env = "RELAY_METADATA_API_BODY_MIN_RATE", default_value = "64K", value_parser = parse_size)]
    pub body_min_rate: u64,
    /// Streams kept in memory beyond those being written or read now: the least recently used
    /// are evicted past it (and loaded again from storage when next touched), so memory follows
    /// the streams in use, not every stream ever seen.
    #[arg(long, env = "RELAY_METADATA_API_STREAM_CACHE", default_value_t = crate::store::STREAM_CACHE)]
    pub stream_cache: usize,
    /// This process's name among the writers of a stream: unique among the replicas sharing the
    /// storage, and best kept across restarts (the pod's name). A write is checked against the
    /// other replicas' parts with one more request only while another replica writes the same
    /// stream. Random when unset: a restart then looks like another replica for a few minutes.
    #[arg(long, env = "RELAY_METADATA_API_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// How long a listing of a stream's writers that showed this replica alone vouches for its
    /// writes; the first write a replica shares with another waits a quarter longer than this.
    #[arg(long, env = "RELAY_METADATA_API_WRITER_WINDOW", default_value = "6s", value_parser = humantime::parse_duration)]
    pub writer_window: Duration,
    /// Delete a workflow run's or trigger's streams once nothing of them has been stored for
    /// this long (`30d`, `12h`; index entries included). Unset: streams are kept until deleted.
    #[arg(long, env = "RELAY_METADATA_API_RETENTION", value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
    /// How often retention is enforced (by one replica: they take turns through the storage).
    #[arg(long, env = "RELAY_METADATA_API_RETENTION_EVERY", default_value = "1h", value_parser = humantime::parse_duration)]
    pub retention_every: Duration,
    /// Settings of `--auth kubernetes`.
    #[command(flatten)]
    pub kubernetes: crate::kube_auth::KubeAuthArgs,
}

pub use crate::size::parse_size;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid storage URL {url:?}: {reason}")]
    Storage { url: String, reason: String },
    #[error(transparent)]
    Key(#[from] crate::auth::KeyError),
    #[error("cannot start Kubernetes authentication")]
    Kubernetes(#[from] crate::kube_auth::StartError),
}

/// Opens the object store a storage URL names, and the prefix inside it.
pub fn open_storage(url: Option<&str>) -> Result<(Arc<dyn ObjectStore>, Path), ConfigError> {
    let bad = |url: &str, reason: String| ConfigError::Storage {
        url: url.to_owned(),
        reason,
    };
    let Some(url) = url else {
        return open_dir("data/streams", "data/streams");
    };
    if let Some(dir) = url.strip_prefix("file://") {
        return open_dir(url, dir);
    }
    if url == "memory://" || url == "memory:" {
        return Ok((Arc::new(InMemory::new()), Path::default()));
    }
    let parsed = url::Url::parse(url).map_err(|e| bad(url, e.to_string()))?;
    let bucket = parsed
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| bad(url, "missing bucket".into()))?;
    let prefix = Path::from(parsed.path().trim_matches('/'));
    let store: Arc<dyn ObjectStore> = match parsed.scheme() {
        "s3" => Arc::new(
            AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), TIMEOUT)
                .with_config(
                    AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                    CONNECT_TIMEOUT,
                )
                .with_retry(retry_config())
                // Parts and markers are written with `If-None-Match: *` (S3 supports it natively).
                .with_conditional_put(S3ConditionalPut::ETagMatch)
                .build()
                .map_err(|e| bad(url, e.to_string()))?,
        ),
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_config(GoogleConfigKey::Client(ClientConfigKey::Timeout), TIMEOUT)
                .with_config(
                    GoogleConfigKey::Client(ClientConfigKey::ConnectTimeout),
                    CONNECT_TIMEOUT,
                )
                .with_retry(retry_config())
                .build()
                .map_err(|e| bad(url, e.to_string()))?,
        ),
        other => return Err(bad(url, format!("unsupported scheme {other:?}"))),
    };
    Ok((store, prefix))
}

/// Requests to object storage: a part is at most `--max-body` (16 MiB by default), so 20 s is
/// generous for one; a store that stops answering frees the API's in-flight budget after that
/// instead of object_store's 30 s. Set through config keys, which keep what the environment set
/// (`AWS_ALLOW_HTTP`...), unlike replacing the client options.
const TIMEOUT: &str = "20s";
const CONNECT_TIMEOUT: &str = "5s";

/// Retries of failed storage requests: short backoffs (at most 1 s apart, not object_store's
/// 15 s) and 30 s in all, so the API resumes storing about a second after its storage comes back
/// instead of tens of seconds later, and a writer gets its 503 (and retries, or drops with a
/// marker) instead of waiting minutes.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: Duration::from_secs(30),
    }
}

/// The directory of a `file://` storage URL (or of the default), where [`open_storage`] puts a
/// local file system store.
pub fn local_dir(url: Option<&str>) -> Option<PathBuf> {
    let dir = match url {
        None => "data/streams",
        Some(url) => url.strip_prefix("file://")?,
    };
    std::fs::canonicalize(dir).ok()
}

fn open_dir(url: &str, dir: &str) -> Result<(Arc<dyn ObjectStore>, Path), ConfigError> {
    let bad = |reason: String| ConfigError::Storage {
        url: url.to_owned(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
    let fs = LocalFileSystem::new_with_prefix(dir).map_err(|e| bad(e.to_string()))?;
    Ok((Arc::new(fs), Path::default()))
}

impl ServeArgs {
    /// Builds the service state; errors here are configuration errors (exit 64). In `kubernetes`
    /// mode this connects to the API server and waits for the first list of pods.
    pub async fn state(&self) -> Result<Arc<AppState>, ConfigError> {
        let Self {
            listen: _,
            metrics_listen,
            storage,
            auth,
            key_file,
            token_key_files,
            max_body,
            max_decoded,
            stream_rate,
            global_rate,
            stream_inflight,
            global_inflight,
            tenant_rate,
            tenant_inflight,
            max_connections: _,
            max_connections_per_peer: _,
            head_timeout,
            body_min_rate,
            stream_cache,
            replica_id,
            writer_window,
            retention: _,
            retention_every: _,
            kubernetes,
        } = self;
        let kube = match auth {
            AuthMode::Hmac => None,
            AuthMode::Kubernetes => Some(crate::kube_auth::KubeAuth::start(kubernetes).await?),
        };
        let keys = Keys::load_or_create(key_file)?.with_token_key_files(token_key_files)?;
        let metrics = Arc::new(Metrics::new());
        let (os, prefix) = open_storage(storage.as_deref())?;
        let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let limits = Limits {
            max_body: clamp(*max_body),
            max_decoded: clamp(*max_decoded),
            stream_rate: *stream_rate,
            global_rate: *global_rate,
            stream_inflight: *stream_inflight,
            global_inflight: *global_inflight,
            tenant_rate: *tenant_rate,
            tenant_inflight: *tenant_inflight,
            body_min_rate: (*body_min_rate).max(1),
            body_grace: *head_timeout,
        };
        let mut store = Store::new(os, prefix, metrics.clone())
            .cache_capacity((*stream_cache).max(1))
            .writer_window(*writer_window);
        if let Some(name) = replica_id {
            store = store.replica(name);
        }
        if let Some(dir) = local_dir(storage.as_deref()) {
            store = store.local_dir(dir);
        }
        Ok(Arc::new(AppState {
            store: Arc::new(store),
            keys,
            budget: Budget::new(limits),
            metrics,
            metrics_apart: metrics_listen.is_some(),
            kube,
        }))
    }

    /// The retention settings, when `--retention` is given.
    pub fn retention(&self) -> Option<crate::retention::Retention> {
        self.retention.map(|age| crate::retention::Retention {
            age,
            every: self.retention_every.max(Duration::from_secs(1)),
        })
    }

    /// The connection limits, fitted under `open_files` (see [`conn::raise_open_files`]).
    pub fn conn_limits(&self, open_files: u64) -> ConnLimits {
        let max_connections = conn::fit_connections(self.max_connections, open_files);
        if max_connections < self.max_connections {
            tracing::warn!(
                wanted = self.max_connections,
                max_connections,
                open_files,
                "Fewer connections than asked for: the open-files limit is lower."
            );
        }
        ConnLimits {
            max_connections,
            max_per_peer: self.max_connections_per_peer.clamp(1, max_connections),
            head_timeout: self.head_timeout,
        }
    }
}

/// Serves until SIGINT or SIGTERM; in-flight requests get `grace` to finish. `metrics`: the
/// listener of `--metrics-listen`, served alongside.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    state: Arc<AppState>,
    limits: ConnLimits,
    grace: Duration,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        stop.await;
        tracing::info!("Shutting down.");
        let _ = tx.send(());
    };
    let metrics = async {
        match metrics {
            Some(listener) => {
                conn::serve(
                    listener,
                    metrics_app(state.clone()),
                    limits,
                    state.metrics.clone(),
                    std::future::pending(),
                )
                .await
            }
            None => std::future::pending().await,
        }
    };
    let server = conn::serve(
        listener,
        app(state.clone()),
        limits,
        state.metrics.clone(),
        shutdown,
    );
    let server = std::pin::pin!(server);
    tokio::select! {
        r = server => r,
        r = metrics => r,
        // Followers never end by themselves: after the grace period, stop waiting for them.
        () = async { let _ = rx.await; tokio::time::sleep(grace).await } => Ok(()),
    }
}

/// What `metadata-api serve` runs once its listeners are bound: retention, when `args` ask for
/// it, and the server with the connection limits `args` give (fitted under `open_files`), until
/// `stop` resolves. Tests run it in process with the arguments the binary takes.
pub async fn run(
    args: &ServeArgs,
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    open_files: u64,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Some(retention) = args.retention() {
        tracing::info!(age = ?retention.age, every = ?retention.every, "Retention on.");
        tokio::spawn(crate::retention::run(
            state.store.clone(),
            state.keys.clone(),
            retention,
        ));
    }
    let limits = args.conn_limits(open_files);
    tracing::info!(
        max_connections = limits.max_connections,
        max_per_peer = limits.max_per_peer,
        open_files,
        "Connection limits."
    );
    serve(listener, metrics, state, limits, SHUTDOWN_GRACE, stop).await
}

/// How long a stopping server waits for followers, which never end by themselves.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
