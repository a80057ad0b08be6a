//! The operator: the `Tenant` custom resource, its tools volumes, the pod injection webhook and
//! the collector DaemonSet.
#![forbid(unsafe_code)]

pub mod conditions;
pub mod controller;
pub mod crd;
pub mod daemonset;
pub mod lease;
pub mod metrics;
pub mod mutate;
pub mod registry;
pub mod tls;
pub mod webhook;
