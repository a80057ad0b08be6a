//! A real OCI registry for tests: Debian's distribution 2.8 (`docker-registry serve`) on a free
//! loopback port, plain HTTP, optionally behind htpasswd (bcrypt) basic auth; and images built
//! with `umoci` and pushed with `skopeo`, as OCI or Docker v2 schema 2 manifests, single or
//! multi-platform (an OCI image index).
//!
//! ```no_run
//! use testbed::registry::{Format, Image, Registry};
//!
//! let Some(registry) = Registry::start_or_skip(Some(("user", "secret"))) else { return };
//! let image = Image::new("linux", "amd64").entrypoint(["/bin/app"]).cmd(["--serve"]);
//! let digest = registry.push("app:v1", &image, Format::Oci).unwrap();
//! println!("{}/app@{digest}", registry.host());
//! ```
//!
//! The binaries come from the cache `cargo xtask testbed install` fills (see
//! [`crate::layout::REGISTRY_PACKAGES`]); none of them needs root. Dropping the [`Registry`] kills
//! it and removes its storage.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::layout;

/// How long the registry may take to answer on `/v2/`.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How often readiness is checked again.
const POLL: Duration = Duration::from_millis(50);

/// How many times a start is tried again when the port picked as free was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

/// The media type of an OCI image index.
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Why the registry test bed cannot run here, or `None` when it can: the binaries must be in the
/// cache.
pub fn unavailable() -> Option<String> {
    [
        layout::docker_registry(),
        layout::umoci(),
        layout::skopeo(),
        layout::htpasswd(),
    ]
    .iter()
    .find(|path| !path.exists())
    .map(|path| {
        format!(
            "{} is missing: run `cargo xtask testbed install`",
            path.display()
        )
    })
}

/// The manifest format an image is pushed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// As umoci wrote it: an OCI image manifest (without a `mediaType` field).
    Oci,
    /// Converted by skopeo to a Docker v2 schema 2 manifest.
    DockerV2,
}

/// What goes into a test image: its platform and its `ENTRYPOINT` and `CMD`. The only layer
/// holds one small file.
#[derive(Debug, Clone)]
pub struct Image {
    os: String,
    architecture: String,
    variant: Option<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

impl Image {
    /// An image for `os`/`architecture` without entrypoint or command.
    pub fn new(os: &str, architecture: &str) -> Self {
        Self {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
            entrypoint: Vec::new(),
            cmd: Vec::new(),
        }
    }

    /// The platform variant (`v7`, `v8`, ...) written into an image index entry (umoci cannot
    /// put it into the image configuration).
    pub fn variant(mut self, variant: &str) -> Self {
        self.variant = Some(variant.to_owned());
        self
    }

    /// The image's `ENTRYPOINT`.
    pub fn entrypoint<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.entrypoint = args.into_iter().map(Into::into).collect();
        self
    }

    /// The image's `CMD`.
    pub fn cmd<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.cmd = args.into_iter().map(Into::into).collect();
        self
    }
}

/// A running distribution 2.8 registry on 127.0.0.1. Dropping it kills it and removes its
/// storage.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    auth: Option<(String, String)>,
}

