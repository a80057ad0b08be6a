//! Command line and environment.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use metadata_api::{client::ShipConfig, size::parse_size};

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
    #[arg(long, env = "RELAY_METADATA_API_URL")]
    pub url: Option<String>,
    /// Bearer token file, read again whenever it changes (projected tokens rotate).
    #[arg(long, env = "RELAY_METADATA_API_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Stream name for the command's stdout.
    #[arg(long, env = "RELAY_STDOUT_STREAM", default_value = "stdout")]
    pub stdout_stream: String,
    /// Stream name for the command's stderr.
    #[arg(long, env = "RELAY_STDERR_STREAM", default_value = "stderr")]
    pub stderr_stream: String,
    /// A batch is sent once it holds this many bytes...
    #[arg(long, env = "RELAY_BATCH_BYTES", default_value = "1M", value_parser = parse_size)]
    pub batch_bytes: u64,
    /// ...or once its oldest byte waited this long.
    #[arg(long, env = "RELAY_BATCH_INTERVAL", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub batch_interval: Duration,
    /// Bytes buffered per stream (queued and in flight) before output is dropped and reported as
    /// dropped.
    #[arg(long, env = "RELAY_BUFFER_LIMIT", default_value = "8M", value_parser = parse_size)]
    pub buffer_limit: u64,
    /// Append requests in flight per stream.
    #[arg(long, env = "RELAY_MAX_IN_FLIGHT", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_in_flight: u16,
    /// gzip level for request bodies (0 = uncompressed).
    #[arg(long, env = "RELAY_GZIP_LEVEL", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=9))]
    pub gzip_level: u32,
    /// Time allowed after the command exits to ship what is left and declare the final lengths.
    #[arg(long, env = "RELAY_GRACE_PERIOD", default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace_period: Duration,
    /// Longest a single request to the API may take.
    #[arg(long, env = "RELAY_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

impl Args {
    /// The shipper settings these arguments describe.
    pub fn ship_config(&self) -> ShipConfig {
        let Self {
            batch_bytes,
            batch_interval,
            buffer_limit,
            max_in_flight,
            gzip_level,
            url: _,
            token_file: _,
            stdout_stream: _,
            stderr_stream: _,
            grace_period: _,
            request_timeout: _,
            command: _,
        } = self;
        let buffer_limit = usize::try_from(*buffer_limit).unwrap_or(usize::MAX);
        ShipConfig {
            batch_bytes: usize::try_from(*batch_bytes)
                .unwrap_or(usize::MAX)
                .clamp(1, buffer_limit.max(1)),
            batch_interval: *batch_interval,
            buffer_limit,
            max_in_flight: usize::from(*max_in_flight),
            gzip_level: *gzip_level,
            ..ShipConfig::default()
        }
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
        assert_eq!(a.gzip_level, 0);
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
    fn a_batch_never_exceeds_the_buffer() {
        let a = parse(&["entrypoint", "--buffer-limit", "4K", "true"]);
        assert_eq!(a.ship_config().batch_bytes, 4096);
    }
}
