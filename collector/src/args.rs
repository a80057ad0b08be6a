//! Command line and environment.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use client::{Defaults, ShipArgs, ShipConfig};
use contract::{coding::Coding, size::parse_size};

/// Captures what tenant containers write to their stdout and stderr, in the kernel, and ships it
/// to the metadata API as `ebpf` streams.
///
/// Local mode (`--cgroup DIR=CONTEXT`, repeatable) watches cgroup v2 directories and everything
/// below them; each container cgroup's output goes to CONTEXT.
#[derive(Debug, clap::Parser)]
#[command(name = "collector", version)]
pub struct Args {
    /// Metadata API base URL (`http://host:port`).
    #[arg(long, env = contract::env::METADATA_API_URL)]
    pub url: String,
    /// Bearer token file (a collector token), read again whenever it changes.
    #[arg(long, env = contract::env::METADATA_API_TOKEN_FILE)]
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
    #[command(flatten)]
    pub ship: ShipArgs,
    /// Pin the programs and their maps under this directory on the BPF filesystem, so capture
    /// goes on between runs (a restart or upgrade of the collector, a crash): the next run
    /// takes over every stream where this one stopped, and what was written meanwhile beyond
    /// the ring's room is reported as dropped. Streams of running containers are left open on
    /// exit. Remove the directory to detach everything for good. Without it, the programs
    /// detach when the collector exits and it ends every stream it ships.
    #[arg(long, env = "RELAY_COLLECTOR_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Forward the eBPF programs' debug log (aya-log) to this process's log.
    #[arg(long, env = "RELAY_EBPF_LOG")]
    pub ebpf_log: bool,
}

impl Args {
    /// The shipper settings these arguments describe.
    pub fn ship_config(&self) -> ShipConfig {
        self.ship.config(Defaults {
            buffer_limit: 16 << 20,
            // Off: see `--compression`.
            compression: Coding::Identity,
        })
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
