//! Archives of one OCI image each, as `cargo xtask images` writes them from an umoci layout and
//! `kind load image-archive`, `ctr images import` or `skopeo copy oci-archive:` read them: an OCI
//! image layout in a tar stream.
//!
//! The index names the image twice: `org.opencontainers.image.ref.name` (what skopeo and podman
//! read) and `io.containerd.image.name`, which containerd's importer (kind's and `ctr`'s) takes as
//! is. Without the latter, containerd names an image whose reference name is a full reference
//! (`localhost/relay/x:dev`) only by its digest.

use std::{
    fs::File,
    io::{BufWriter, Read, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use serde_json::{Value, json};

use crate::cri::Cri;

/// The annotation containerd names an imported image by.
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// The annotation of the OCI image layout that names (tags) an image.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where `cargo xtask images` leaves the archives: `RELAY_IMAGES_DIR` (set by `cargo xtask
/// test`), or `images` in the target directory (`CARGO_TARGET_DIR`, else the workspace's
/// `target`).
pub fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RELAY_IMAGES_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::api::workspace().join("target"), PathBuf::from)
        .join("images")
}

/// How long an import and CRI seeing the image may take (tens of MB to unpack).
const IMPORT_TIMEOUT: Duration = Duration::from_secs(120);

/// What an archive holds: the image's name and its manifest and configuration.
#[derive(Debug, Clone)]
pub struct ArchiveImage {
    /// The full reference the archive names the image by, such as `localhost/relay/x:dev`.
    pub name: String,
    pub manifest: Value,
    pub config: Value,
}

/// Writes the image tagged `tag` in the OCI layout `layout` as an archive at `out`, named `name`
/// (a full reference): the layout's `oci-layout`, an index with that one image, and the blobs it
/// needs (manifest, configuration, layers).
pub fn pack(layout: &Path, tag: &str, name: &str, out: &Path) -> anyhow::Result<()> {
    let index: Value = read_json(&layout.join("index.json"))?;
    let mut descriptor = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["annotations"][REF_NAME] == tag)
        .cloned()
        .with_context(|| format!("no image tagged {tag} in {}", layout.display()))?;
    let manifest_digest = digest_of(&descriptor)?;
    let manifest: Value = read_json(&blob_path(layout, &manifest_digest)?)?;
    let mut digests = vec![manifest_digest, digest_of(&manifest["config"])?];
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        digests.push(digest_of(layer)?);
    }
    descriptor["annotations"] = json!({ CONTAINERD_NAME: name, REF_NAME: name });
    let index = json!({"schemaVersion": 2, "manifests": [descriptor]});

    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut archive = tar::Builder::new(BufWriter::new(file));
    archive.mode(tar::HeaderMode::Deterministic);
    let mut header = tar::Header::new_ustar();
    let index = serde_json::to_vec(&index)?;
    header.set_size(u64::try_from(index.len())?);
    header.set_mode(0o644);
    archive.append_data(&mut header, "index.json", index.as_slice())?;
    archive.append_path_with_name(layout.join("oci-layout"), "oci-layout")?;
    let mut written: Vec<&String> = Vec::new();
    for digest in &digests {
        if written.contains(&digest) {
            continue;
        }
        written.push(digest);
        let path = blob_path(layout, digest)?;
        let name = path.strip_prefix(layout)?.to_owned();
        archive
            .append_path_with_name(&path, &name)
            .with_context(|| format!("cannot add {} to {}", path.display(), out.display()))?;
    }
    archive
        .into_inner()?
        .flush()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// Reads the name, manifest and configuration of the one image in `archive`.
