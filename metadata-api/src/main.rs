//! `metadata-api serve | token`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use metadata_api::{
    auth::{Keys, Scope},
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
    Serve(ServeArgs),
    /// Print a bearer token for a context.
    Token {
        #[arg(
            long,
            env = "RELAY_METADATA_API_KEY_FILE",
            default_value = "data/metadata-api.key"
        )]
        key_file: PathBuf,
        /// `workflows/{w}/triggers/{t}`, `workflows/{w}/runs/{r}/steps/{s}`, or a prefix for `read`.
        #[arg(long)]
        context: String,
        #[arg(long, value_enum)]
        scope: Scope,
        /// Lifetime, e.g. `15m`, `24h`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
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
        Command::Token {
            key_file,
            context,
            scope,
            ttl,
        } => match Keys::load_or_create(&key_file)
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
            let result = rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(args.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
                let addr = listener.local_addr()?;
                // The first stdout line tells scripts and tests where we listen (port 0 works).
                println!("metadata-api listening on http://{addr}");
                tracing::info!(%addr, "Listening.");
                serve(listener, state, Duration::from_secs(10)).await?;
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
