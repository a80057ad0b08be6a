//! `kubectl relay`: a kubectl plugin (a binary named `kubectl-relay` on the `PATH`) that reads a
//! step's or trigger's logs, capture report and streams from the metadata API.
//!
//! The API is found as kubectl finds services: `--url` or `RELAY_URL`, else through the
//! Kubernetes API server's service proxy to the Service `relay-system/metadata-api:http`
//! (`--service`). The token sent to it is `--token` or `RELAY_TOKEN`, else the kubeconfig
//! user's bearer token.
#![forbid(unsafe_code)]

mod api;
mod error;
mod kube;
mod logs;
mod report;
mod target;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum, error::ErrorKind};

use crate::{
    api::{Relay, Service},
    error::Error,
    kube::{Kube, KubeArgs},
    target::{Context, Target},
};

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-relay",
    bin_name = "kubectl relay",
    version,
    about = "Read relay's captured logs of Tekton steps and Knative triggers",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: Global,
}

const AFTER_HELP: &str = "Targets: step/WORKFLOW/RUN/STEP, trigger/WORKFLOW/TRIGGER, or pod/NAME \
(a Tekton step pod or Knative trigger pod, looked up in the namespace).

The API: --url or RELAY_URL, else the API server's service proxy to --service (default \
relay-system/metadata-api:http). The token: --token or RELAY_TOKEN, else the kubeconfig user's \
bearer token (token, tokenFile or exec plugin).

Exit codes:
  0  done
  1  usage error, or another failure
  2  not found: no such step, trigger, pod or stream (404), or a pod without a relay context
  3  not authorized: the token was refused (401/403), or there is no bearer token to send
  4  the API is unreachable or unavailable (connection refused, timeout, 5xx, no endpoints)
  5  bad request: the API refused a parameter (400), e.g. a malformed --since";

#[derive(Debug, Args)]
struct Global {
    /// The metadata API's URL, e.g. http://127.0.0.1:7070 (instead of the service proxy).
    #[arg(long, global = true, env = contract::env::PLUGIN_URL)]
    url: Option<String>,
    /// The bearer token for the metadata API (default: the kubeconfig user's token).
    #[arg(long, global = true, env = contract::env::PLUGIN_TOKEN, hide_env_values = true)]
    token: Option<String>,
    /// The metadata API's Service, NAMESPACE/NAME[:PORT], reached through the API server.
    #[arg(long, global = true, default_value = api::DEFAULT_SERVICE)]
    service: Service,
    /// The namespace of pod/NAME targets (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig file (default: KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print (or follow) the logs of a step, trigger or pod: every stream's lines, merged in the
    /// order they were written. `-o json` prints the API's NDJSON records.
    Logs(logs::LogsArgs),
    /// Print the capture report: each stream as the entrypoint and the collector stored it.
    Report {
        /// step/W/R/S, trigger/W/T or pod/NAME.
        target: Target,
    },
    /// List the streams of a step, trigger or pod: name, source, length, dropped bytes (and by
    /// reason), complete.
    Streams {
        /// step/W/R/S, trigger/W/T or pod/NAME.
        target: Target,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    // One line: clap's first, which says what is wrong.
                    let text = e.to_string();
                    let first = text.lines().next().unwrap_or("invalid arguments");
                    eprintln!("{first} (see kubectl relay --help)");
                    ExitCode::from(error::code::USAGE)
                }
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(error::code::USAGE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// What a command needs: the API and the context it reads.
struct Session {
    relay: Relay,
    context: Context,
}

impl Session {
    /// Finds the context (looking a pod up) and the API, loading the kubeconfig only when
    /// something needs it: a pod, the service proxy, or the user's token.
    async fn open(global: &Global, target: &Target) -> Result<Self, Error> {
        let url = global.url.as_deref().filter(|u| !u.is_empty());
        let token = global.token.clone().filter(|t| !t.is_empty());
        let needs_kube = url.is_none() || token.is_none() || matches!(target, Target::Pod(_));
        let kube = if needs_kube {
            Some(
                Kube::load(&KubeArgs {
                    kubeconfig: global.kubeconfig.clone(),
                    context: global.context.clone(),
                    namespace: global.namespace.clone(),
                })
                .await?,
            )
        } else {
            None
        };
        let context = match (target, &kube) {
            (Target::Pod(name), Some(kube)) => kube.pod_context(name).await?,
            _ => Context::of(target)
                .ok_or_else(|| Error::Usage("a pod target needs the kubeconfig".to_owned()))?,
        };
        let token = match (token, &kube) {
            (Some(t), _) => t,
            (None, Some(kube)) => kube.bearer_token().await?,
            // The kubeconfig is loaded whenever no token is given.
            (None, None) => return Err(no_token()),
        };
        let relay = match (url, kube) {
            (Some(url), _) => Relay::direct(url, token)?,
            (None, Some(kube)) => Relay::proxied(kube, &global.service, token),
            (None, None) => {
                return Err(Error::Usage(
                    "no --url and no kubeconfig to reach the API through".to_owned(),
                ));
            }
        };
        Ok(Self { relay, context })
    }

    async fn report(&self) -> Result<(contract::report::Report, Vec<u8>), Error> {
        let body = self
            .relay
            .get(&self.context.report_path(), "application/json")
            .await?
            .bytes()
            .await?;
        let report = serde_json::from_slice(&body).map_err(|e| {
            Error::Unavailable(format!("the API's answer is not a capture report: {e}"))
        })?;
        Ok((report, body))
    }
}

fn no_token() -> Error {
    Error::Unauthorized(format!(
        "the relay API needs a bearer token: pass --token or set {}",
        contract::env::PLUGIN_TOKEN
    ))
}

async fn run(cli: Cli) -> Result<(), Error> {
    let Cli { command, global } = cli;
    match command {
        Command::Logs(args) => {
            let session = Session::open(&global, &args.target).await?;
            logs::run(&session.relay, &session.context, &args, global.output).await
        }
        Command::Report { target } => {
            let session = Session::open(&global, &target).await?;
            let (report, body) = session.report().await?;
            match global.output {
                Output::Json => logs::print(&body, true).await,
                Output::Text => logs::print(report.table().as_bytes(), false).await,
            }
        }
        Command::Streams { target } => {
            let session = Session::open(&global, &target).await?;
            let (report, _) = session.report().await?;
            let rows = report::stream_rows(&report);
            match global.output {
                Output::Json => {
                    let json = serde_json::to_vec_pretty(&rows)
                        .map_err(|e| Error::Usage(format!("cannot render JSON: {e}")))?;
                    logs::print(&json, true).await
                }
                Output::Text => logs::print(report::streams_table(&rows).as_bytes(), false).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::error::code;

    #[test]
    fn the_cli_is_well_formed_and_documents_its_exit_codes() {
        Cli::command().debug_assert();
        for (n, what) in [
            (code::USAGE, "usage error"),
            (code::NOT_FOUND, "not found"),
            (code::UNAUTHORIZED, "not authorized"),
            (code::UNAVAILABLE, "unreachable"),
            (code::BAD_REQUEST, "bad request"),
        ] {
            let line = AFTER_HELP
                .lines()
                .find(|l| l.starts_with(&format!("  {n}  ")))
                .unwrap_or_else(|| panic!("exit code {n} is not in --help"));
            assert!(line.contains(what), "{line}");
        }
    }
}
