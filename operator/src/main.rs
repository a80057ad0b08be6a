//! `operator`: the Tenant controller, the pod injection webhook and the collector DaemonSet.
//!
//! Every replica serves the webhook (HTTPS, certificate from the shared Secret) and
//! `/metrics`, `/healthz`, `/readyz`. The replica holding the Lease also reconciles tenants and
//! keeps the collector DaemonSet applied; when it loses the lease it exits, so that it never acts
//! next to a new leader, and Kubernetes restarts it as a candidate.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kube::runtime::events::{Recorder, Reporter};
use operator::controller::{self, Context};
use operator::daemonset::{self, CollectorConfig};
use operator::lease::{Elector, LeaseConfig};
use operator::metrics::ControllerMetrics;
use operator::registry::{Platform, PodImageLookup, Registry, RegistryConfig};
use operator::tls::{TlsUpkeep, tls_upkeep};
use operator::webhook::{
    self, ApiSecretKeys, ImageLookup, NoImageLookup, Webhook, WebhookConfig, WebhookMetrics,
};
use prometheus_client::registry::Registry as MetricsRegistry;
use runtime::admin::Admin;
use runtime::shutdown::signal as wait_for_signal;
use tokio::sync::watch;
use tracing::{error, info, warn};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Relay operator: Tenant controller, pod injection webhook, collector DaemonSet"
)]
struct Args {
    /// Image holding the static entrypoint (tag or digest); its tools Job fills each tenant's
    /// tools volume. A new reference is a new tools version.
    #[arg(long, env = "RELAY_TOOLS_IMAGE")]
    tools_image: String,
    /// Command the tools Job runs in the tools image.
    #[arg(long, num_args = 1.., allow_hyphen_values = true,
          default_values_t = ["/entrypoint".to_owned(), "install".to_owned(), "/relay/lib".to_owned()])]
    tools_command: Vec<String>,
    /// The operator's namespace: webhook Secret, Lease, collector DaemonSet.
    #[arg(long, env = "POD_NAMESPACE", default_value = "relay-system")]
    namespace: String,
    /// This replica's identity in the Lease and in Events (the pod name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Metadata API base URL as tenant pods reach it.
    #[arg(long, default_value = "http://metadata-api.relay-system.svc:7070")]
    metadata_api_url: String,
    /// Audience of the projected ServiceAccount token pods send to the metadata API.
    #[arg(long, default_value = "relay-metadata-api")]
    token_audience: String,
    /// Where the webhook listens (HTTPS).
    #[arg(long, default_value = "0.0.0.0:8443")]
    webhook_listen: SocketAddr,
    /// The webhook's Service: its certificate is valid for the Service's DNS names.
    #[arg(long, default_value = "relay-operator")]
    webhook_service: String,
    /// Secret holding the webhook's CA and serving certificate.
    #[arg(long, default_value = "relay-operator-webhook-tls")]
    webhook_secret: String,
    /// MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(long, default_value = "relay-pod-injection")]
    webhook_configuration: String,
    /// Extra IP addresses the webhook certificate is valid for (a `url:` client config).
    #[arg(long = "webhook-ip")]
    webhook_ips: Vec<IpAddr>,
    /// Refuse pods of tenants whose tools are not ready instead of admitting them unwrapped.
    #[arg(long)]
    deny_when_not_ready: bool,
    /// `/metrics`, `/healthz` and `/readyz` (plain HTTP).
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Name of the leader election Lease.
    #[arg(long, default_value = "relay-operator")]
    lease_name: String,
    /// Collector image; when given, the operator owns the collector DaemonSet.
    #[arg(long)]
    collector_image: Option<String>,
    /// Argument appended to the collector's (repeatable).
    #[arg(long = "collector-arg", allow_hyphen_values = true)]
    collector_args: Vec<String>,
    /// Environment variable `NAME=VALUE` set on the collector, replacing the template's of that
    /// name (repeatable).
    #[arg(long = "collector-env", value_parser = parse_env)]
    collector_env: Vec<(String, String)>,
    /// Run the collector pods on the node's network (`hostNetwork: true`), for clusters whose
    /// node agents reach the metadata API from the node rather than from the pod network.
    #[arg(long)]
    collector_host_network: bool,
    /// Platform whose image config gives a container's entrypoint (default: the operator's).
    #[arg(long)]
    platform: Option<Platform>,
    /// Registry (`host:port`) reached over plain HTTP (repeatable).
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Never look up image entrypoints: containers without `command` stay unwrapped.
    #[arg(long)]
    no_image_lookup: bool,
    /// Deadline for a pod's image lookups.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    image_lookup_timeout: Duration,
    /// How long a tools claim of a previous tools version is kept at least once superseded, even
    /// when no pod mounts it: it covers pods admitted with the old claim just before the switch
    /// that the API server has not stored yet (keep it above the webhook's timeout).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    superseded_claim_grace: Duration,
}

/// `NAME=VALUE` of `--collector-env`.
fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

