//! `patchbay`: the desktop app, or a headless command.

use clap::Parser;
use patchbay::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    patchbay::init_process();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(cli::Command::Gui(Default::default()));
    match cli::run(command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err @ patchbay::Error::Cancelled(_)) => {
            eprintln!("{err}");
            // As a shell reports a program stopped by Ctrl-C (128 + SIGINT).
            std::process::ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
