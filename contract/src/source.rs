//! Which capture path wrote a stream: shared by the service and its client.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Which capture path wrote a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Entrypoint,
    Ebpf,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Entrypoint => "entrypoint",
            Self::Ebpf => "ebpf",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
