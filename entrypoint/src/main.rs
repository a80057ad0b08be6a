//! `entrypoint`: runs a tenant command and ships its stdout and stderr to the metadata API
//! without ever slowing or breaking the command. See `entrypoint --help`.
#![forbid(unsafe_code)]

mod args;
mod install;
mod pump;
mod supervise;

use std::{path::Path, process::ExitCode};

use clap::Parser;
use runtime::exit::USAGE;

use crate::supervise::say;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `entrypoint install DIR` exactly; `entrypoint -- install ...` runs a program named install.
    if let [_, sub, dir] = argv.as_slice()
        && sub == "install"
    {
        return match install::install(Path::new(dir)) {
            Ok(path) => {
                say!("installed {}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                say!("install into {}: {e}", Path::new(dir).display());
                ExitCode::FAILURE
            }
        };
    }
    let args = match args::Args::try_parse_from(&argv) {
        Ok(a) => a,
        Err(e) => return runtime::exit::parse_error(&e),
    };
    if args.command.is_empty() {
        say!("no command given\nusage: entrypoint [OPTIONS] [--] CMD [ARGS]...");
        return ExitCode::from(USAGE);
    }
    let code = match args.url.as_deref() {
        Some(url) if !url.is_empty() => supervise::run(&args, url),
        _ => {
            say!(
                "{} is not set; running the command without shipping",
                contract::env::METADATA_API_URL
            );
            supervise::exec_plain(&args.command)
        }
    };
    ExitCode::from(code)
}
