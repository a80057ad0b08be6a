//! The original `ENTRYPOINT` and `CMD` of a container image, read from its registry over the OCI
//! distribution API (with [`oci_client`]), for containers that set no `command`.
//!
//! [`Registry::image_command`] normalizes the reference the way Docker and the kubelet do
//! (`busybox` is `docker.io/library/busybox:latest`), fetches the manifest (OCI image manifest,
//! Docker v2 schema 2, or an OCI index / Docker manifest list, from which the entry for the
//! configured [`Platform`] is picked), then the image configuration blob (at most
//! [`RegistryConfig::max_config_size`] bytes, digest verified), and caches the result by digest.
//! Credentials come from the pod's pull secrets: [`PullAuth::from_secrets`] reads them as the
//! kubelet does, [`pull_auth_for_pod`] fetches the pod's and its ServiceAccount's.
//!
//! The lookup is async and bounded by [`RegistryConfig::timeout`], so the webhook can resolve
//! images before it calls the pure, synchronous [`crate::mutate::mutate`].
//!
//! Note on what `oci_client` handles itself: its manifest requests list the OCI and Docker media
//! types in `Accept` (distribution 2.8 answers 404 to an OCI manifest requested without them),
//! and a manifest without a `mediaType` field (as umoci writes them) is recognized by its shape.
//!
//! One file per concern:
//! - `reference.rs`: image references, normalized as Docker does ([`normalize_reference`]);
//! - `platform.rs`: platforms, and the entry of an image index one runs best ([`Platform`],
//!   [`select_platform`]);
//! - `auth.rs`: credentials from pull secrets, matched per image as the kubelet does
//!   ([`PullAuth`]), and the pull secrets of a pod ([`pull_auth_for_pod`]);
//! - `config.rs`: how registries are reached and how much is cached ([`RegistryConfig`]);
//! - `error.rs`: why a lookup failed ([`RegistryError`]), from `oci_client`'s errors;
//! - `image_config.rs`: the command in an image configuration blob
//!   ([`image_command_from_config`]);
//! - `client.rs`: the registry client and its caches ([`Registry`]);
//! - `lookup.rs`: the webhook's image lookup for a pod ([`PodImageLookup`]).

mod auth;
mod client;
mod config;
mod error;
mod image_config;
mod lookup;
mod platform;
mod reference;

pub use auth::{
    Credentials, DOCKER_CFG_TYPE, DOCKER_CONFIG_JSON_TYPE, PullAuth, pull_auth, pull_auth_for_pod,
};
pub use client::Registry;
pub use config::RegistryConfig;
pub use error::RegistryError;
pub use image_config::image_command_from_config;
pub use lookup::PodImageLookup;
pub use platform::{InvalidPlatform, Platform, select_platform};
pub use reference::normalize_reference;
