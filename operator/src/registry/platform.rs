//! Image platforms (`os/architecture[/variant]`) and the entry of an image index that a platform
//! runs best, with architectures and variants normalized as containerd does.

use std::{fmt, str::FromStr};

use oci_client::manifest::ImageIndexEntry;

/// An image platform: `os/architecture[/variant]`, as in an image index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`, `windows`, ... (Go's `GOOS`).
    pub os: String,
    /// `amd64`, `arm64`, `arm`, ... (Go's `GOARCH`).
    pub architecture: String,
    /// `v7` for 32-bit ARM, `v8` for arm64, ...; `None` for the architecture's default.
    pub variant: Option<String>,
}

impl Platform {
    /// `os/architecture[/variant]`.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Self {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// The platform this process runs on, named the Go way (`x86_64` is `amd64`, `aarch64` is
    /// `arm64`): `linux/amd64` on a usual node.
    pub fn node() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Self::new(std::env::consts::OS, architecture, variant)
    }

    /// Whether an index entry for `platform` can run here, and how well: `Some(0)` is an exact
    /// match, higher ranks are older variants this platform still runs (`arm/v6` on `arm/v7`).
    fn rank(&self, platform: &oci_client::manifest::Platform) -> Option<usize> {
        if !self.os.eq_ignore_ascii_case(&platform.os.to_string()) {
            return None;
        }
        let (arch, variant) = normalize_arch(&self.architecture, self.variant.as_deref());
        let (entry_arch, entry_variant) = normalize_arch(
            &platform.architecture.to_string(),
            platform.variant.as_deref(),
        );
        if arch != entry_arch {
            return None;
        }
        compatible_variants(&arch, &variant)
            .iter()
            .position(|v| *v == entry_variant)
    }
}

impl Default for Platform {
    /// [`Platform::node`].
    fn default() -> Self {
        Self::node()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// A platform that does not parse as `os/architecture[/variant]`.
#[derive(Debug, thiserror::Error)]
#[error("invalid platform {0:?}: expected os/architecture[/variant], e.g. linux/arm64/v8")]
pub struct InvalidPlatform(String);

impl FromStr for Platform {
    type Err = InvalidPlatform;

    /// `linux/amd64`, `linux/arm64/v8`, `linux/arm/v7`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Self::new(os, arch, None)),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Self::new(os, arch, Some(variant)))
            }
            _ => Err(InvalidPlatform(s.to_owned())),
        }
    }
}

/// The architecture's canonical name and variant (`""` for the default), as containerd
/// normalizes them: `aarch64` is `arm64` and its `v8` is the default; `arm` defaults to `v7`;
/// `amd64`'s `v1` is the default.
fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, String) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant.unwrap_or("").to_ascii_lowercase();
    let with_v = |v: &str| {
        if v.is_empty() || v.starts_with('v') {
            v.to_owned()
        } else {
            format!("v{v}")
        }
    };
    match arch.as_str() {
        "x86_64" | "x86-64" | "amd64" => {
            let v = with_v(&variant);
            (
                "amd64".to_owned(),
                if v == "v1" { String::new() } else { v },
            )
        }
        "aarch64" | "arm64" => {
            let v = with_v(&variant);
            (
                "arm64".to_owned(),
                if v == "v8" { String::new() } else { v },
            )
        }
        "armhf" => ("arm".to_owned(), "v7".to_owned()),
        "armel" => ("arm".to_owned(), "v6".to_owned()),
        "arm" => {
            let v = with_v(&variant);
            (
                "arm".to_owned(),
                if v.is_empty() { "v7".to_owned() } else { v },
            )
        }
        "i386" | "i686" | "x86" => ("386".to_owned(), variant),
        _ => (arch, variant),
    }
}

