//! Manifests as a registry serves them: parsed the way `oci_client` does for the operator (schema
//! version and media type first, then the untagged `OciManifest`), then an image index's entry
//! picked with `registry::select_platform`, as `Registry::image_command` does.
//!
//! Input: `PLATFORM\0MANIFEST`, or just `MANIFEST`. The platform text goes through
//! `Platform::from_str` too.
//!
//! Checked, beyond not panicking:
//! - a platform that parses prints back to the same text's parse;
//! - the entry picked for a platform runs on it: same OS (case aside) and architecture (aliases
//!   aside), and no other entry is better: picking between it and any other entry keeps it;
//! - an entry whose platform is written exactly as the one asked for means something is picked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_client::manifest::{ImageIndexEntry, OciManifest, Versioned};
use operator::registry::{Platform, normalize_reference, select_platform};

const MEDIA_TYPES: [&str; 4] = [
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
];

/// What `oci_client`'s `_pull_manifest` accepts.
fn parse(body: &[u8]) -> Option<OciManifest> {
    let versioned: Versioned = serde_json::from_slice(body).ok()?;
    if versioned.schema_version != 2 {
        return None;
    }
    if versioned
        .media_type
        .as_deref()
        .is_some_and(|m| !MEDIA_TYPES.contains(&m))
    {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// The architecture's common name, as far as every runtime agrees on it.
fn arch(a: &str) -> String {
    match a.to_ascii_lowercase().as_str() {
        "x86_64" | "x86-64" | "amd64" => "amd64".to_owned(),
        "aarch64" | "arm64" => "arm64".to_owned(),
        "armhf" | "armel" | "arm" => "arm".to_owned(),
        "i386" | "i686" | "x86" | "386" => "386".to_owned(),
        other => other.to_owned(),
    }
}

fn entry_platform(e: &ImageIndexEntry) -> Option<Platform> {
    let p = e.platform.as_ref()?;
    Some(Platform::new(
        &p.os.to_string(),
        &p.architecture.to_string(),
        p.variant.as_deref(),
    ))
}

fn check_pick(entries: &[ImageIndexEntry], platform: &Platform) {
    let picked = select_platform(entries, platform);
    let exact = entries
        .iter()
        .any(|e| entry_platform(e).as_ref() == Some(platform));
    let Some(picked) = picked else {
        assert!(
            !exact,
            "nothing picked for {platform} though an entry is exactly it"
        );
        return;
    };
    let on = entry_platform(picked).expect("picked an entry without a platform");
    assert!(
        on.os.eq_ignore_ascii_case(&platform.os),
        "picked {on} for {platform}"
    );
    assert_eq!(
        arch(&on.architecture),
        arch(&platform.architecture),
        "picked {on} for {platform}"
    );
    let at = entries
        .iter()
        .position(|e| std::ptr::eq(e, picked))
        .expect("picked from the list");
    // No other entry is better, and none before it as good (the first of equals is picked):
    // picking from it and any other entry, in list order, keeps it.
    for (i, other) in entries.iter().enumerate().filter(|(i, _)| *i != at) {
        let (pair, keep) = if i < at {
            ([other.clone(), picked.clone()], 1)
        } else {
            ([picked.clone(), other.clone()], 0)
        };
        let again = select_platform(&pair, platform).expect("the picked one runs");
        assert!(
            std::ptr::eq(again, &pair[keep]),
            "{:?} at {i} is at least as good as the picked {on} at {at} for {platform}",
            entry_platform(other)
        );
    }
    // The platform's manifest is then fetched by its digest, whatever text the index holds.
    if let Ok(reference) = normalize_reference("reg.example.com/team/app:v1") {
        let pinned = reference.clone_with_digest(picked.digest.clone());
        let _ = pinned.whole();
    }
}

fuzz_target!(|data: &[u8]| {
    let (platform, body) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (std::str::from_utf8(&data[..nul]).ok(), &data[nul + 1..]),
        None => (None, data),
    };
    let asked: Option<Platform> = platform.and_then(|p| p.parse().ok());
    if let Some(p) = &asked {
        let printed = p.to_string();
        assert_eq!(
            printed.parse::<Platform>().ok().as_ref(),
            Some(p),
            "{printed:?}"
        );
    }

    let Some(manifest) = parse(body) else {
        return;
    };
    let OciManifest::ImageIndex(index) = manifest else {
        return;
    };
    let mut platforms: Vec<Platform> = [
        "linux/amd64",
        "linux/amd64/v3",
        "linux/arm64",
        "linux/arm64/v8",
        "linux/arm/v7",
        "linux/arm/v6",
        "linux/386",
        "windows/amd64",
    ]
    .iter()
    .filter_map(|p| p.parse().ok())
    .collect();
    platforms.extend(asked);
    platforms.extend(index.manifests.iter().filter_map(entry_platform));
    for platform in &platforms {
        check_pick(&index.manifests, platform);
    }
});
