//! Test helpers: the real `metadata-api` binary on a real socket, tokens, a small client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use metadata_api::auth::{Keys, Scope};
use reqwest::{Client, Method, Response, StatusCode};
use serde_json::{Value, json};
pub mod kube_bed;

pub const CTX: &str = "workflows/w1/runs/r1/steps/s1";
pub const TRIGGER: &str = "workflows/w1/triggers/t1";

/// A `metadata-api serve` process, killed on drop.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub dir: PathBuf,
    pub key_file: PathBuf,
    pub storage: String,
    pub env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server on a fresh file store.
    pub fn start(extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let storage = format!("file://{}", dir.join("streams").display());
        let mut s = Self::start_on(&dir, &storage, extra);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on `storage` with its key in `dir`.
    pub fn start_on(dir: &Path, storage: &str, extra: &[&str]) -> Self {
        Self::start_with_env(dir, storage, extra, &[])
    }

    /// Starts a server with extra environment variables (storage endpoints, credentials).
    pub fn start_with_env(
        dir: &Path,
        storage: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Self {
        Self::start_full(dir, storage, "127.0.0.1:0", extra, env)
    }

    /// Starts a server listening on `listen` (to bring one back on the same port).
    pub fn start_full(
        dir: &Path,
        storage: &str,
        listen: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Self {
        let key_file = dir.join("key");
        let mut child = Command::new(env!("CARGO_BIN_EXE_metadata-api"))
            .arg("serve")
            .args(["--listen", listen, "--storage", storage, "--key-file"])
            .arg(&key_file)
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("metadata-api listening on ")
            .unwrap_or_else(|| panic!("server did not start: {line:?}"))
            .to_owned();
        Self {
            child,
            url,
            dir: dir.to_owned(),
            key_file,
            storage: storage.to_owned(),
            env: env.to_vec(),
            _tmp: None,
        }
    }

    pub fn keys(&self) -> Keys {
        Keys::load_or_create(&self.key_file).unwrap()
    }

    pub fn token(&self, context: &str, scope: Scope) -> String {
        self.keys()
            .mint(context, scope, Duration::from_secs(3600))
            .unwrap()
    }

    pub fn client(&self, token: &str) -> Api {
        Api {
            http: Client::new(),
            url: self.url.clone(),
            token: Some(token.to_owned()),
        }
    }

    /// The server's `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The sum of the samples whose line starts with `name` (a metric's name, or its name and
    /// labels).
    pub async fn metric(&self, name: &str) -> f64 {
        sum_metric(&self.metrics().await, name)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client bound to one token.
#[derive(Clone)]
pub struct Api {
    pub http: Client,
    pub url: String,
    pub token: Option<String>,
}

impl Api {
    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub async fn create(&self, body: Value) -> Response {
        self.req(Method::POST, "/logs")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Creates `name` and returns its id.
    pub async fn stream(&self, name: &str) -> String {
        let r = self.create(json!({ "name": name })).await;
        assert_eq!(r.status(), StatusCode::OK);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Creates (or finds) the collector's stream `name` in `context`; returns its id.
    pub async fn ebpf_stream(&self, name: &str, context: &str) -> String {
        let r = self
            .create(json!({ "name": name, "source": "ebpf", "context": context }))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn patch(&self, id: &str, range: &str, body: impl Into<reqwest::Body>) -> Response {
        self.req(Method::PATCH, &format!("/logs/{id}/data"))
            .header("content-type", "application/octet-stream")
            .header("content-range", range)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// PATCHes `data` at `offset` and asserts 202.
    pub async fn put_at(&self, id: &str, offset: u64, data: &[u8]) {
        let r = self
            .patch(
                id,
                &format!("bytes {offset}-{}/*", offset + data.len() as u64 - 1),
                data.to_vec(),
            )
            .await;
        let status = r.status();
        assert_eq!(status, StatusCode::ACCEPTED, "{}", r.text().await.unwrap());
    }

    /// PATCHes `body` with a `Content-Encoding`.
    pub async fn patch_encoded(
        &self,
        id: &str,
        range: &str,
        encoding: &str,
        body: impl Into<reqwest::Body>,
    ) -> Response {
        self.req(Method::PATCH, &format!("/logs/{id}/data"))
            .header("content-range", range)
            .header("content-encoding", encoding)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path` and returns the body text.
    pub async fn text(&self, path: &str) -> String {
        self.req(Method::GET, path)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// GETs `path` as NDJSON and returns the body text.
    pub async fn ndjson_text(&self, path: &str) -> String {
        self.req(Method::GET, path)
            .header("accept", "application/x-ndjson")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// GETs `path` as NDJSON and returns its records.
    pub async fn ndjson(&self, path: &str) -> Vec<Value> {
        self.ndjson_text(path)
            .await
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// GETs `path` and returns the body as JSON.
    pub async fn json(&self, path: &str) -> Value {
        serde_json::from_str(&self.text(path).await).unwrap()
    }

    pub async fn finish(&self, id: &str, total: u64) {
        let r = self
            .patch(id, &format!("bytes */{total}"), Vec::new())
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }

    pub async fn mark(&self, id: &str, range: &str) -> Response {
        self.req(Method::POST, &format!("/logs/{id}/markers"))
            .json(&json!({"range": range, "markers": ["dropped"]}))
            .send()
            .await
            .unwrap()
    }

    pub async fn status(&self, id: &str) -> Value {
        let r = self
            .req(Method::GET, &format!("/logs/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    pub async fn data(&self, id: &str) -> Vec<u8> {
        let r = self
            .req(Method::GET, &format!("/logs/{id}/data"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.bytes().await.unwrap().to_vec()
    }
}

/// Polls `f` until it returns `Some`, failing after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of the samples in `metrics` whose line starts with `name`.
pub fn sum_metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A loopback address nobody listens on now.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

pub fn sha256(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(b))
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn scope(s: &str) -> Scope {
    match s {
        "read" => Scope::Read,
        "write" => Scope::Write,
        _ => Scope::Collector,
    }
}
