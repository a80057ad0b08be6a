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

/// A loopback address nobody listens on now.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A `metadata-api serve` process on file storage in its own directory, killed on drop.
#[derive(Debug)]
pub struct Api {
    pub child: Option<Child>,
    pub addr: String,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub extra: Vec<String>,
    /// Environment of the server process besides `RUST_LOG`.
    pub env: Vec<(String, String)>,
}

impl Api {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// As [`Api::start`], with `env` set for the server (e.g. `KUBECONFIG` for
    /// `--auth kubernetes`).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut api = Self::unstarted(extra);
        api.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        api.up();
        api
    }

    /// Directory, key and address, but no process yet (the API is "down").
    pub fn unstarted(extra: &[&str]) -> Self {
        let addr = free_addr();
        Self {
            child: None,
            url: format!("http://{addr}"),
            addr,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            env: Vec::new(),
        }
    }

    /// Starts the server (again) on the same address and storage.
    pub fn up(&mut self) {
        assert!(self.child.is_none());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = Command::new(api_bin())
                .arg("serve")
                .args(["--listen", &self.addr, "--storage"])
                .arg(format!(
                    "file://{}",
                    self.dir.path().join("streams").display()
                ))
                .arg("--key-file")
                .arg(self.key_file())
                .args(&self.extra)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            if line.starts_with("metadata-api listening on ") {
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

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("key")
    }

    pub fn token(&self, context: &str, scope: Scope) -> String {
        Keys::load_or_create(&self.key_file())
            .unwrap()
            .mint(context, scope, Duration::from_secs(3600))
            .unwrap()
    }

    /// Writes a write token for `CTX` to a file and returns its path.
    pub fn token_file(&self) -> PathBuf {
        let p = self.dir.path().join("token");
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
        let p = self.dir.path().join("collector-token");
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
        let http = reqwest::blocking::Client::new();
        let token = token.to_owned();
        let created: Value = http
            .post(format!("{}/logs", self.url))
            .bearer_auth(&token)
            .json(spec)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let id = created["id"].as_str().unwrap();
        let status: Value = http
            .get(format!("{}/logs/{id}", self.url))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let data = http
            .get(format!("{}/logs/{id}/data", self.url))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .bytes()
            .unwrap()
            .to_vec();
        (status, data)
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.kill();
    }
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
