//! `pawfect-operator run` and `check`: see `pawfect_operator::run::RunArgs` and `CheckArgs` for
//! the flags.

use clap::Parser;
use pawfect_operator::run::{self, Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            run::init_tracing(&args.log_level, args.log_format)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(run::run(args))
        }
        Command::Check(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run::check(args))
        }
    }
}
