//! Prints the `Tenant` CustomResourceDefinition as YAML:
//! `cargo run -p operator --bin crdgen > deploy/base/crd/tenant.yaml`.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match operator::crd::crd_yaml() {
        Ok(yaml) => yaml,
        Err(error) => {
            eprintln!("crdgen: cannot serialize the Tenant CRD: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = std::io::stdout().lock().write_all(yaml.as_bytes()) {
        eprintln!("crdgen: cannot write the CRD: {error}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
