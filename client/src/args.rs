//! The shipping flags the entrypoint and the collector both take (`#[command(flatten)]`), written
//! once. Where the two differ (how much they buffer, whether they compress) each passes its own
//! [`Defaults`] to [`ShipArgs::config`].

use std::time::Duration;

use contract::{
    coding::{self, Coding},
    size::parse_size,
};

use crate::ShipConfig;

/// How a writer batches, buffers, compresses and times its appends.
#[derive(Debug, Clone, clap::Args)]
pub struct ShipArgs {
    /// A batch is sent once it holds this many bytes...
    #[arg(long, env = "RELAY_BATCH_BYTES", default_value = "1M", value_parser = parse_size)]
    pub batch_bytes: u64,
    /// ...or once its oldest byte waited this long.
    #[arg(long, env = "RELAY_BATCH_INTERVAL", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub batch_interval: Duration,
    /// Bytes buffered per stream (queued and in flight) before output is dropped and reported as
    /// dropped [default: 8M in the entrypoint, 16M in the collector].
    #[arg(long, env = "RELAY_BUFFER_LIMIT", value_parser = parse_size)]
    pub buffer_limit: Option<u64>,
    /// Append requests in flight per stream.
    #[arg(long, env = "RELAY_MAX_IN_FLIGHT", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_in_flight: u16,
    /// Compression of request bodies: gzip, zstd or none [default: gzip in the entrypoint; none
    /// in the collector, where compressing every tenant's output costs a node more CPU than the
    /// in-cluster traffic it saves (zlib level 1 alone is ~4.5 core-s/GB), as in Fluent Bit's and
    /// Vector's HTTP outputs; zstd 1 costs less (see the README's compression table)].
    #[arg(long, env = "RELAY_COMPRESSION", value_parser = Coding::parse_flag)]
    pub compression: Option<Coding>,
    /// Compression level: gzip 1-9, zstd 1-19 (a higher one means the highest) [default: 1].
    #[arg(long, env = "RELAY_COMPRESSION_LEVEL", value_parser = clap::value_parser!(u32).range(1..=19))]
    pub compression_level: Option<u32>,
    /// gzip level for request bodies (0 = uncompressed): the older spelling of `--compression
    /// gzip --compression-level N`, which win over it.
    #[arg(long, env = "RELAY_GZIP_LEVEL", value_parser = clap::value_parser!(u32).range(0..=9))]
    pub gzip_level: Option<u32>,
    /// Longest a single request to the API may take.
    #[arg(long, env = "RELAY_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
}

/// What a writer ships with when its flags say nothing.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub buffer_limit: u64,
    pub compression: Coding,
}

impl ShipArgs {
    /// The shipper settings these flags describe, `defaults` filling what they leave out.
    pub fn config(&self, defaults: Defaults) -> ShipConfig {
        let buffer_limit = usize::try_from(self.buffer_limit.unwrap_or(defaults.buffer_limit))
            .unwrap_or(usize::MAX);
        let (compression, compression_level) = coding::from_flags(
            self.compression,
            self.compression_level,
            self.gzip_level,
            defaults.compression,
        );
        ShipConfig {
            batch_bytes: usize::try_from(self.batch_bytes)
                .unwrap_or(usize::MAX)
                .clamp(1, buffer_limit.max(1)),
            batch_interval: self.batch_interval,
            buffer_limit,
            max_in_flight: usize::from(self.max_in_flight),
            compression,
            compression_level,
            ..ShipConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        ship: ShipArgs,
    }

    const DEFAULTS: Defaults = Defaults {
        buffer_limit: 8 << 20,
        compression: Coding::Gzip,
    };

    fn config(args: &[&str]) -> ShipConfig {
        let argv = [&["writer"], args].concat();
        Cli::try_parse_from(argv)
            .expect("valid")
            .ship
            .config(DEFAULTS)
    }

    #[test]
    fn flags_win_over_the_writers_defaults() {
        let c = config(&[]);
        assert_eq!((c.buffer_limit, c.compression), (8 << 20, Coding::Gzip));
        let c = config(&["--buffer-limit", "1M", "--compression", "none"]);
        assert_eq!((c.buffer_limit, c.compression), (1 << 20, Coding::Identity));
    }

    #[test]
    fn a_batch_never_exceeds_the_buffer() {
        assert_eq!(config(&["--buffer-limit", "4K"]).batch_bytes, 4096);
    }
}
