//! Helpers shared by tasks: the workspace root, commands, the metadata-api process.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `~/.cache/relay`, where slow downloads and builds are kept between runs.
pub fn cache_dir() -> PathBuf {
    testbed::layout::cache_dir()
}

/// Runs a command to completion, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds the release metadata-api binary and returns its path.
pub fn build_metadata_api() -> anyhow::Result<PathBuf> {
    run(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "metadata-api",
    ]))?;
    Ok(root().join("target/release/metadata-api"))
}

/// A running `metadata-api serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    /// Starts `bin serve` with `args` and waits for its "listening on" line.
    pub fn start(bin: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("serve").args(args);
        Self::spawn(cmd)
    }

    /// Starts `cmd` (a `serve` command line, possibly behind a wrapper such as `nice`).
    pub fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        let bin = format!("{:?}", cmd.get_program());
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {bin}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let url = line
            .trim()
            .strip_prefix("metadata-api listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .to_owned();
        Ok(Self { child, url })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mints a token with the binary's `token` subcommand.
/// A metadata API (`bin`) on file storage in `dir`, with its rate limits out of the way
/// (benchmarks measure the writers, not the limiter), and a token for `context` with `scope`,
/// also written to `dir/token`. `niced` runs it at nice 10, as if on another node.
pub fn bench_api(
    bin: &Path,
    dir: &Path,
    niced: bool,
    context: &str,
    scope: &str,
) -> anyhow::Result<(Server, String, PathBuf)> {
    let key = dir.join("key");
    let storage = format!("file://{}", dir.join("streams").display());
    let mut cmd = if niced {
        let mut c = Command::new("nice");
        c.args(["-n", "10"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.arg("serve").args([
        "--listen",
        "127.0.0.1:0",
        "--storage",
        &storage,
        "--key-file",
        &key.display().to_string(),
        "--stream-rate",
        "100G",
        "--global-rate",
        "100G",
    ]);
    let server = Server::spawn(cmd)?;
    let token = token(bin, &key, context, scope)?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, &token)?;
    Ok((server, token, token_file))
}

pub fn token(bin: &Path, key_file: &Path, context: &str, scope: &str) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(["token", "--key-file"])
        .arg(key_file)
        .args(["--context", context, "--scope", scope, "--ttl", "2h"])
        .output()?;
    if !out.status.success() {
        bail!("token failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}
