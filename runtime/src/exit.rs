//! Exit codes, and the `main` wrapper that turns an [`anyhow::Result`] into one.
//!
//! A binary's start-up returns [`Result<ExitCode, Failure>`]: `?` on any error means exit 1, and
//! [`WithCode::code`] picks another code (a usage error, an unavailable service). [`main`] prints
//! the error as `NAME: error: cause: cause` on one line of stderr, as the binaries always did
//! (tests and log scrapers read that line), and returns the code.

use std::{fmt, process::ExitCode};

/// A command-line or configuration error (sysexits `EX_USAGE`).
pub const USAGE: u8 = 64;
/// A service or resource the binary needs is not there (sysexits `EX_UNAVAILABLE`).
pub const UNAVAILABLE: u8 = 69;

/// Why a binary stops: the error and the exit code it stops with.
pub struct Failure {
    /// The process exit code (never 0).
    pub code: u8,
    /// What went wrong, with its causes.
    pub error: anyhow::Error,
}

impl Failure {
    /// `error`, exiting with `code`.
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Self {
            code,
            error: error.into(),
        }
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit {}: {:#}", self.code, self.error)
    }
}

/// Any error is a failure (exit 1) by default, so `?` works in a start-up path.
impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Self::new(1, error)
    }
}

/// Picks the exit code of a start-up step's error.
pub trait WithCode<T> {
    /// The error, if any, exits with `code`.
    fn code(self, code: u8) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> WithCode<T> for Result<T, E> {
    fn code(self, code: u8) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(code, e))
    }
}

/// The error and its causes on one line, `error: cause: cause`.
pub fn chain(error: &anyhow::Error) -> String {
    format!("{error:#}")
}

/// Runs a binary's body; a failure is printed to stderr as `NAME: error: cause: cause` and
/// becomes its exit code.
pub fn main(name: &str, body: impl FnOnce() -> Result<ExitCode, Failure>) -> ExitCode {
    body().unwrap_or_else(|failure| {
        eprintln!("{name}: {}", chain(&failure.error));
        ExitCode::from(failure.code)
    })
}

/// What a binary does with a command line clap refused: prints clap's message (usage on stderr,
/// `--help` and `--version` on stdout) and exits with [`USAGE`] for an error, 0 for help.
pub fn parse_error(error: &clap::Error) -> ExitCode {
    // Nothing better to do when stdout or stderr is gone.
    let _ = error.print();
    ExitCode::from(if error.use_stderr() { USAGE } else { 0 })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io;

    use anyhow::Context as _;

    use super::*;

    #[test]
    fn errors_exit_1_unless_given_a_code() {
        let plain: Result<(), Failure> = (|| {
            Err(io::Error::other("disk on fire"))?;
            Ok(())
        })();
        assert_eq!(plain.unwrap_err().code, 1);
        let usage = Err::<(), _>(io::Error::other("bad flag")).code(USAGE);
        assert_eq!(usage.unwrap_err().code, USAGE);
    }

    #[test]
    fn the_chain_is_one_line_with_every_cause() {
        let error = Err::<(), _>(io::Error::other("connection refused"))
            .context("cannot reach the API")
            .unwrap_err();
        assert_eq!(chain(&error), "cannot reach the API: connection refused");
    }

    #[test]
    fn main_returns_the_body_code_or_the_failure_code() {
        assert_eq!(main("t", || Ok(ExitCode::from(3))), ExitCode::from(3));
        assert_eq!(
            main("t", || Err(Failure::new(
                UNAVAILABLE,
                anyhow::anyhow!("gone")
            ))),
            ExitCode::from(UNAVAILABLE)
        );
    }
}
