//! Command line and environment.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use client::ShipConfig;
use contract::{
    coding::{self, Coding},
    size::parse_size,
};

/// Captures what tenant containers write to their stdout and stderr, in the kernel, and ships it
/// to the metadata API as `ebpf` streams.
///
/// Local mode (`--cgroup DIR=CONTEXT`, repeatable) watches cgroup v2 directories and everything
/// below them; each container cgroup's output goes to CONTEXT.
#[derive(Debug, clap::Parser)]
#[command(name = "collector", version)]
pub struct Args {
    /// Metadata API base URL (`http://host:port`).
    #[arg(long, env = "RELAY_METADATA_API_URL")]
    pub url: String,
    /// Bearer token file (a collector token), read again whenever it changes.
    #[arg(long, env = "RELAY_METADATA_API_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// A cgroup v2 directory to watch, with the log context its output belongs to.
    #[arg(
        long = "cgroup",
        value_name = "DIR=CONTEXT",
        env = "RELAY_COLLECTOR_CGROUPS",
        value_delimiter = ','
    )]
    pub cgroups: Vec<CgroupArg>,
    /// Kubernetes mode: watch this node's pod cgroups and attribute them to pods through the API
    /// server (in-cluster config or KUBECONFIG).
    #[arg(long, env = "RELAY_COLLECTOR_KUBERNETES", conflicts_with = "cgroups")]
    pub kubernetes: bool,
    /// This node's name (Kubernetes mode; from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The node's kubepods cgroup v2 directory (default: `kubepods` or `kubepods.slice` under
    /// the cgroup v2 mount).
    #[arg(long, env = "RELAY_KUBEPODS_CGROUP")]
    pub kubepods_cgroup: Option<PathBuf>,
    /// Namespaces whose pods are captured (default: all but the system namespaces).
    #[arg(
        long = "namespace",
        env = "RELAY_COLLECTOR_NAMESPACES",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,
    /// Label selector of the namespaces whose pods are captured (`k=v,k!=v,k,!k`), e.g.
    /// `relay.sh/tenant=true`, the label the operator puts on every namespace holding a Tenant.
    /// Followed while the collector runs: a namespace that gains the labels has its pods' new
    /// output captured from then on. Combines with `--namespace` and `--pod-selector` (all must
    /// match).
    #[arg(long, env = "RELAY_COLLECTOR_NAMESPACE_SELECTOR")]
    pub namespace_selector: Option<String>,
    /// Label selector of the pods to capture (`k=v,k!=v,k,!k`).
    #[arg(long, env = "RELAY_COLLECTOR_POD_SELECTOR")]
    pub pod_selector: Option<String>,
    /// The collector's own namespace, never captured.
    #[arg(long, env = "POD_NAMESPACE", default_value = "relay-system")]
    pub own_namespace: String,
    /// Address of `/metrics` and `/healthz`.
    #[arg(long, env = "RELAY_COLLECTOR_LISTEN", default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,
    /// Size of the kernel ring buffer (a power of two, at least a page).
    #[arg(long, env = "RELAY_RING_BYTES", default_value = "16M", value_parser = parse_size)]
    pub ring_bytes: u64,
    /// How long user space may leave captured bytes in the ring before it reads them.
    #[arg(long, env = "RELAY_RING_POLL", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub ring_poll: Duration,
    /// How long bytes of a cgroup not attributed to a container yet are held before they are
    /// dropped.
    #[arg(long, env = "RELAY_ATTRIBUTION_HOLD", default_value = "5s", value_parser = humantime::parse_duration)]
    pub attribution_hold: Duration,
    /// Time allowed after a container ends to ship what is left and declare the final lengths.
    #[arg(long, env = "RELAY_GRACE_PERIOD", default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace_period: Duration,
    /// A batch is sent once it holds this many bytes...
    #[arg(long, env = "RELAY_BATCH_BYTES", default_value = "1M", value_parser = parse_size)]
    pub batch_bytes: u64,
    /// ...or once its oldest byte waited this long.
    #[arg(long, env = "RELAY_BATCH_INTERVAL", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub batch_interval: Duration,
    /// Bytes buffered per stream before output is dropped (and reported as dropped).
    #[arg(long, env = "RELAY_BUFFER_LIMIT", default_value = "16M", value_parser = parse_size)]
    pub buffer_limit: u64,
    /// Append requests in flight per stream.
    #[arg(long, env = "RELAY_MAX_IN_FLIGHT", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_in_flight: u16,
    /// Compression of request bodies: gzip, zstd or none [default: none]. Off by default: on a
    /// node the CPU of compressing every tenant's output costs more than the in-cluster traffic it
    /// saves (zlib level 1 alone is ~4.5 core-s/GB here), as in Fluent Bit's and Vector's HTTP
    /// outputs; zstd 1 costs less than that (see the README's compression table).
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
    /// Forward the eBPF programs' debug log (aya-log) to this process's log.
    /// Pin the programs and their maps under this directory on the BPF filesystem, so capture
    /// goes on between runs (a restart or upgrade of the collector, a crash): the next run
    /// takes over every stream where this one stopped, and what was written meanwhile beyond
    /// the ring's room is reported as dropped. Streams of running containers are left open on
    /// exit. Remove the directory to detach everything for good. Without it, the programs
    /// detach when the collector exits and it ends every stream it ships.
    #[arg(long, env = "RELAY_COLLECTOR_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    #[arg(long, env = "RELAY_EBPF_LOG")]
    pub ebpf_log: bool,
}

impl Args {
    /// The shipper settings these arguments describe.
    pub fn ship_config(&self) -> ShipConfig {
        let buffer_limit = usize::try_from(self.buffer_limit).unwrap_or(usize::MAX);
        let (compression, compression_level) = coding::from_flags(
            self.compression,
            self.compression_level,
            self.gzip_level,
            Coding::Identity,
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

/// `DIR=CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupArg {
    pub dir: PathBuf,
    pub context: String,
}

impl FromStr for CgroupArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (dir, context) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("{s:?} is not DIR=CONTEXT"))?;
        if dir.is_empty() || context.is_empty() {
            return Err(format!("{s:?} is not DIR=CONTEXT"));
        }
        Ok(Self {
            dir: PathBuf::from(dir),
            context: context.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_arg_splits_at_the_last_equals_sign() {
        let a: CgroupArg = "/sys/fs/cgroup/a=b/c=workflows/w/triggers/t"
            .parse()
            .unwrap();
        assert_eq!(a.dir, PathBuf::from("/sys/fs/cgroup/a=b/c"));
        assert_eq!(a.context, "workflows/w/triggers/t");
        assert!("/sys/fs/cgroup/a".parse::<CgroupArg>().is_err());
        assert!("=ctx".parse::<CgroupArg>().is_err());
        assert!("/dir=".parse::<CgroupArg>().is_err());
    }

    #[test]
    fn compression_is_off_unless_asked_for_by_either_flag() {
        use clap::Parser;
        let coding = |args: &[&str]| {
            let argv = [&["collector", "--url", "http://127.0.0.1:1"], args].concat();
            let c = Args::try_parse_from(argv).unwrap().ship_config();
            (c.compression, c.compression_level)
        };
        assert_eq!(coding(&[]), (Coding::Identity, 0));
        // What the operator passes to the collector DaemonSet today.
        assert_eq!(coding(&["--gzip-level", "1"]), (Coding::Gzip, 1));
        assert_eq!(coding(&["--compression", "zstd"]), (Coding::Zstd, 1));
        assert_eq!(
            coding(&["--compression", "zstd", "--compression-level", "3"]),
            (Coding::Zstd, 3)
        );
    }
}
