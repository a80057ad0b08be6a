//! `cargo xtask <task>`: development tasks.
fn main() {}