impl Registry {
    /// Starts a registry on a free loopback port, storing into a temporary directory; with
    /// `auth`, behind htpasswd basic auth for that one user (bcrypt, made by `htpasswd -Bbn`).
    /// Returns once it answers on `/v2/`.
    pub fn start(auth: Option<(&str, &str)>) -> anyhow::Result<Self> {
        let auth = auth.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let mut htpasswd = Vec::new();
        if let Some((user, password)) = &auth {
            let out = tool(layout::htpasswd())
                .args(["-Bbn", user, password])
                .output()
                .context("cannot run htpasswd")?;
            ensure!(
                out.status.success(),
                "htpasswd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            htpasswd = out.stdout;
        }
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let mut registry = Self {
                child: None,
                dir: tempfile::Builder::new()
                    .prefix("relay-registry-")
                    .tempdir()
                    .context("cannot create the registry directory")?,
                port: crate::ports::try_free_port()?,
                auth: auth.clone(),
            };
            fs::write(registry.dir.path().join("htpasswd"), &htpasswd)?;
            match registry.spawn() {
                Ok(()) => return Ok(registry),
                Err(e) => last = Some(e.context(registry.log())),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
    }

    /// [`start`](Self::start) when the tools are installed, otherwise `None` after
    /// [`crate::skip_or_fail`] has said why; panics when the registry does not start although it
    /// is installed.
    pub fn start_or_skip(auth: Option<(&str, &str)>) -> Option<Self> {
        if let Some(reason) = unavailable() {
            crate::skip_or_fail(&reason);
            return None;
        }
        match Self::start(auth) {
            Ok(registry) => Some(registry),
            Err(e) => panic!("the registry did not start: {e:#}"),
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let storage = self.dir.path().join("storage");
        fs::create_dir_all(&storage)?;
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{}\n  secret: relay-testbed\n",
            storage.display(),
            self.port
        );
        if self.auth.is_some() {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: relay-testbed\n    path: {}\n",
                self.dir.path().join("htpasswd").display()
            ));
        }
        let config_path = self.dir.path().join("config.yml");
        fs::write(&config_path, config)?;
        let log = fs::File::create(self.log_path())?;
        let child = Command::new(layout::docker_registry())
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start docker-registry")?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let url = format!("http://{}/v2/", self.host());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("docker-registry exited ({status})");
            }
            if let Ok(response) = client.get(&url).send() {
                let status = response.status().as_u16();
                let expected = if self.auth.is_some() { 401 } else { 200 };
                ensure!(
                    status == expected,
                    "{url} answered {status}, expected {expected}"
                );
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "docker-registry did not answer on {url} within {START_TIMEOUT:?}"
            );
            thread::sleep(POLL);
        }
    }

    /// `127.0.0.1:PORT`, the registry part of image references.
    pub fn host(&self) -> String {
        format!("{}:{}", Ipv4Addr::LOCALHOST, self.port)
    }

    /// The registry's log so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Kills the registry and waits for it to exit: its port refuses connections afterwards.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Builds `image` with umoci and pushes it as `name_tag` (`NAME:TAG`) in `format`; returns
    /// the digest of the manifest as pushed.
    pub fn push(&self, name_tag: &str, image: &Image, format: Format) -> anyhow::Result<String> {
        let work = self.work_dir()?;
        let layout_dir = work.path().join("layout");
        init_layout(&layout_dir)?;
        build(&layout_dir, "image", image, work.path())?;
        self.copy(work.path(), "image", name_tag, format, false)
    }

    /// Builds one image per entry of `images` and pushes them as one OCI image index
    /// `name_tag`, each entry with the platform (variant included) of its image; returns the
    /// digest of the index.
    pub fn push_index(&self, name_tag: &str, images: &[Image]) -> anyhow::Result<String> {
        let work = self.work_dir()?;
        let layout_dir = work.path().join("layout");
        init_layout(&layout_dir)?;
        let mut entries = Vec::new();
        for (i, image) in images.iter().enumerate() {
            let tag = format!("platform{i}");
            build(&layout_dir, &tag, image, work.path())?;
            let mut descriptor = tagged_descriptor(&layout_dir, &tag)?;
            if let Some(object) = descriptor.as_object_mut() {
                object.remove("annotations");
                let mut platform = serde_json::json!({
                    "os": image.os,
                    "architecture": image.architecture,
                });
                if let Some(variant) = &image.variant {
                    platform["variant"] = variant.clone().into();
                }
                object.insert("platform".to_owned(), platform);
            }
            entries.push(descriptor);
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": entries,
        }))?;
        let digest = write_blob(&layout_dir, &index)?;
        add_tag(
            &layout_dir,
            serde_json::json!({
                "mediaType": OCI_INDEX,
                "digest": digest,
                "size": index.len(),
                "annotations": { "org.opencontainers.image.ref.name": "index" },
            }),
        )?;
        self.copy(work.path(), "index", name_tag, Format::Oci, true)
    }

    fn work_dir(&self) -> anyhow::Result<TempDir> {
        tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(self.dir.path())
            .context("cannot create a build directory")
    }

    /// `skopeo copy` of `oci:WORK/layout:TAG` to `docker://HOST/NAME_TAG`.
    fn copy(
        &self,
        work: &Path,
        tag: &str,
        name_tag: &str,
        format: Format,
        all: bool,
    ) -> anyhow::Result<String> {
        let policy = work.join("policy.json");
        fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )?;
        let digest_file = work.join("digest");
        let mut cmd = tool(layout::skopeo());
        cmd.env("TMPDIR", work)
            .arg("--policy")
            .arg(&policy)
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg("--digestfile")
            .arg(&digest_file);
        if let Some((user, password)) = &self.auth {
            cmd.arg("--dest-creds").arg(format!("{user}:{password}"));
        }
        if format == Format::DockerV2 {
            cmd.args(["--format", "v2s2"]);
        }
        if all {
            cmd.arg("--all");
        }
        cmd.arg(format!("oci:{}:{tag}", work.join("layout").display()))
            .arg(format!("docker://{}/{name_tag}", self.host()));
        run(&mut cmd)?;
        let digest = fs::read_to_string(&digest_file).context("skopeo wrote no digest")?;
        Ok(digest.trim().to_owned())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A command running one of the cached tools, with the libraries extracted next to it.