/// The variants a (normalized) platform runs, best first.
fn compatible_variants(arch: &str, variant: &str) -> Vec<String> {
    let older = |levels: &[&str]| -> Vec<String> {
        match levels.iter().position(|l| *l == variant) {
            Some(i) => levels[..=i].iter().rev().map(|l| (*l).to_owned()).collect(),
            None => vec![variant.to_owned()],
        }
    };
    match arch {
        "arm" => older(&["v5", "v6", "v7", "v8"]),
        "amd64" => older(&["", "v2", "v3", "v4"]),
        _ => vec![variant.to_owned()],
    }
}

/// The entry of an image index for `platform`: the exact match if there is one, else the best
/// compatible variant; the first of equals.
pub fn select_platform<'a>(
    entries: &'a [ImageIndexEntry],
    platform: &Platform,
) -> Option<&'a ImageIndexEntry> {
    entries
        .iter()
        .filter_map(|e| Some((platform.rank(e.platform.as_ref()?)?, e)))
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, e)| e)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn index(platforms: serde_json::Value) -> Vec<ImageIndexEntry> {
        let entries: Vec<_> = platforms
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{i:064}"),
                    "size": 100,
                    "platform": p,
                })
            })
            .collect();
        serde_json::from_value(json!(entries)).unwrap()
    }

    fn pick(entries: &[ImageIndexEntry], platform: &str) -> Option<usize> {
        let platform: Platform = platform.parse().unwrap();
        select_platform(entries, &platform)
            .map(|e| entries.iter().position(|x| x.digest == e.digest).unwrap())
    }

    #[test]
    fn platform_selection() {
        let entries = index(json!([
            { "os": "unknown", "architecture": "unknown" },
            { "os": "windows", "architecture": "amd64" },
            { "os": "linux", "architecture": "amd64" },
            { "os": "linux", "architecture": "arm64", "variant": "v8" },
            { "os": "linux", "architecture": "arm", "variant": "v6" },
            { "os": "linux", "architecture": "arm", "variant": "v7" },
            { "os": "linux", "architecture": "ppc64le" },
        ]));
        assert_eq!(pick(&entries, "linux/amd64"), Some(2));
        assert_eq!(pick(&entries, "windows/amd64"), Some(1));
        assert_eq!(pick(&entries, "linux/arm64"), Some(3));
        assert_eq!(pick(&entries, "linux/arm64/v8"), Some(3));
        assert_eq!(pick(&entries, "linux/aarch64"), Some(3));
        assert_eq!(pick(&entries, "linux/arm/v7"), Some(5));
        assert_eq!(pick(&entries, "linux/arm"), Some(5));
        assert_eq!(pick(&entries, "linux/arm/v6"), Some(4));
        // An ARMv8 CPU in 32-bit mode runs v7 best.
        assert_eq!(pick(&entries, "linux/arm/v8"), Some(5));
        // amd64 v3 (AVX2) still runs baseline amd64.
        assert_eq!(pick(&entries, "linux/amd64/v3"), Some(2));
        assert_eq!(pick(&entries, "linux/s390x"), None);
    }

    #[test]
    fn platform_variants_that_cannot_run_are_not_picked() {
        let entries = index(json!([
            { "os": "linux", "architecture": "arm", "variant": "v7" },
            { "os": "linux", "architecture": "amd64", "variant": "v3" },
            { "os": "linux", "architecture": "arm64" },
        ]));
        assert_eq!(pick(&entries, "linux/arm/v6"), None);
        assert_eq!(pick(&entries, "linux/amd64"), None);
        assert_eq!(pick(&entries, "linux/amd64/v4"), Some(1));
        // arm64 without a variant is v8.
        assert_eq!(pick(&entries, "linux/arm64/v8"), Some(2));
    }

    #[test]
    fn platforms_parse_and_print() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p, Platform::new("linux", "arm64", Some("v8")));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            "linux/amd64".parse::<Platform>().unwrap().to_string(),
            "linux/amd64"
        );
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d", "linux/arm/"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad:?}");
        }
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            assert_eq!(Platform::node().to_string(), "linux/amd64");
        }
    }
}
