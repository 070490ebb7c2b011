//! Subcommands of the `pawfect-worker` binary (each in its own module).

pub mod caption;
