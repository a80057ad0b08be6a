//! Test helpers: the real metadata-api binary on a real socket (from `testbed::api`), and the
//! entrypoint binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, process::Command};

pub use testbed::api::*;

pub fn entrypoint() -> &'static str {
    env!("CARGO_BIN_EXE_entrypoint")
}

/// `Api::wrap` with this build's entrypoint.
pub trait Wrap {
    fn wrap(&self, args: &[&str]) -> Command;
}

impl Wrap for Api {
    fn wrap(&self, args: &[&str]) -> Command {
        self.wrap_with(Path::new(entrypoint()), args)
    }
}
