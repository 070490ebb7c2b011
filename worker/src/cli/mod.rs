//! The `pawfect-worker` command line. Each subcommand lives in its own module.

use clap::{Parser, Subcommand};

pub mod caption;
pub mod fetch;
pub mod inpaint;
pub mod models;
pub mod serve;

#[derive(Debug, Parser)]
#[command(name = "pawfect-worker", version, about = "Pawfect Inpaint GPU worker")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inpaint one photo locally: the stages of `serve` (or --full-frame: diffusers' path).
    Inpaint(Box<inpaint::InpaintArgs>),
    /// Caption an image with Florence-2 and print the surface prompt it yields.
    Caption(caption::CaptionArgs),
    /// Take inpainting jobs from the queue and run them, one at a time.
    Serve(Box<serve::ServeArgs>),
    /// Download the models for a variant from the Hugging Face Hub into a models directory
    /// (or, with --check, verify one offline).
    FetchModels(fetch::FetchArgs),
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Serve(args) = cli.command {
        // `serve` installs its signal handlers before anything else, logging included.
        return serve::main(*args);
    }
    serve::init_tracing(serve::LogFormat::Text);
    match cli.command {
        Command::Inpaint(args) => inpaint::run(&args),
        Command::Caption(args) => caption::run(args),
        Command::Serve(args) => serve::main(*args),
        Command::FetchModels(args) => fetch::run(&args),
    }
}
