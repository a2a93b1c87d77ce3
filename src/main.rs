//! `patchbay`: the desktop app, or a headless command.

use clap::Parser;
use patchbay::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        eprintln!("usage: patchbay <sweep|bench|tokenize|info> … (see patchbay --help)");
        return std::process::ExitCode::from(2);
    };
    match cli::run(command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
