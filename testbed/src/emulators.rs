//! The storage emulators (moto's S3, gcp-storage-emulator) from the venv `cargo xtask test`
//! installs, on loopback, killed on drop. Test-only code: it panics on failure.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::ports::{free_port, wait_port};

/// The environment variable that makes a missing emulator a failure (as in CI) instead of a skip.
pub const REQUIRE_EMULATORS_ENV: &str = "RELAY_REQUIRE_EMULATORS";

/// An emulator process on loopback `port`, killed on drop.
#[derive(Debug)]
pub struct Emulator {
    pub child: Child,
    pub port: u16,
}

impl Emulator {
    /// Starts `program args` and waits until it accepts connections on `port`; `None` (skip) when
    /// the program is not installed, unless `RELAY_REQUIRE_EMULATORS` is set (as in CI).
    pub fn start(program: &str, args: &[&str], port: u16) -> Option<Self> {
        let child = match Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => Self { child, port },
            Err(e) => {
                assert!(
                    std::env::var_os(REQUIRE_EMULATORS_ENV).is_none(),
                    "{program} is required: {e}"
                );
                eprintln!("SKIPPED: {program} not found ({e}); `cargo xtask test` installs it");
                return None;
            }
        };
        wait_port(port, Duration::from_secs(30), program);
        Some(child)
    }

    /// moto's S3 server on a free port (no bucket yet).
    pub fn moto() -> Option<Self> {
        let port = free_port();
        Self::start("moto_server", &["-p", &port.to_string()], port)
    }

    /// gcp-storage-emulator on a free port, in memory, with `bucket` made.
    pub fn gcs(bucket: &str) -> Option<Self> {
        let port = free_port();
        Self::start(
            "gcp-storage-emulator",
            &[
                "start",
                "--port",
                &port.to_string(),
                "--in-memory",
                "--default-bucket",
                bucket,
            ],
            port,
        )
    }

    /// `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The process id (to signal it, e.g. `STOP` and `CONT`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The environment a metadata-api process needs to use this moto as S3.
    pub fn s3_env(&self) -> Vec<(String, String)> {
        moto_s3_env(&self.endpoint())
    }
}

/// The environment a metadata-api process needs to use the moto at `endpoint` as S3 (moto takes
/// any credentials).
pub fn moto_s3_env(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
