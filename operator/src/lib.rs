//! The operator: the `Tenant` custom resource, its tools volumes, the pod injection webhook and
//! the collector DaemonSet.
#![forbid(unsafe_code)]

pub mod conditions;
pub mod crd;
pub mod mutate;
pub mod tls;
pub mod webhook;
pub mod webhook_tls;
