//! `metadata-api serve | token | capture-report`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;

use clap::{Args, Parser, Subcommand};
use metadata_api::{
    auth::{Keys, Scope},
    report::Report,
    server::{ServeArgs, run},
};
use runtime::exit::{Failure, UNAVAILABLE, USAGE, WithCode as _};

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
    #[arg(long, env = contract::env::METADATA_API_URL)]
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

impl ReportArgs {
    /// The report's path, or why the context is malformed.
    fn path(&self) -> anyhow::Result<String> {
        let segs = |s: &str, n: usize, what: &str| {
            let v: Vec<&str> = s.split('/').collect();
            if v.len() == n && v.iter().all(|p| contract::names::valid_context_segment(p)) {
                Ok(v.into_iter().map(str::to_owned).collect::<Vec<_>>())
            } else {
                Err(anyhow::anyhow!(
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
            (None, None) => anyhow::bail!("one of --trigger or --step is required"),
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

/// Exit 0 when both paths agree, 1 when not; a malformed context is a usage error, a report that
/// cannot be fetched 69.
fn capture_report(args: &ReportArgs) -> Result<ExitCode, Failure> {
    let path = args.path().code(USAGE)?;
    let (report, body) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(fetch_report(args, &path)))
        .code(UNAVAILABLE)?;
    if args.json {
        println!("{body}");
    } else {
        print!("{}", report.table());
    }
    Ok(if report.agree {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints a bearer token; any error is a configuration error.
fn token(
    key_file: &std::path::Path,
    token_key_files: &[PathBuf],
    context: &str,
    scope: Scope,
    ttl: Duration,
) -> Result<ExitCode, Failure> {
    let token = Keys::load_or_create(key_file)
        .and_then(|k| k.with_token_key_files(token_key_files))
        .map_err(anyhow::Error::from)
        .and_then(|k| k.mint(context, scope, ttl).map_err(anyhow::Error::from))
        .code(USAGE)?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

/// Runs the service until SIGINT or SIGTERM. A configuration the state cannot be built from is
/// a usage error; anything else that stops it, a failure.
fn serve_command(args: &ServeArgs) -> Result<ExitCode, Failure> {
    let rt = tokio::runtime::Runtime::new().context("cannot start runtime")?;
    let state = rt.block_on(args.state()).code(USAGE)?;
    // Before any listener: connections are then capped below what is in force.
    let open_files = metadata_api::conn::raise_open_files();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        // The first stdout line tells scripts and tests where we listen (port 0 works).
        println!("metadata-api listening on http://{addr}");
        tracing::info!(%addr, "Listening.");
        let metrics = match args.metrics_listen {
            Some(at) => {
                let listener = tokio::net::TcpListener::bind(at)
                    .await
                    .with_context(|| format!("cannot listen on {at}"))?;
                let addr = listener.local_addr()?;
                println!("metadata-api metrics on http://{addr}/metrics");
                tracing::info!(%addr, "Serving metrics.");
                Some(listener)
            }
            None => None,
        };
        run(
            args,
            state,
            listener,
            metrics,
            open_files,
            runtime::shutdown::signal(),
        )
        .await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    runtime::tracing::init("info");
    runtime::exit::main("metadata-api", || match cli.command {
        Command::CaptureReport(args) => capture_report(&args),
        Command::Token {
            key_file,
            token_key_files,
            context,
            scope,
            ttl,
        } => token(&key_file, &token_key_files, &context, scope, ttl),
        Command::Serve(args) => serve_command(&args),
    })
}