pub fn read(archive: &Path) -> anyhow::Result<ArchiveImage> {
    let mut files = std::collections::HashMap::new();
    let file = File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    for entry in tar::Archive::new(file).entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        // Small JSON files only: layers are not read.
        if entry.size() < 1 << 20 {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            files.insert(path, bytes);
        }
    }
    let json = |path: &str| -> anyhow::Result<Value> {
        let bytes = files
            .get(path)
            .with_context(|| format!("{} has no {path}", archive.display()))?;
        Ok(serde_json::from_slice(bytes)?)
    };
    let index = json("index.json")?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    ensure!(
        manifests.len() == 1,
        "{} holds {} images, not one",
        archive.display(),
        manifests.len()
    );
    let name = manifests[0]["annotations"][CONTAINERD_NAME]
        .as_str()
        .with_context(|| format!("{} names no image", archive.display()))?
        .to_owned();
    let blob = |descriptor: &Value| -> anyhow::Result<Value> {
        let digest = digest_of(descriptor)?;
        json(&format!("blobs/sha256/{}", hex_of(&digest)?))
    };
    let manifest = blob(&manifests[0])?;
    let config = blob(&manifest["config"])?;
    Ok(ArchiveImage {
        name,
        manifest,
        config,
    })
}

/// Imports `archive` into `cri`'s containerd and waits until CRI sees the image; returns its name.
pub fn import(cri: &Cri, archive: &Path) -> anyhow::Result<String> {
    let image = read(archive)?;
    cri.import_archive(archive, &[&image.name], Instant::now() + IMPORT_TIMEOUT)
        .with_context(|| format!("cannot import {}", archive.display()))?;
    Ok(image.name)
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))
}

fn digest_of(descriptor: &Value) -> anyhow::Result<String> {
    descriptor["digest"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("descriptor without digest: {descriptor}"))
}

/// The hex part of a `sha256:` digest, checked to be one (it becomes a path).
fn hex_of(digest: &str) -> anyhow::Result<&str> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("{digest} is not a sha256 digest"))?;
    ensure!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{digest} is not a sha256 digest"
    );
    Ok(hex)
}

fn blob_path(layout: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    Ok(layout.join("blobs/sha256").join(hex_of(digest)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_keeps_one_image_and_names_it_for_containerd() {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("layout");
        std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        std::fs::write(
            layout.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let put = |bytes: &[u8]| -> Value {
            use sha2::Digest;
            let hex = hex::encode(sha2::Sha256::digest(bytes));
            std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
            json!({"digest": format!("sha256:{hex}"), "size": bytes.len()})
        };
        let layer = put(b"layer");
        let other_layer = put(b"other layer");
        let config = put(br#"{"config":{"User":"65532:65532"}}"#);
        let manifest = put(
            json!({"schemaVersion": 2, "config": config, "layers": [layer]})
                .to_string()
                .as_bytes(),
        );
        let other = put(
            json!({"schemaVersion": 2, "config": config, "layers": [other_layer]})
                .to_string()
                .as_bytes(),
        );
        let tagged = |mut d: Value, tag: &str| {
            d["annotations"] = json!({ REF_NAME: tag });
            d
        };
        let index = json!({"schemaVersion": 2, "manifests": [
            tagged(other, "collector"), tagged(manifest, "metadata-api"),
        ]});
        std::fs::write(layout.join("index.json"), index.to_string()).unwrap();

        let out = dir.path().join("image.tar");
        pack(
            &layout,
            "metadata-api",
            "localhost/relay/metadata-api:dev",
            &out,
        )
        .unwrap();
        let image = read(&out).unwrap();
        assert_eq!(image.name, "localhost/relay/metadata-api:dev");
        assert_eq!(image.config["config"]["User"], "65532:65532");
        assert_eq!(image.manifest["layers"][0], layer);
        let mut paths = Vec::new();
        for entry in tar::Archive::new(File::open(&out).unwrap())
            .entries()
            .unwrap()
        {
            paths.push(entry.unwrap().path().unwrap().display().to_string());
        }
        // The other image's layer stays out.
        assert_eq!(paths.len(), 2 + 3, "{paths:?}");
        let other_hex = hex_of(other_layer["digest"].as_str().unwrap()).unwrap();
        assert!(!paths.contains(&format!("blobs/sha256/{other_hex}")));

        assert!(pack(&layout, "operator", "localhost/relay/operator:dev", &out).is_err());
    }
}
