//! The `pawfect-worker` command line. Each subcommand lives in its own module.

use clap::{Parser, Subcommand};

pub mod caption;
pub mod inpaint;

#[derive(Debug, Parser)]
#[command(name = "pawfect-worker", version, about = "Pawfect Inpaint GPU worker")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inpaint one image locally with FLUX.1-Fill-dev (full frame).
    Inpaint(inpaint::InpaintArgs),
    /// Caption an image with Florence-2 and print the surface prompt it yields.
    Caption(caption::CaptionArgs),
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Inpaint(args) => inpaint::run(&args),
        Command::Caption(args) => caption::run(args),
    }
}
