//! Command line and environment.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use client::{Defaults, ShipArgs, ShipConfig};
use contract::coding::Coding;

/// Runs CMD and ships its stdout and stderr to the metadata API.
///
/// The command's output goes to the metadata API only, never to this process's own output. When
/// no API URL is configured the command runs as if started directly. Values of the environment
/// variables named in `RELAY_REDACT_ENV` (comma-separated names and `PREFIX*` entries) are
/// replaced by `***` in what is shipped.
#[derive(Debug, clap::Parser)]
#[command(
    name = "entrypoint",
    version,
    override_usage = "entrypoint [OPTIONS] [--] CMD [ARGS]...\n       entrypoint install DIR"
)]
pub struct Args {
    /// Metadata API base URL (`http://host:port`).
    #[arg(long, env = contract::env::METADATA_API_URL)]
    pub url: Option<String>,
    /// Bearer token file, read again whenever it changes (projected tokens rotate).
    #[arg(long, env = contract::env::METADATA_API_TOKEN_FILE)]
    pub token_file: Option<PathBuf>,
    /// Stream name for the command's stdout.
    #[arg(long, env = contract::env::STDOUT_STREAM, default_value = "stdout")]
    pub stdout_stream: String,
    /// Stream name for the command's stderr.
    #[arg(long, env = contract::env::STDERR_STREAM, default_value = "stderr")]
    pub stderr_stream: String,
    #[command(flatten)]
    pub ship: ShipArgs,
    /// Time allowed after the command exits to ship what is left and declare the final lengths.
    #[arg(long, env = "RELAY_GRACE_PERIOD", default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace_period: Duration,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

impl Args {
    /// The shipper settings these arguments describe.
    pub fn ship_config(&self) -> ShipConfig {
        self.ship.config(Defaults {
            buffer_limit: 8 << 20,
            compression: Coding::Gzip,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(args).expect("valid")
    }

    #[test]
    fn command_after_double_dash_or_first_positional_keeps_its_flags() {
        let a = parse(&[
            "entrypoint",
            "--gzip-level",
            "0",
            "--",
            "sh",
            "-c",
            "echo --url",
        ]);
        assert_eq!(a.command, ["sh", "-c", "echo --url"]);
        assert_eq!(a.ship_config().compression, Coding::Identity);
        let a = parse(&["entrypoint", "/bin/ls", "-l", "--url", "x"]);
        assert_eq!(a.command, ["/bin/ls", "-l", "--url", "x"]);
        assert_eq!(a.url, None);
    }

    #[test]
    fn sizes_and_durations_parse() {
        let a = parse(&[
            "entrypoint",
            "--batch-bytes",
            "64K",
            "--batch-interval",
            "50ms",
            "--buffer-limit",
            "1M",
            "true",
        ]);
        let c = a.ship_config();
        assert_eq!(c.batch_bytes, 64 << 10);
        assert_eq!(c.batch_interval, Duration::from_millis(50));
        assert_eq!(c.buffer_limit, 1 << 20);
        assert!(Args::try_parse_from(["entrypoint", "--gzip-level", "10", "true"]).is_err());
    }

    #[test]
    fn compression_defaults_to_gzip_1_and_takes_zstd_or_the_older_gzip_level() {
        let coding = |args: &[&str]| {
            let c = parse(&[&["entrypoint"], args, &["true"]].concat()).ship_config();
            (c.compression, c.compression_level)
        };
        assert_eq!(coding(&[]), (Coding::Gzip, 1));
        assert_eq!(coding(&["--compression", "zstd"]), (Coding::Zstd, 1));
        assert_eq!(
            coding(&["--compression", "ZSTD", "--compression-level", "3"]),
            (Coding::Zstd, 3)
        );
        assert_eq!(coding(&["--compression", "none"]), (Coding::Identity, 0));
        assert_eq!(coding(&["--gzip-level", "6"]), (Coding::Gzip, 6));
        assert_eq!(
            coding(&["--gzip-level", "6", "--compression", "zstd"]),
            (Coding::Zstd, 1)
        );
        for bad in [
            &["--compression", "br"][..],
            &["--compression-level", "0"],
            &["--compression-level", "20"],
        ] {
            let args = [&["entrypoint"], bad, &["true"]].concat();
            assert!(Args::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_batch_never_exceeds_the_buffer() {
        let a = parse(&["entrypoint", "--buffer-limit", "4K", "true"]);
        assert_eq!(a.ship_config().batch_bytes, 4096);
    }
}