fn main() -> ExitCode {
    runtime::tracing::init("info");
    let args = Args::parse();
    if args.tools_command.is_empty() || args.tools_image.is_empty() {
        error!("--tools-image and --tools-command must not be empty");
        return ExitCode::from(runtime::exit::USAGE);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logged, not printed as `operator: ...` like the other binaries: the operator's
            // logs are what a cluster keeps of why it stopped.
            error!("{}", runtime::exit::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Resolves once the stop was sent (after SIGTERM or SIGINT, or when leadership ended).
fn shutdown_signal(rx: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + Sync + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    use anyhow::Context as _;

    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API")?;
    let identity = args
        .pod_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("relay-operator-{}", std::process::id()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);

    let controller_metrics = ControllerMetrics::default();
    let webhook_metrics = WebhookMetrics::default();
    let mut registry = MetricsRegistry::default();
    controller_metrics.register(&mut registry);
    webhook_metrics.register(&mut registry);
    let admin = Admin::registry(Arc::new(registry))
        .health_body("ok")
        .readiness(ready_rx);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    info!(addr = %args.listen, "serving /metrics, /healthz, /readyz");
    let http = tokio::spawn(admin.serve(listener, shutdown_signal(&stop_rx)));

    // The webhook: every replica serves it.
    let mut upkeep = TlsUpkeep::new(
        &args.namespace,
        &args.webhook_secret,
        &args.webhook_service,
        &args.webhook_configuration,
    );
    upkeep.ip_addresses = args.webhook_ips.clone();
    let (tls, upkeep_loop) = tls_upkeep(client.clone(), upkeep)
        .await
        .context("cannot set up the webhook certificate")?;
    tokio::spawn(upkeep_loop);
    let (tenants, reflector) = webhook::tenant_reflector(client.clone());
    tokio::spawn(reflector);
    let images: Arc<dyn ImageLookup> = if args.no_image_lookup {
        Arc::new(NoImageLookup)
    } else {
        let mut config = RegistryConfig::default();
        if let Some(platform) = args.platform.clone() {
            config.platform = platform;
        }
        config.insecure_registries = args.insecure_registries.clone();
        config.timeout = args.image_lookup_timeout;
        Arc::new(PodImageLookup {
            registry: Registry::new(config),
            client: client.clone(),
        })
    };
    let mut webhook_config = WebhookConfig::new(&args.metadata_api_url, &args.token_audience);
    webhook_config.deny_when_not_ready = args.deny_when_not_ready;
    webhook_config.image_lookup_timeout = args.image_lookup_timeout;
    let reporter = Reporter {
        controller: webhook::EVENT_REPORTER.to_owned(),
        instance: Some(identity.clone()),
    };
    let hook = Arc::new(Webhook::new(
        webhook_config,
        tenants.clone(),
        images,
        Arc::new(ApiSecretKeys {
            client: client.clone(),
        }),
        Recorder::new(client.clone(), reporter),
        webhook_metrics,
    ));
    let webhook_listener = tokio::net::TcpListener::bind(args.webhook_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.webhook_listen))?;
    info!(addr = %args.webhook_listen, "serving the pod injection webhook");
    let serving = tokio::spawn(webhook::serve(
        webhook_listener,
        tls,
        hook,
        shutdown_signal(&stop_rx),
    ));
    tokio::spawn(async move {
        tenants.wait_until_ready().await.ok();
        let _ = ready_tx.send(true);
    });

    // Leader only: the tenant controller and the collector DaemonSet.
    let mut elector = Elector::new(
        client.clone(),
        LeaseConfig::new(&args.namespace, &args.lease_name, &identity),
    );
    let leading = tokio::select! {
        () = wait_for_signal() => false,
        () = elector.acquire() => true,
    };
    let lost = if leading {
        info!(identity, "leading: reconciling tenants");
        controller_metrics.leader.set(1);
        let mut config = controller::Config::new(&args.tools_image);
        config.tools_command = args.tools_command.clone();
        config.collect_grace = args.superseded_claim_grace;
        let ctx = Arc::new(Context::new(
            client.clone(),
            config,
            Some(identity.clone()),
            controller_metrics.clone(),
        ));
        let reconciling = tokio::spawn(controller::run(ctx, shutdown_signal(&stop_rx)));
        let collectors = args.collector_image.clone().map(|image| {
            let mut config = CollectorConfig::new(&args.namespace, image);
            config.extra_args = args.collector_args.clone();
            config.extra_env = args.collector_env.clone();
            config.host_network = args.collector_host_network;
            tokio::spawn(daemonset::run(
                client.clone(),
                config,
                shutdown_signal(&stop_rx),
            ))
        });
        let lost = tokio::select! {
            () = wait_for_signal() => false,
            () = elector.hold() => true,
        };
        let _ = stop_tx.send(true);
        controller_metrics.leader.set(0);
        let _ = reconciling.await;
        if let Some(task) = collectors {
            match task.await {
                Ok(Err(e)) => error!(error = %e, "collector DaemonSet"),
                Err(e) => error!(error = %e, "collector DaemonSet task"),
                Ok(Ok(())) => {}
            }
        }
        if !lost && let Err(e) = elector.release().await {
            warn!(error = %e, "cannot release the leader lease");
        }
        lost
    } else {
        false
    };
    let _ = stop_tx.send(true);
    let _ = serving.await;
    let _ = http.await;
    if lost {
        anyhow::bail!("lost the leader lease; exiting so that only the new leader acts");
    }
    info!("stopped");
    Ok(())
}
