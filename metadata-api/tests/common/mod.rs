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

/// The metadata API under test: in this process (the router and its connection handling on a
/// real loopback socket, started from the same arguments as the binary), or testbed's fixture
/// running this crate's own build of the binary where a test needs the process itself (its pid,
/// its memory, its environment, a kill -9).
#[derive(Debug)]
pub struct Server {
    api: testbed::api::Api,
    /// In process: the runtime the server runs on; dropping it stops the server.
    runtime: Option<tokio::runtime::Runtime>,
    in_process: bool,
}

/// `metadata-api serve`'s arguments, parsed as the binary parses them.
#[derive(clap::Parser)]
struct ServeCli {
    #[command(flatten)]
    serve: metadata_api::server::ServeArgs,
}

impl Server {
    /// Starts a server in this process on a fresh file store.
    pub fn start(extra: &[&str]) -> Self {
        let mut server = Self {
            api: testbed::api::Api::unstarted_with(&ApiOptions {
                extra,
                ..ApiOptions::default()
            }),
            runtime: None,
            in_process: true,
        };
        server.up();
        server
    }

    /// Starts the binary on a fresh file store.
    pub fn process(extra: &[&str]) -> Self {
        Self::with(ApiOptions {
            extra,
            ..ApiOptions::default()
        })
    }

    /// Starts the binary on `storage` with its key in `dir`.
    pub fn start_on(dir: &Path, storage: &str, extra: &[&str]) -> Self {
        Self::start_with_env(dir, storage, extra, &[])
    }

    /// Starts the binary with extra environment variables (storage endpoints, credentials).
    pub fn start_with_env(
        dir: &Path,
        storage: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Self {
        Self::start_full(dir, storage, "127.0.0.1:0", extra, env)
    }

    /// Starts the binary listening on `listen` (to bring one back on the same port).
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
        Self {
            api: testbed::api::Api::start_with(&ApiOptions {
                bin: Some(Path::new(env!("CARGO_BIN_EXE_metadata-api"))),
                ..options
            }),
            runtime: None,
            in_process: false,
        }
    }

    /// Starts the server (again) on the same address and storage.
    pub fn up(&mut self) {
        if !self.in_process {
            self.api.up();
            return;
        }
        assert!(self.runtime.is_none(), "the server is up");
        let api = &mut self.api;
        let mut argv = vec![
            "serve".to_owned(),
            "--listen".to_owned(),
            api.addr.clone(),
            "--storage".to_owned(),
            api.storage.clone(),
            "--key-file".to_owned(),
            api.key_file.display().to_string(),
        ];
        argv.extend(api.extra.iter().cloned());
        let args = <ServeCli as clap::Parser>::try_parse_from(argv)
            .unwrap()
            .serve;
        // On a thread of its own: tests call this from inside their own runtime, where a second
        // one cannot block.
        let listen = args.listen;
        let (runtime, addr) = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let (state, listener, metrics) = runtime.block_on(async {
                let state = args.state().await.unwrap();
                // Brought back on the same port, whose previous socket may not be closed yet.
                let listener = loop {
                    match tokio::net::TcpListener::bind(listen).await {
                        Ok(l) => break l,
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("cannot listen on {listen}: {e}"),
                    }
                };
                let metrics = match args.metrics_listen {
                    Some(at) => Some(tokio::net::TcpListener::bind(at).await.unwrap()),
                    None => None,
                };
                (state, listener, metrics)
            });
            let addr = listener.local_addr().unwrap().to_string();
            // As the binary does, before serving: connections are capped below what is in force.
            let open_files = metadata_api::conn::raise_open_files();
            runtime.spawn(async move {
                let stop = std::future::pending();
                if let Err(e) =
                    metadata_api::server::run(&args, state, listener, metrics, open_files, stop)
                        .await
                {
                    panic!("the in-process server stopped: {e}");
                }
            });
            (runtime, addr)
        })
        .join()
        .unwrap();
        api.url = format!("http://{addr}");
        api.addr = addr;
        self.runtime = Some(runtime);
    }

    /// Stops the server at once, as a crash would: the process is killed with SIGKILL, or the
    /// in-process server's runtime is dropped with its requests half done.
    pub fn kill(&mut self) {
        match self.runtime.take() {
            Some(runtime) => runtime.shutdown_background(),
            None => self.api.kill(),
        }
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        assert!(
            !self.in_process,
            "the server runs in this process: start it with Server::process"
        );
        self.api.pid()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Deref for Server {
    type Target = testbed::api::Api;
    fn deref(&self) -> &Self::Target {
        &self.api
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.api
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
