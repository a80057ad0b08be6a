//! OCI image archives (the `oci-layout` directory format in a tar stream, as `ctr images import`
//! reads it) made from a root filesystem directory, so that containerd can run images without a
//! registry.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use anyhow::Context;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The `PATH` of every image, as in Docker's busybox image.
const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An image to put in an archive: its full reference and the process it runs by default.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Image<'a> {
    /// A full reference, such as `localhost/relay-testbed/busybox:latest`.
    pub name: &'a str,
    pub entrypoint: &'a [&'a str],
    pub cmd: &'a [&'a str],
}

/// A content-addressed blob: its bytes and their descriptor.
struct Blob {
    bytes: Vec<u8>,
    digest: String,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
        Self { bytes, digest }
    }

    fn json(value: &Value) -> anyhow::Result<Self> {
        Ok(Self::new(serde_json::to_vec(value)?))
    }

    fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// A file added to the root filesystem of an image.
#[derive(Debug, Clone)]
pub(crate) struct ExtraFile {
    /// Relative to the root, without `..`.
    pub path: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

/// Writes an archive at `out` holding `images`, all with one layer: `rootfs` as it is (modes,
/// owners and symlinks kept, no compression) with `extra` files added (owned by root, parent
/// directories made as needed). Each image is named by the `io.containerd.image.name`
/// annotation, which `ctr images import` uses as is.
pub(crate) fn write_archive(
    rootfs: &Path,
    extra: &[ExtraFile],
    images: &[Image<'_>],
    out: &Path,
) -> anyhow::Result<()> {
    let layer = Blob::new(layer_tar(rootfs, extra)?);
    let (os, architecture) = platform();
    let mut blobs = Vec::new();
    let mut manifests = Vec::new();
    for image in images {
        let config = Blob::json(&json!({
            "architecture": architecture,
            "os": os,
            "config": {
                "Env": [PATH],
                "Entrypoint": image.entrypoint,
                "Cmd": image.cmd,
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
            "history": [{"created_by": "relay testbed: busybox root filesystem"}],
        }))?;
        let manifest = Blob::json(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config.descriptor("application/vnd.oci.image.config.v1+json"),
            "layers": [layer.descriptor("application/vnd.oci.image.layer.v1.tar")],
        }))?;
        let tag = image.name.rsplit_once(':').map_or("latest", |(_, tag)| tag);
        let mut descriptor = manifest.descriptor("application/vnd.oci.image.manifest.v1+json");
        descriptor["annotations"] = json!({
            "io.containerd.image.name": image.name,
            "org.opencontainers.image.ref.name": tag,
        });
        manifests.push(descriptor);
        blobs.push(config);
        blobs.push(manifest);
    }
    blobs.push(layer);
    let index = json!({"schemaVersion": 2, "manifests": manifests});

    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut archive = tar::Builder::new(BufWriter::new(file));
    let mut add = |path: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_size(u64::try_from(bytes.len())?);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        archive.append_data(&mut header, path, bytes)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &serde_json::to_vec(&index)?)?;
    let mut written = Vec::new();
    for blob in &blobs {
        if written.contains(&&blob.digest) {
            continue;
        }
        written.push(&blob.digest);
        let hex = blob.digest.trim_start_matches("sha256:");
        add(&format!("blobs/sha256/{hex}"), &blob.bytes)?;
    }
    archive
        .into_inner()?
        .flush()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// `rootfs` with `extra` as an uncompressed layer.
fn layer_tar(rootfs: &Path, extra: &[ExtraFile]) -> anyhow::Result<Vec<u8>> {
    let mut layer = tar::Builder::new(Vec::new());
    // Modes as they are (`/tmp` is 1777), and symlinks as symlinks (busybox's applets).
    layer.mode(tar::HeaderMode::Complete);
    layer.follow_symlinks(false);
    layer
        .append_dir_all(".", rootfs)
        .with_context(|| format!("cannot put {} in an image layer", rootfs.display()))?;
    let mut dirs: Vec<String> = Vec::new();
    for file in extra {
        let mut parent = Path::new(&file.path).parent();
        let mut missing = Vec::new();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            if !rootfs.join(dir).exists() {
                missing.push(dir.to_string_lossy().into_owned());
            }
            parent = dir.parent();
        }
        for dir in missing.into_iter().rev() {
            if dirs.contains(&dir) {
                continue;
            }
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            layer.append_data(&mut header, format!("{dir}/"), std::io::empty())?;
            dirs.push(dir);
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(file.mode);
        header.set_size(u64::try_from(file.bytes.len())?);
        layer
            .append_data(&mut header, &file.path, file.bytes.as_slice())
            .with_context(|| format!("cannot put {} in an image layer", file.path))?;
    }
    Ok(layer.into_inner()?)
}

/// The OCI `os` and `architecture` of this machine.
fn platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

#[cfg(test)]
mod tests {
    use std::{fs, io::Read, os::unix::fs::symlink};

    use super::*;

    #[test]
    fn archive_is_content_addressed() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::write(rootfs.join("bin/busybox"), b"binary").unwrap();
        symlink("busybox", rootfs.join("bin/sh")).unwrap();
        let out = dir.path().join("images.tar");
        let images = [
            Image {
                name: "localhost/a/pause:latest",
                entrypoint: &["sleep"],
                cmd: &["infinity"],
            },
            Image {
                name: "localhost/a/busybox:v1",
                entrypoint: &[],
                cmd: &["sh"],
            },
        ];
        write_archive(&rootfs, &[], &images, &out).unwrap();

        let mut files = std::collections::HashMap::new();
        let mut archive = tar::Archive::new(File::open(&out).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            files.insert(path, bytes);
        }
        // One layer shared by both images, two configs, two manifests.
        assert_eq!(files.len(), 2 + 5);
        for (path, bytes) in &files {
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(hex, format!("{:x}", Sha256::digest(bytes)));
            }
        }
        let blob = |digest: &Value| {
            let hex = digest.as_str().unwrap().trim_start_matches("sha256:");
            let bytes = &files[&format!("blobs/sha256/{hex}")];
            serde_json::from_slice::<Value>(bytes).ok()
        };
        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(
            manifests[1]["annotations"]["io.containerd.image.name"],
            "localhost/a/busybox:v1"
        );
        assert_eq!(
            manifests[1]["annotations"]["org.opencontainers.image.ref.name"],
            "v1"
        );
        let manifest = blob(&manifests[0]["digest"]).unwrap();
        let config = blob(&manifest["config"]["digest"]).unwrap();
        assert_eq!(config["config"]["Entrypoint"], json!(["sleep"]));
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );

        let layer = manifest["layers"][0]["digest"].as_str().unwrap();
        let layer = &files[&format!("blobs/sha256/{}", layer.trim_start_matches("sha256:"))];
        let mut entries = Vec::new();
        for entry in tar::Archive::new(layer.as_slice()).entries().unwrap() {
            let entry = entry.unwrap();
            let kind = entry.header().entry_type();
            entries.push((entry.path().unwrap().display().to_string(), kind));
        }
        assert!(entries.contains(&("bin/sh".to_owned(), tar::EntryType::Symlink)));
        assert!(entries.contains(&("bin/busybox".to_owned(), tar::EntryType::Regular)));
    }
}
