//! The `Tenant` custom resource.
