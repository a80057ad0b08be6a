//! What can go wrong, each kind with its exit code (documented in `--help` and the README).

use std::process::ExitCode;

/// Exit codes: a script can tell these apart.
pub mod code {
    /// A usage error (a flag, a target) or anything not listed below.
    pub const USAGE: u8 = 1;
    /// The step, trigger, pod or stream is not there (`404`), or a pod has no relay context.
    pub const NOT_FOUND: u8 = 2;
    /// The token was refused (`401`, `403`), or there is no bearer token to send.
    pub const UNAUTHORIZED: u8 = 3;
    /// The API cannot be reached or is unavailable: connection errors, timeouts, `5xx`, a
    /// Service without endpoints.
    pub const UNAVAILABLE: u8 = 4;
    /// The API refused the request's parameters (`400`, e.g. a malformed `--since`).
    pub const BAD_REQUEST: u8 = 5;
}

/// A failure, printed as one line (`error: ...`) with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    BadRequest(String),
}

impl Error {
    pub fn code(&self) -> u8 {
        match self {
            Self::Usage(_) => code::USAGE,
            Self::NotFound(_) => code::NOT_FOUND,
            Self::Unauthorized(_) => code::UNAUTHORIZED,
            Self::Unavailable(_) => code::UNAVAILABLE,
            Self::BadRequest(_) => code::BAD_REQUEST,
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code())
    }

    /// The error for an HTTP status other than success, with `what` saying what was asked.
    pub fn from_status(status: u16, what: String) -> Self {
        match status {
            400 | 416 => Self::BadRequest(what),
            401 | 403 => Self::Unauthorized(what),
            404 | 410 => Self::NotFound(what),
            408 | 429 | 500..=599 => Self::Unavailable(what),
            _ => Self::Usage(what),
        }
    }
}

/// An error and its sources on one line: `a: b: c`.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Many errors repeat their source's message in their own.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    one_line(&out)
}

/// Newlines and runs of spaces collapsed: an error is one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
