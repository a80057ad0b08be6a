//! `Content-Encoding` of append bodies: what a writer may compress with and the server decodes.
//! One type for both sides, so the token a client sends is the token the server matches.

use std::{fmt, str::FromStr};

/// How an append body travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coding {
    /// As it is (no `Content-Encoding`, or `identity`).
    Identity,
    /// `gzip` (RFC 1952); several members in one body decode as their concatenation.
    Gzip,
    /// `zstd` (RFC 8878); several frames in one body decode as their concatenation.
    Zstd,
}

impl Coding {
    /// Every coding, in the order the documentation lists them.
    pub const ALL: [Self; 3] = [Self::Identity, Self::Gzip, Self::Zstd];

    /// The `Content-Encoding` token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        }
    }

    /// The level a writer uses unless told otherwise: each coding's fastest (gzip 1 is what the
    /// entrypoint has always sent; zstd 1 already compresses log text better than gzip 1, see the
    /// README's compression table).
    pub fn default_level(self) -> u32 {
        match self {
            Self::Identity => 0,
            Self::Gzip | Self::Zstd => 1,
        }
    }

    /// The highest level a writer uses; a level above it means this one. zstd stops at 19, as its
    /// command line does without `--ultra`: 20-22 cost far more CPU and memory for a few percent.
    pub fn max_level(self) -> u32 {
        match self {
            Self::Identity => 0,
            Self::Gzip => 9,
            Self::Zstd => 19,
        }
    }
}

impl fmt::Display for Coding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token that names no [`Coding`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown coding {token:?}: expected gzip, zstd or identity (none)")]
pub struct UnknownCoding {
    pub token: String,
}

impl FromStr for Coding {
    type Err = UnknownCoding;

    /// A `Content-Encoding` token: case-insensitive, surrounding whitespace ignored, as HTTP
    /// compares them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        Self::ALL
            .into_iter()
            .find(|c| t.eq_ignore_ascii_case(c.as_str()))
            .ok_or_else(|| UnknownCoding {
                token: s.to_owned(),
            })
    }
}

impl Coding {
    /// A command-line value: a `Content-Encoding` token, or `none` for `identity` (what
    /// `--compression none` reads as; HTTP has no such token, so the server does not take it).
    pub fn parse_flag(s: &str) -> Result<Self, UnknownCoding> {
        if s.trim().eq_ignore_ascii_case("none") {
            return Ok(Self::Identity);
        }
        s.parse()
    }
}

/// The coding and level a writer's flags name: `--compression` and `--compression-level`, or else
/// the older `--gzip-level N` (gzip at N, and 0 for none), or else `default` at its default level.
/// `--compression-level` is the level of whichever coding is chosen; `--gzip-level` is a level
/// only when the coding is gzip.
pub fn from_flags(
    compression: Option<Coding>,
    level: Option<u32>,
    gzip_level: Option<u32>,
    default: Coding,
) -> (Coding, u32) {
    let coding = compression.unwrap_or(match gzip_level {
        Some(0) => Coding::Identity,
        Some(_) => Coding::Gzip,
        None => default,
    });
    let gzip_level = gzip_level.filter(|&l| coding == Coding::Gzip && l > 0);
    let level = level
        .or(gzip_level)
        .unwrap_or_else(|| coding.default_level());
    (coding, level.min(coding.max_level()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_case_insensitively_and_round_trip() {
        for c in Coding::ALL {
            assert_eq!(c.as_str().parse(), Ok(c));
            assert_eq!(c.as_str().to_uppercase().parse(), Ok(c));
        }
        assert_eq!(" ZStd ".parse(), Ok(Coding::Zstd));
        for bad in ["", "br", "deflate", "gzip, zstd", "x-gzip", "none"] {
            assert!(bad.parse::<Coding>().is_err(), "{bad}");
        }
        assert_eq!(Coding::parse_flag("None"), Ok(Coding::Identity));
        assert_eq!(Coding::parse_flag("zstd"), Ok(Coding::Zstd));
        assert!(Coding::parse_flag("lz4").is_err());
    }

    #[test]
    fn flags_new_and_old_resolve_to_one_coding() {
        use Coding::*;
        let cases = [
            // (--compression, --compression-level, --gzip-level, default) => result
            ((None, None, None, Gzip), (Gzip, 1)),
            ((None, None, None, Identity), (Identity, 0)),
            ((Some(Zstd), None, None, Gzip), (Zstd, 1)),
            ((Some(Zstd), Some(3), None, Identity), (Zstd, 3)),
            ((Some(Gzip), Some(19), None, Gzip), (Gzip, 9)),
            ((Some(Identity), Some(5), None, Gzip), (Identity, 0)),
            // The older flag alone, as deployed pods and the operator still set it.
            ((None, None, Some(0), Gzip), (Identity, 0)),
            ((None, None, Some(6), Identity), (Gzip, 6)),
            ((None, Some(4), Some(6), Identity), (Gzip, 4)),
            // The new flags win; a gzip level is no zstd level.
            ((Some(Zstd), None, Some(6), Gzip), (Zstd, 1)),
            ((Some(Zstd), None, Some(0), Gzip), (Zstd, 1)),
            ((Some(Gzip), None, Some(6), Identity), (Gzip, 6)),
        ];
        for ((c, l, g, d), want) in cases {
            assert_eq!(from_flags(c, l, g, d), want, "{c:?} {l:?} {g:?} {d:?}");
        }
    }
}
