//! The real metadata-api binary on a real socket for tests, tokens, and readers of what it
//! stored. Test-only code: it panics on failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use metadata_api::auth::{Keys, Scope};
use serde_json::Value;

/// The context tests write in.
pub const CTX: &str = "workflows/w1/runs/r1/steps/s1";

/// The workspace's root directory.
pub fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The metadata-api binary: `RELAY_METADATA_API_BIN` (set by `cargo xtask test`), or a debug
/// build of it, built once here when missing.
pub fn api_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("metadata-api", "metadata-api", "RELAY_METADATA_API_BIN"))
}

/// The `operator` binary: `RELAY_OPERATOR_BIN`, or a debug build of it, built once here.
pub fn operator_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("operator", "operator", "RELAY_OPERATOR_BIN"))
}

/// Binary `bin` of workspace package `package`: the path in `env` when set, else the debug build
/// (`cargo build` runs first, a no-op when it is fresh).
pub fn workspace_bin(package: &str, bin: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from);
    let path = target.join("debug").join(bin);
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .current_dir(workspace())
        .status()
        .unwrap();
    assert!(status.success(), "building {bin} failed");
    assert!(path.exists(), "{} missing", path.display());
    path
}

/// The static entrypoint (`RELAY_ENTRYPOINT_STATIC`, set by `cargo xtask test`, or the
/// `cargo xtask build-entrypoint` output), or `None` after [`crate::skip_or_fail`] when missing.
pub fn static_entrypoint() -> Option<PathBuf> {
    let path = std::env::var_os("RELAY_ENTRYPOINT_STATIC").map_or_else(
        || workspace().join("target/x86_64-unknown-linux-musl/dist/entrypoint"),
        PathBuf::from,
    );
    if path.exists() {
        return Some(path);
    }
    crate::skip_or_fail(&format!(
        "no static entrypoint at {} (run `cargo xtask build-entrypoint`)",
        path.display()
    ));
    None
}

pub use crate::ports::free_addr;

/// The loopback address with a port the kernel picks: the server prints the one it got.
const ANY_PORT: &str = "127.0.0.1:0";

/// A `metadata-api serve` process, killed on drop: its key in `dir`, its streams on `storage`
/// (by default a file store in `dir`), with `extra` flags and `env`.
///
/// Started on a port the kernel picks ([`Api::start`], [`Api::start_on`]) or on a fixed address
/// ([`Api::unstarted`] then [`Api::up`], [`Api::start_full`]); [`Api::kill`] and [`Api::up`] bring
/// it down and back on the same address and storage.
#[derive(Debug)]
pub struct Api {
    pub child: Option<Child>,
    /// `host:port` it listens on (known before start unless the kernel picks the port).
    pub addr: String,
    pub url: String,
    /// The directory holding its key (and, by default, its file store).
    pub dir: PathBuf,
    pub key_file: PathBuf,
    /// The `--storage` URL.
    pub storage: String,
    pub extra: Vec<String>,
    /// Environment of the server process besides `RUST_LOG` (storage endpoints, credentials,
    /// `KUBECONFIG`); it wins over the fixture's `RUST_LOG=warn`.
    pub env: Vec<(String, String)>,
    /// The binary; [`api_bin`] when `None`.
    pub bin: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
}

/// How to start an [`Api`]; every field has a default.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApiOptions<'a> {
    /// The binary (e.g. the test's `CARGO_BIN_EXE_metadata-api`); default [`api_bin`].
    pub bin: Option<&'a Path>,
    /// The directory for the key (and the default file store); default a fresh temporary one,
    /// removed with the [`Api`].
    pub dir: Option<&'a Path>,
    /// The `--storage` URL; default `file://<dir>/streams`.
    pub storage: Option<&'a str>,
    /// The `--listen` address; default `127.0.0.1:0` (the kernel picks the port).
    pub listen: Option<&'a str>,
    pub extra: &'a [&'a str],
    pub env: &'a [(String, String)],
}