fn tool(path: PathBuf) -> Command {
    let mut cmd = Command::new(path);
    cmd.env("LD_LIBRARY_PATH", layout::registry_library_path());
    cmd
}

/// Runs `cmd`, failing with its output when it fails.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn init_layout(dir: &Path) -> anyhow::Result<()> {
    run(tool(layout::umoci()).arg("init").arg("--layout").arg(dir))
}

/// Builds `image` into the layout `dir` under `tag`: a new image, one layer with one file, then
/// the configuration.
fn build(dir: &Path, tag: &str, image: &Image, work: &Path) -> anyhow::Result<()> {
    let reference = format!("{}:{tag}", dir.display());
    run(tool(layout::umoci()).args(["new", "--image", &reference]))?;
    let file = work.join(format!("{tag}.txt"));
    fs::write(&file, format!("relay test image {tag}\n"))?;
    let mut insert = tool(layout::umoci());
    insert.arg("insert");
    if !rustix::process::geteuid().is_root() {
        insert.arg("--rootless");
    }
    run(insert
        .args(["--image", &reference])
        .arg(&file)
        .arg("/hello.txt"))?;
    let mut config = tool(layout::umoci());
    config.args(["config", "--image", &reference]).args([
        "--os",
        &image.os,
        "--architecture",
        &image.architecture,
    ]);
    for arg in &image.entrypoint {
        config.arg(format!("--config.entrypoint={arg}"));
    }
    for arg in &image.cmd {
        config.arg(format!("--config.cmd={arg}"));
    }
    run(&mut config)
}

fn read_index(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let path = dir.join("index.json");
    let text = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(serde_json::from_slice(&text)?)
}

/// The descriptor `index.json` of the layout `dir` has for `tag`.
fn tagged_descriptor(dir: &Path, tag: &str) -> anyhow::Result<serde_json::Value> {
    let index = read_index(dir)?;
    index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .cloned()
        .with_context(|| format!("no {tag} in the layout's index.json"))
}

/// Adds `descriptor` to the `index.json` of the layout `dir`.
fn add_tag(dir: &Path, descriptor: serde_json::Value) -> anyhow::Result<()> {
    let mut index = read_index(dir)?;
    index["manifests"]
        .as_array_mut()
        .context("index.json without manifests")?
        .push(descriptor);
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

/// Writes `data` as a blob of the layout `dir`; returns its digest.
fn write_blob(dir: &Path, data: &[u8]) -> anyhow::Result<String> {
    let hex = hex::encode(Sha256::digest(data));
    fs::write(dir.join("blobs/sha256").join(&hex), data)?;
    Ok(format!("sha256:{hex}"))
}
