//! The collector: a node agent that captures tenant containers' stdout and stderr writes with
//! eBPF and ships them to the metadata API as `ebpf` streams.

mod args;
mod attribution;
mod btf;
mod capture;
mod ebpf;
mod metrics;

use std::{process::ExitCode, sync::Arc, time::Instant};

use anyhow::{Context as _, anyhow};
use aya::maps::{MapData, RingBuf};
use clap::Parser as _;
use client::{Client, Token};
use runtime::{
    admin::Admin,
    exit::{UNAVAILABLE, USAGE, WithCode as _},
};
use tokio::io::unix::AsyncFd;

use crate::{
    args::Args,
    attribution::{cgroups, kubernetes, local::Local},
    capture::{Attributor, Engine, EngineConfig},
    ebpf::{LoadOptions, Probes},
    metrics::Metrics,
};

/// Records read per wakeup before timers get a turn.
const RECORDS_PER_TURN: usize = 65_536;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => return runtime::exit::parse_error(&e),
    };
    runtime::tracing::init("info");
    // A configuration error is a usage error; anything that stops it later means this machine
    // cannot run the collector (UNAVAILABLE), except a runtime that does not start.
    runtime::exit::main("collector", || {
        let selection = check(&args).code(USAGE)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the runtime")?;
        runtime.block_on(run(args, selection)).code(UNAVAILABLE)?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Configuration errors that clap cannot see. In Kubernetes mode, returns the pods to capture.
fn check(args: &Args) -> anyhow::Result<Option<kubernetes::Selection>> {
    if args.cgroups.is_empty() && !args.kubernetes {
        anyhow::bail!("nothing to watch: give --cgroup DIR=CONTEXT or --kubernetes");
    }
    if args.kubernetes && args.node_name.as_deref().is_none_or(str::is_empty) {
        anyhow::bail!("--kubernetes needs --node-name (NODE_NAME)");
    }
    if !args.ring_bytes.is_power_of_two() || args.ring_bytes < 4096 || args.ring_bytes > 1 << 30 {
        anyhow::bail!(
            "--ring-bytes {} must be a power of two between 4K and 1G",
            args.ring_bytes
        );
    }
    args.kubernetes.then(|| selection(args)).transpose()
}

/// Errors are printed as they were as strings: an error's own message where it says enough
/// (`anyhow!("{e}")`), its whole source chain where the causes matter (Kubernetes, selectors).
async fn run(args: Args, selection: Option<kubernetes::Selection>) -> anyhow::Result<()> {
    if let Some(selection) = selection {
        let (attributor, root) = kubernetes_mode(&args, selection).await?;
        run_with(args, attributor, vec![root]).await
    } else {
        let (attributor, roots) = Local::new(&args.cgroups).map_err(|e| anyhow!("{e}"))?;
        run_with(args, attributor, roots).await
    }
}

/// Starts the pod reflector for this node (and the namespace reflector) and finds the kubepods
/// cgroup.
async fn kubernetes_mode(
    args: &Args,
    selection: kubernetes::Selection,
) -> anyhow::Result<(kubernetes::Kube, u64)> {
    let root = match &args.kubepods_cgroup {
        Some(dir) => dir.clone(),
        None => cgroups::cgroup2_mount()
            .and_then(|m| kubernetes::find_kubepods(&m))
            .context("no kubepods cgroup under the cgroup v2 mount (give --kubepods-cgroup)")?,
    };
    let root_id = cgroups::cgroup_id(&root).map_err(|e| anyhow!("{e}"))?;
    let node = args.node_name.clone().unwrap_or_default();
    let client = kube::Client::try_default()
        .await
        .context("Kubernetes API")?;
    let (index, driver) = kubernetes::PodIndex::start(client, &node, selection).await?;
    tokio::spawn(driver);
    index.wait_ready().await?;
    Ok((kubernetes::Kube::new(root, index), root_id))
}

/// The pods to capture, from `--namespace`, `--namespace-selector` and `--pod-selector`.
fn selection(args: &Args) -> anyhow::Result<kubernetes::Selection> {
    let selection = kubernetes::Selection::new(
        args.namespaces.clone(),
        args.pod_selector.as_deref(),
        &args.own_namespace,
    );
    match &args.namespace_selector {
        Some(selector) => selection.and_then(|s| s.with_namespace_selector(selector)),
        None => selection,
    }
    .map_err(anyhow::Error::from)
}

async fn run_with<A: Attributor>(args: Args, attributor: A, roots: Vec<u64>) -> anyhow::Result<()> {
    let ring_bytes = u32::try_from(args.ring_bytes)?;
    let probes = Probes::load(LoadOptions {
        ring_bytes,
        // Wake the reader when an eighth of the ring is used; the poll timer covers the rest.
        wakeup_bytes: u64::from(ring_bytes / 8),
        log: args.ebpf_log,
        pin_dir: args.pin_dir.clone(),
    })
    .map_err(|e| anyhow!("{e}"))?;
    let (loaded, ring, maps, counters) = probes.split();
    if loaded.resumed {
        tracing::info!(
            "Taking over from an earlier run: streams continue at their kernel offsets."
        );
    }
    let metrics = Arc::new(Metrics::new());
    metrics.attach_kernel(counters);
    // Bound at start-up, so a busy port is a clear refusal.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow!("cannot listen on {}: {e}", args.listen))?;
    let listen = listener.local_addr()?;
    let admin = Admin::new({
        let metrics = metrics.clone();
        move || Ok(metrics.render())
    });
    tokio::spawn(async move {
        // It serves until the process ends: scrapes go on while the engine ships what is left.
        if let Err(e) = admin.serve(listener, std::future::pending()).await {
            tracing::error!(error = %e, "Metrics server failed.");
        }
    });
    let token = args.token_file.clone().map_or(Token::None, Token::File);
    let client = Client::new(&args.url, token, args.ship.request_timeout)
        .map_err(|e| anyhow!("metadata API {}: {e}", args.url))?;
    let mut engine = Engine::new(
        EngineConfig {
            ship: args.ship_config(),
            grace: args.grace_period,
            hold: args.attribution_hold,
            leave_open: loaded.pinned(),
        },
        maps,
        attributor,
        Arc::new(client),
        metrics,
    );
    for id in roots {
        engine
            .watch(id)
            .map_err(|e| anyhow!("cannot watch cgroup {id}: {e}"))?;
    }
    // Tests and scripts wait for this line.
    println!("collector ready; metrics on http://{listen}/metrics");
    let ring = ebpf::register_readable(ring).map_err(|e| anyhow!("ring buffer: {e}"))?;
    read_loop(ring, &mut engine, args.ring_poll).await;
    engine.shutdown().await;
    drop(loaded);
    Ok(())
}

/// Reads the ring buffer until SIGINT or SIGTERM: at once when the kernel wakes us (an eighth of
/// the ring is full), and every `poll` otherwise, so a trickle waits at most that long.
async fn read_loop<A: Attributor>(
    mut ring: AsyncFd<RingBuf<MapData>>,
    engine: &mut Engine<A>,
    poll: std::time::Duration,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stop = std::pin::pin!(runtime::shutdown::signal());
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let Ok(mut guard) = ready else { return };
                if drain(guard.get_inner_mut(), engine) {
                    guard.clear_ready();
                }
            }
            _ = tick.tick() => {
                drain(ring.get_mut(), engine);
                engine.tick(Instant::now());
                engine.reap();
            }
            () = &mut stop => break,
        }
    }
    drain(ring.get_mut(), engine);
    tracing::info!("Stopping: shipping what is left.");
}

/// Hands ring buffer records to the engine. Returns whether the ring is empty.
fn drain<A: Attributor>(ring: &mut RingBuf<MapData>, engine: &mut Engine<A>) -> bool {
    for _ in 0..RECORDS_PER_TURN {
        let Some(record) = ring.next() else {
            return true;
        };
        engine.record(&record);
    }
    false
}