impl Api {
    /// Starts a server on a fresh file store, on a port the kernel picks.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// As [`Api::start`], with `env` set for the server (e.g. `KUBECONFIG` for
    /// `--auth kubernetes`).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut api = Self::unstarted_on(ANY_PORT, extra);
        api.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        api.up();
        api
    }

    /// Starts a server on `storage` with its key in `dir`.
    pub fn start_on(dir: &Path, storage: &str, extra: &[&str]) -> Self {
        Self::start_in(dir, storage, extra, &[])
    }

    /// As [`Api::start_on`], with extra environment variables (storage endpoints, credentials).
    pub fn start_in(dir: &Path, storage: &str, extra: &[&str], env: &[(String, String)]) -> Self {
        Self::start_full(dir, storage, ANY_PORT, extra, env)
    }

    /// Starts a server listening on `listen` (to bring one back on the same port).
    pub fn start_full(
        dir: &Path,
        storage: &str,
        listen: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Self {
        Self::start_with(&ApiOptions {
            dir: Some(dir),
            storage: Some(storage),
            listen: Some(listen),
            extra,
            env,
            ..ApiOptions::default()
        })
    }

    /// Starts a server as `options` say.
    pub fn start_with(options: &ApiOptions<'_>) -> Self {
        let mut api = Self::unstarted_with(options);
        api.up();
        api
    }

    /// Directory, key and a free address, but no process yet (the API is "down"): [`Api::up`]
    /// starts it.
    pub fn unstarted(extra: &[&str]) -> Self {
        let listen = free_addr();
        Self::unstarted_with(&ApiOptions {
            listen: Some(&listen),
            extra,
            ..ApiOptions::default()
        })
    }

    fn unstarted_on(listen: &str, extra: &[&str]) -> Self {
        Self::unstarted_with(&ApiOptions {
            listen: Some(listen),
            extra,
            ..ApiOptions::default()
        })
    }

    /// A server as `options` say, not started yet.
    pub fn unstarted_with(options: &ApiOptions<'_>) -> Self {
        let (dir, tmp) = match options.dir {
            Some(dir) => (dir.to_owned(), None),
            None => {
                let tmp = tempfile::tempdir().unwrap();
                (tmp.path().to_owned(), Some(tmp))
            }
        };
        let storage = options.storage.map_or_else(
            || format!("file://{}", dir.join("streams").display()),
            str::to_owned,
        );
        let listen = options.listen.unwrap_or(ANY_PORT);
        Self {
            child: None,
            url: format!("http://{listen}"),
            addr: listen.to_owned(),
            key_file: dir.join("key"),
            dir,
            storage,
            extra: options.extra.iter().map(|s| (*s).to_owned()).collect(),
            env: options.env.to_vec(),
            bin: options.bin.map(Path::to_owned),
            _tmp: tmp,
        }
    }

    /// Starts the server (again) on the same address and storage; on the first start with a
    /// kernel-picked port, records the address it got.
    pub fn up(&mut self) {
        assert!(self.child.is_none());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let bin = self.bin.as_deref().unwrap_or_else(|| api_bin());
            let mut child = Command::new(bin)
                .arg("serve")
                .args(["--listen", &self.addr, "--storage", &self.storage])
                .arg("--key-file")
                .arg(&self.key_file)
                .args(&self.extra)
                .env("RUST_LOG", "warn")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            if let Some(url) = line.trim().strip_prefix("metadata-api listening on ") {
                url.clone_into(&mut self.url);
                self.addr = url.strip_prefix("http://").unwrap_or(url).to_owned();
                self.child = Some(child);
                return;
            }
            // The port may still be held by the previous process's socket: try again.
            let _ = child.wait();
            assert!(Instant::now() < deadline, "server did not start: {line:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is up").id()
    }

    pub fn key_file(&self) -> PathBuf {
        self.key_file.clone()
    }

    pub fn keys(&self) -> Keys {
        Keys::load_or_create(&self.key_file).unwrap()
    }

    pub fn token(&self, context: &str, scope: Scope) -> String {
        self.keys()
            .mint(context, scope, Duration::from_secs(3600))
            .unwrap()
    }

    /// An async client of this server bound to `token`.
    pub fn client(&self, token: &str) -> Client {
        Client {
            http: reqwest::Client::new(),
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

    /// Writes a write token for `CTX` to a file and returns its path.
    pub fn token_file(&self) -> PathBuf {
        let p = self.dir.join("token");
        std::fs::write(&p, self.token(CTX, Scope::Write)).unwrap();
        p
    }

    /// An `entrypoint` command shipping to this API with `CTX`'s write token.
    pub fn wrap_with(&self, entrypoint: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(entrypoint);
        c.env("RELAY_METADATA_API_URL", &self.url)
            .env("RELAY_METADATA_API_TOKEN_FILE", self.token_file())
            .args(args);
        c
    }

    /// Writes a collector token (for every context) to a file and returns its path.
    pub fn collector_token_file(&self) -> PathBuf {
        let p = self.dir.join("collector-token");
        std::fs::write(&p, self.token("workflows", Scope::Collector)).unwrap();
        p
    }

    /// Status and stored bytes of the `name` stream in `CTX` (entrypoint source).
    pub fn read(&self, name: &str) -> (Value, Vec<u8>) {
        let token = self.token(CTX, Scope::Write);
        self.read_with(&token, &serde_json::json!({ "name": name }))
    }

    /// Status and stored bytes of the `ebpf` stream `name` in `context`.
    pub fn read_ebpf(&self, context: &str, name: &str) -> (Value, Vec<u8>) {
        let token = self.token("workflows", Scope::Collector);
        self.read_with(
            &token,
            &serde_json::json!({ "name": name, "context": context, "source": "ebpf" }),
        )
    }

    /// Status and stored bytes of stream `name` of `source` (`entrypoint` or `ebpf`) in
    /// `context`, read with tokens signed by this API's key.
    pub fn read_in(&self, context: &str, name: &str, source: &str) -> (Value, Vec<u8>) {
        if source == "ebpf" {
            return self.read_ebpf(context, name);
        }
        let token = self.token(context, Scope::Write);
        self.read_with(&token, &serde_json::json!({ "name": name }))
    }

    fn read_with(&self, token: &str, spec: &Value) -> (Value, Vec<u8>) {
        read_stream_at(&self.url, token, spec)
    }
}

/// Status and stored bytes of the stream `spec` names (a `POST /logs` body: `name`, and
/// `context` and `source` for another context or the collector's path) at the API at `url`.
pub fn read_stream_at(url: &str, token: &str, spec: &Value) -> (Value, Vec<u8>) {
    let http = reqwest::blocking::Client::new();
    let created: Value = http
        .post(format!("{url}/logs"))
        .bearer_auth(token)
        .json(spec)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = created["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no stream for {spec}: {created}"));
    let status: Value = http
        .get(format!("{url}/logs/{id}"))
        .bearer_auth(token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let data = http
        .get(format!("{url}/logs/{id}/data"))
        .bearer_auth(token)
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .to_vec();
    (status, data)
}

impl Drop for Api {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client bound to one token.
#[derive(Clone, Debug)]
pub struct Client {
    pub http: reqwest::Client,
    pub url: String,
    pub token: Option<String>,
}

impl Client {
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub async fn create(&self, body: Value) -> reqwest::Response {
        self.req(reqwest::Method::POST, "/logs")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Creates `name` and returns its id.
    pub async fn stream(&self, name: &str) -> String {
        let r = self.create(serde_json::json!({ "name": name })).await;
        assert_eq!(r.status(), reqwest::StatusCode::OK);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Creates (or finds) the collector's stream `name` in `context`; returns its id.
    pub async fn ebpf_stream(&self, name: &str, context: &str) -> String {
        let r = self
            .create(serde_json::json!({ "name": name, "source": "ebpf", "context": context }))
            .await;
        assert_eq!(r.status(), reqwest::StatusCode::OK);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn patch(
        &self,
        id: &str,
        range: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.req(reqwest::Method::PATCH, &format!("/logs/{id}/data"))
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
        assert_eq!(
            status,
            reqwest::StatusCode::ACCEPTED,
            "{}",
            r.text().await.unwrap()
        );
    }

    /// PATCHes `body` with a `Content-Encoding`.
    pub async fn patch_encoded(
        &self,
        id: &str,
        range: &str,
        encoding: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.req(reqwest::Method::PATCH, &format!("/logs/{id}/data"))
            .header("content-range", range)
            .header("content-encoding", encoding)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path` and returns the body text.
    pub async fn text(&self, path: &str) -> String {
        self.req(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// GETs `path` as NDJSON and returns the body text.
    pub async fn ndjson_text(&self, path: &str) -> String {
        self.req(reqwest::Method::GET, path)
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
        assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    }

    /// A `dropped` marker as a writer older than reasons sends it: without one.
    pub async fn mark(&self, id: &str, range: &str) -> reqwest::Response {
        self.req(reqwest::Method::POST, &format!("/logs/{id}/markers"))
            .json(&serde_json::json!({"range": range, "markers": ["dropped"]}))
            .send()
            .await
            .unwrap()
    }

    /// A `dropped` marker for `reason` (its code, `buffer-full`).
    pub async fn mark_for(&self, id: &str, range: &str, reason: &str) -> reqwest::Response {
        self.req(reqwest::Method::POST, &format!("/logs/{id}/markers"))
            .json(&serde_json::json!({"range": range, "markers": ["dropped"], "reason": reason}))
            .send()
            .await
            .unwrap()
    }

    pub async fn status(&self, id: &str) -> Value {
        let r = self
            .req(reqwest::Method::GET, &format!("/logs/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::OK);
        r.json().await.unwrap()
    }

    pub async fn data(&self, id: &str) -> Vec<u8> {
        let r = self
            .req(reqwest::Method::GET, &format!("/logs/{id}/data"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::OK);
        r.bytes().await.unwrap().to_vec()
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

/// Byte ranges `[start, end)` listed under `key` in a status document.
pub fn spans(status: &Value, key: &str) -> Vec<(u64, u64)> {
    status[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["start"].as_u64().unwrap(), s["end"].as_u64().unwrap()))
        .collect()
}

/// Asserts the stream is complete with `expected` as its content: stored bytes equal `expected`
/// at their offsets and stored plus dropped ranges cover all of it. Returns the dropped bytes.
pub fn assert_accounted(status: &Value, stored: &[u8], expected: &[u8]) -> u64 {
    assert_eq!(status["final_length"], expected.len() as u64, "{status}");
    assert_eq!(status["complete"], true, "{status}");
    let mut want = Vec::new();
    for (a, b) in spans(status, "stored") {
        want.extend_from_slice(&expected[a as usize..b as usize]);
    }
    assert!(
        stored == want,
        "stored bytes differ from what the command wrote"
    );
    let dropped: u64 = spans(status, "dropped").iter().map(|(a, b)| b - a).sum();
    assert_eq!(
        stored.len() as u64 + dropped,
        expected.len() as u64,
        "{status}"
    );
    dropped
}

pub fn sha256(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(b))
}

/// Waits for `f` to hold, failing after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
