//! Images for the CRI containerd without a registry: the busybox root filesystem plus files of
//! the test's choosing, imported under a name of the test's choosing, so that a pod naming that
//! image runs it (on a [`crate::node::Node`], with `imagePullPolicy: Never`: nothing is pulled).
//!
//! ```no_run
//! use testbed::{cri::Cri, images::ImageBuild};
//!
//! let Some(cri) = Cri::start_or_skip() else { return };
//! ImageBuild::busybox("localhost/example/app:test")
//!     .file("etc/app.conf", b"x = 1\n".to_vec(), 0o644)
//!     .import(&cri)
//!     .unwrap();
//! ```

use std::{
    path::{Component, Path},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};

use crate::{cri::Cri, layout, oci};

/// The name [`tools_image`] imports the tools image under.
pub const TOOLS_IMAGE: &str = "localhost/relay/tools:test";

/// A second tools version for [`tools_image_tagged`]: the same image under another reference,
/// which the operator takes for a new tools version.
pub const TOOLS_IMAGE_V2: &str = "localhost/relay/tools:v2";

/// How long an import and CRI seeing the image may take.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// An image to import: the busybox root filesystem with extra files, an entrypoint and a command.
#[derive(Debug, Clone)]
pub struct ImageBuild {
    name: String,
    /// Further references to the same image.
    tags: Vec<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    files: Vec<oci::ExtraFile>,
}

impl ImageBuild {
    /// Image `name` (a full reference, such as `localhost/relay/tools:test`) from the busybox
    /// root filesystem, without entrypoint and with command `sh`, as Docker's busybox.
    pub fn busybox(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            tags: Vec::new(),
            entrypoint: Vec::new(),
            cmd: vec!["sh".to_owned()],
            files: Vec::new(),
        }
    }

    /// The image's full reference.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Also imports the image as `name` (another full reference), from the same archive.
    #[must_use]
    pub fn tag(mut self, name: impl Into<String>) -> Self {
        self.tags.push(name.into());
        self
    }

    /// Sets the entrypoint.
    #[must_use]
    pub fn entrypoint(mut self, entrypoint: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.entrypoint = entrypoint.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the command (the arguments after the entrypoint).
    #[must_use]
    pub fn cmd(mut self, cmd: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.cmd = cmd.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a file at `path` (relative to the root, or absolute: the leading `/` is dropped)
    /// with `bytes` and permission bits `mode`, owned by root.
    #[must_use]
    pub fn file(mut self, path: impl AsRef<str>, bytes: Vec<u8>, mode: u32) -> Self {
        self.files.push(oci::ExtraFile {
            path: path.as_ref().trim_start_matches('/').to_owned(),
            bytes,
            mode,
        });
        self
    }

    /// Adds the host file `host` at `path`, as [`file`](Self::file) does.
    pub fn copy(self, path: impl AsRef<str>, host: &Path, mode: u32) -> anyhow::Result<Self> {
        let bytes =
            std::fs::read(host).with_context(|| format!("cannot read {}", host.display()))?;
        Ok(self.file(path, bytes, mode))
    }

    /// Builds the image and imports it into `cri`'s containerd, waiting until CRI sees it.
    ///
    /// Fails for a file path that is empty or has `..`, or when the import fails.
    pub fn import(&self, cri: &Cri) -> anyhow::Result<()> {
        for file in &self.files {
            ensure!(
                !file.path.is_empty()
                    && Path::new(&file.path)
                        .components()
                        .all(|c| matches!(c, Component::Normal(_))),
                "image {}: invalid file path {:?}",
                self.name,
                file.path
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("relay-image-")
            .tempdir()
            .context("cannot create a directory for the image archive")?;
        let archive = dir.path().join("image.tar");
        let entrypoint: Vec<&str> = self.entrypoint.iter().map(String::as_str).collect();
        let cmd: Vec<&str> = self.cmd.iter().map(String::as_str).collect();
        let names: Vec<&str> = std::iter::once(&self.name)
            .chain(&self.tags)
            .map(String::as_str)
            .collect();
        let images: Vec<oci::Image<'_>> = names
            .iter()
            .map(|name| oci::Image {
                name,
                entrypoint: &entrypoint,
                cmd: &cmd,
            })
            .collect();
        oci::write_archive(&layout::busybox_rootfs(), &self.files, &images, &archive)
            .with_context(|| format!("cannot build image {}", self.name))?;
        cri.import_archive(&archive, &names, Instant::now() + IMPORT_TIMEOUT)
            .with_context(|| format!("cannot import image {}", self.name))
    }
}

/// Imports the tools image as [`TOOLS_IMAGE`] into `cri`: busybox with the static entrypoint
/// ([`crate::api::static_entrypoint`]) at `/entrypoint`, which is also the image's entrypoint.
/// Returns the image name, or `None` (after [`crate::skip_or_fail`]) when there is no static
/// entrypoint build.
///
/// # Panics
///
/// When the static entrypoint is missing and `RELAY_REQUIRE_TESTBED=1`.
pub fn tools_image(cri: &Cri) -> anyhow::Result<Option<&'static str>> {
    tools_image_tagged(cri, &[])
}

/// As [`tools_image`], with the image also imported under each of `tags` (such as
/// [`TOOLS_IMAGE_V2`]).
///
/// # Panics
///
/// When the static entrypoint is missing and `RELAY_REQUIRE_TESTBED=1`.
pub fn tools_image_tagged(cri: &Cri, tags: &[&str]) -> anyhow::Result<Option<&'static str>> {
    let Some(entrypoint) = crate::api::static_entrypoint() else {
        return Ok(None);
    };
    let mut build = ImageBuild::busybox(TOOLS_IMAGE)
        .entrypoint(["/entrypoint"])
        .cmd(Vec::<String>::new())
        .copy("entrypoint", &entrypoint, 0o755)?;
    for tag in tags {
        build = build.tag(*tag);
    }
    build.import(cri)?;
    Ok(Some(TOOLS_IMAGE))
}
