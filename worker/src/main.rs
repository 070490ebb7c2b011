//! `pawfect-worker`: the GPU worker binary.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pawfect-worker", version, about = "Pawfect Inpaint worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Caption an image with Florence-2 and print the surface prompt it yields.
    Caption(pawfect_worker::cli::caption::CaptionArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Caption(args) => pawfect_worker::cli::caption::run(args),
    }
}
