//! `metadata-api serve | token | capture-report`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use metadata_api::{
    auth::{Keys, Scope},
    report::Report,
    server::{ServeArgs, serve},
};

#[derive(Debug, Parser)]
#[command(name = "metadata-api", version, about = "Relay log stream service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP service.
    Serve(Box<ServeArgs>),
    /// Print a bearer token for a context.
    Token {
        #[arg(
            long,
            env = "RELAY_METADATA_API_KEY_FILE",
            default_value = "data/metadata-api.key"
        )]
        key_file: PathBuf,
        /// Token keys, as `serve` takes them: the token is signed with the first.
        #[arg(
            long = "token-key-file",
            env = "RELAY_METADATA_API_TOKEN_KEY_FILES",
            value_delimiter = ','
        )]
        token_key_files: Vec<PathBuf>,
        /// `workflows/{w}/triggers/{t}`, `workflows/{w}/runs/{r}/steps/{s}`, or a prefix for `read`.
        #[arg(long)]
        context: String,
        #[arg(long, value_enum)]
        scope: Scope,
        /// Lifetime, e.g. `15m`, `24h`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Print a context's capture report: each stream as the entrypoint and the collector stored
    /// it, and where they first differ. Exit 0 when both paths agree on every stream, 1 when not
    /// (a difference, a stream on one path only, or an incomplete stream), 69 when the report
    /// cannot be fetched.
    CaptureReport(ReportArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["trigger", "step"])))]
struct ReportArgs {
    /// The metadata API, e.g. `http://127.0.0.1:7070`.
    #[arg(long, env = "RELAY_METADATA_API_URL")]
    url: String,
    /// A read token covering the context (or the context's write token).
    #[arg(long, env = "RELAY_METADATA_API_TOKEN", hide_env_values = true)]
    token: String,
    /// `WORKFLOW/TRIGGER`.
    #[arg(long)]
    trigger: Option<String>,
    /// `WORKFLOW/RUN/STEP`.
    #[arg(long)]
    step: Option<String>,
    /// Print the JSON report instead of the table.
    #[arg(long)]
    json: bool,
}

/// Exit code when the report cannot be fetched (EX_UNAVAILABLE).
const EX_UNAVAILABLE: u8 = 69;

impl ReportArgs {
    /// The report's path, or why the context is malformed.
    fn path(&self) -> Result<String, String> {
        let segs = |s: &str, n: usize, what: &str| {
            let v: Vec<&str> = s.split('/').collect();
            if v.len() == n && v.iter().all(|p| contract::names::valid_context_segment(p)) {
                Ok(v.into_iter().map(str::to_owned).collect::<Vec<_>>())
            } else {
                Err(format!(
                    "--{what} must be {n} segments of [A-Za-z0-9._-] separated by `/`"
                ))
            }
        };
        match (&self.trigger, &self.step) {
            (Some(t), _) => {
                let v = segs(t, 2, "trigger")?;
                Ok(format!(
                    "/api/workflows/{}/triggers/{}/logs/capture-report",
                    v[0], v[1]
                ))
            }
            (None, Some(st)) => {
                let v = segs(st, 3, "step")?;
                Ok(format!(
                    "/api/workflows/{}/runs/{}/steps/{}/logs/capture-report",
                    v[0], v[1], v[2]
                ))
            }
            (None, None) => Err("one of --trigger or --step is required".to_owned()),
        }
    }
}

async fn fetch_report(args: &ReportArgs, path: &str) -> anyhow::Result<(Report, String)> {
    let url = format!("{}{path}", args.url.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&args.token)
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("GET {url}: {e}"))?;
    let status = resp.status();
    let body = resp.text().await?;
    if !status.is_success() {
        anyhow::bail!("GET {url}: {status}: {}", body.trim());
    }
    let report: Report = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("GET {url}: not a capture report: {e}"))?;
    Ok((report, body))
}

fn capture_report(args: &ReportArgs) -> ExitCode {
    let path = match args.path() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("metadata-api: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let fetched = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(fetch_report(args, &path)));
    match fetched {
        Ok((report, body)) => {
            if args.json {
                println!("{body}");
            } else {
                print!("{}", report.table());
            }
            if report.agree {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("metadata-api: {e:#}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

/// Exit code for invalid configuration (EX_USAGE, as linkerd2-proxy does).
const EX_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::CaptureReport(args) => capture_report(&args),
        Command::Token {
            key_file,
            token_key_files,
            context,
            scope,
            ttl,
        } => match Keys::load_or_create(&key_file)
            .and_then(|k| k.with_token_key_files(&token_key_files))
            .map_err(anyhow::Error::from)
            .and_then(|k| k.mint(&context, scope, ttl).map_err(anyhow::Error::from))
        {
            Ok(t) => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("metadata-api: {e:#}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Serve(args) => {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("metadata-api: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let state = match rt.block_on(args.state()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("metadata-api: {:#}", anyhow::Error::from(e));
                    return ExitCode::from(EX_CONFIG);
                }
            };
            // Before any listener: connections are then capped below what is in force.
            let open_files = metadata_api::conn::raise_open_files();
            let result = rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(args.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
                let addr = listener.local_addr()?;
                // The first stdout line tells scripts and tests where we listen (port 0 works).
                println!("metadata-api listening on http://{addr}");
                tracing::info!(%addr, "Listening.");
                let metrics = match args.metrics_listen {
                    Some(at) => {
                        let listener = tokio::net::TcpListener::bind(at)
                            .await
                            .map_err(|e| anyhow::anyhow!("cannot listen on {at}: {e}"))?;
                        let addr = listener.local_addr()?;
                        println!("metadata-api metrics on http://{addr}/metrics");
                        tracing::info!(%addr, "Serving metrics.");
                        Some(listener)
                    }
                    None => None,
                };
                if let Some(retention) = args.retention() {
                    tracing::info!(age = ?retention.age, every = ?retention.every, "Retention on.");
                    tokio::spawn(metadata_api::retention::run(
                        state.store.clone(),
                        state.keys.clone(),
                        retention,
                    ));
                }
                let limits = args.conn_limits(open_files);
                tracing::info!(
                    max_connections = limits.max_connections,
                    max_per_peer = limits.max_per_peer,
                    open_files,
                    "Connection limits."
                );
                serve(listener, metrics, state, limits, Duration::from_secs(10)).await?;
                anyhow::Ok(())
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("metadata-api: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
