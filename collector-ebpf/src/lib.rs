//! Empty: this library target exists so that `collector` can list this crate as a
//! build-dependency (as aya-template does), which makes cargo rerun `collector/build.rs`, and so
//! rebuild the eBPF object, when `collector-common` or another dependency of this crate changes.
//! The programs are the `collector` binary target, `src/main.rs`.

#![no_std]
