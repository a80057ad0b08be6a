//! Pod mutation: wrapping containers with the injected entrypoint.
