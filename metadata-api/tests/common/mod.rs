//! Test helpers: the real `metadata-api` binary on a real socket, tokens and a small client
//! (testbed's fixtures, under the names these tests use), and a few of this crate's own.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::{
    ops::{Deref, DerefMut},
    path::Path,
    time::{Duration, Instant},
};

use metadata_api::auth::Scope;
pub use testbed::{
    api::{ApiOptions, CTX, Client as Api, free_addr, sha256, sum_metric},
    emulators::Emulator,
    ports::free_port,
};
pub mod kube_bed;

/// testbed's metadata API fixture running this crate's own build of the binary.
#[derive(Debug)]
pub struct Server(pub testbed::api::Api);

impl Server {
    /// Starts a server on a fresh file store.
    pub fn start(extra: &[&str]) -> Self {
        Self::with(ApiOptions {
            extra,
            ..ApiOptions::default()
        })
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
        Self::with(ApiOptions {
            dir: Some(dir),
            storage: Some(storage),
            listen: Some(listen),
            extra,
            env,
            ..ApiOptions::default()
        })
    }

    fn with(options: ApiOptions<'_>) -> Self {
        Self(testbed::api::Api::start_with(&ApiOptions {
            bin: Some(Path::new(env!("CARGO_BIN_EXE_metadata-api"))),
            ..options
        }))
    }
}

impl Deref for Server {
    type Target = testbed::api::Api;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

pub const TRIGGER: &str = "workflows/w1/triggers/t1";

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
