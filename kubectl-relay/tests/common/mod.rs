//! Running the built `kubectl-relay` with a clean environment, and writing a step's streams to the
//! real metadata API.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// What a run of the plugin printed, and how it ended.
#[derive(Debug)]
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Asserts success and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "{self:?}");
        &self.stdout
    }

    /// Asserts exit code `code` with one line on stderr, starting with `error: `, that contains
    /// `says`.
    pub fn fails(&self, code: i32, says: &str) {
        assert_eq!(self.code, Some(code), "{self:?}");
        assert_eq!(self.stderr.lines().count(), 1, "not one line: {self:?}");
        assert!(self.stderr.starts_with("error"), "{self:?}");
        assert!(self.stderr.contains(says), "no {says:?} in {self:?}");
    }
}

/// The plugin, with nothing of this machine's configuration: no kubeconfig (`HOME` is `home`),
/// no `RELAY_*`.
pub fn plugin(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kubectl-relay"));
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .stdin(Stdio::null());
    c
}

/// Runs `cmd` to its end, within `limit`.
pub fn run(mut cmd: Command, limit: Duration) -> Ran {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = drain(&mut child, true);
    let err = drain(&mut child, false);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not end within {limit:?}: {}",
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ran {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn drain(child: &mut Child, stdout: bool) -> std::thread::JoinHandle<String> {
    let mut r: Box<dyn Read + Send> = if stdout {
        Box::new(child.stdout.take().unwrap())
    } else {
        Box::new(child.stderr.take().unwrap())
    };
    std::thread::spawn(move || {
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        s
    })
}

/// Writes and finishes the plain text of entrypoint stream `name` in the token's context, in
/// parts written at `times` (ms since the epoch), one part per line of `lines`.
pub fn write_lines(
    url: &str,
    token: &str,
    spec: serde_json::Value,
    parts: &[(u64, &str)],
    finish: bool,
) -> String {
    let http = reqwest::blocking::Client::new();
    let created: serde_json::Value = http
        .post(format!("{url}/logs"))
        .bearer_auth(token)
        .json(&spec)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = created["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{created}"))
        .to_owned();
    let mut at = created["end"].as_u64().unwrap();
    for (written, text) in parts {
        append(url, token, &id, at, *written, text);
        at += text.len() as u64;
    }
    if finish {
        let r = http
            .patch(format!("{url}/logs/{id}/data"))
            .bearer_auth(token)
            .header("content-range", format!("bytes */{at}"))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    }
    id
}

/// Appends `text` at `at` of stream `id`, written at `written` ms.
pub fn append(url: &str, token: &str, id: &str, at: u64, written: u64, text: &str) {
    let r = reqwest::blocking::Client::new()
        .patch(format!("{url}/logs/{id}/data"))
        .bearer_auth(token)
        .header("content-type", "application/octet-stream")
        .header(
            "content-range",
            format!("bytes {at}-{}/*", at + text.len() as u64 - 1),
        )
        .header(contract::headers::WRITTEN, written.to_string())
        .body(text.to_owned())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202, "{:?}", r.text());
}

pub fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    (dir, path)
}
