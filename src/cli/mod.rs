//! The command line: `patchbay gui | sweep | bench | tokenize | info`, one file per command.

mod bench;
mod bench_dataset;
mod bench_estimate;
mod dataset;
#[cfg(feature = "gui")]
mod gui;
mod info;
mod procfs;
mod sweep;
mod tokenize;

use std::time::Instant;

use clap::{Args, Parser, Subcommand};

use patchbay::Result;
use patchbay::model::{DEFAULT_MODEL, DeviceChoice, DtypeChoice, LoadProgress, Model, ModelSource};
use patchbay::patching::{Component, Direction};

/// Activation patching on language models.
#[derive(Debug, Parser)]
#[command(name = "patchbay", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What to run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Patch one component (residual stream, block outputs or attention heads) over every layer ×
    /// position (× head), denoising or noising, and report six metrics per cell: for one prompt
    /// pair (optionally estimated first by attribution patching), or averaged over a dataset of
    /// pairs (--pairs, --template).
    Sweep(Box<sweep::SweepArgs>),
    /// Time the naive and fast schedules on one sweep, alternating, with peak memory (and the
    /// attribution estimate with --estimate, or a dataset with --template/--pairs).
    Bench(Box<bench::BenchArgs>),
    /// Show how prompts and answers tokenize, with positions.
    Tokenize(tokenize::TokenizeArgs),
    /// Show a model's architecture and where it was loaded from.
    Info(ModelArgs),
    /// Open the desktop app (the default when no command is given).
    #[cfg(feature = "gui")]
    Gui(Box<gui::GuiArgs>),
}

/// Which model, on which device.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A Hugging Face repo id, a folder (config.json + *.safetensors + tokenizer.json) or a .gguf file.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Precision (auto: f32 on CPU, bf16 on CUDA).
    #[arg(long, value_enum, default_value_t = DtypeChoice::Auto)]
    pub dtype: DtypeChoice,
}

/// What to patch and in which direction: shared by `sweep` and `bench`.
#[derive(Debug, Args)]
pub struct PatchArgs {
    /// The activation to patch.
    #[arg(long, value_enum, default_value_t = Component::ResidPost)]
    pub component: Component,
    /// Head components: one cell per (layer, position, head) rather than per (layer, head).
    #[arg(long)]
    pub by_position: bool,
    /// denoising: clean activations into the corrupted run (is the component sufficient?);
    /// noising: corrupted activations into the clean run (is it necessary?).
    #[arg(long, value_enum, default_value_t = Direction::Denoising)]
    pub direction: Direction,
    /// Put the model's BOS token before both prompts where its tokenizer adds none (GPT-2's adds
    /// none; TransformerLens prepends one by default). Recorded in the results.
    #[arg(long)]
    pub prepend_bos: bool,
}

/// Runs a parsed command; no command opens the app (or, built without it, prints the help).
pub fn run(command: Option<Command>) -> Result<()> {
    match command {
        Some(Command::Sweep(args)) => sweep::run(*args),
        Some(Command::Bench(args)) => bench::run(*args),
        Some(Command::Tokenize(args)) => tokenize::run(args),
        Some(Command::Info(args)) => info::run(args),
        #[cfg(feature = "gui")]
        Some(Command::Gui(args)) => gui::run(*args),
        #[cfg(feature = "gui")]
        None => gui::run(gui::GuiArgs::default()),
        #[cfg(not(feature = "gui"))]
        None => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            Ok(())
        }
    }
}

/// Loads the model named by `args`, reporting progress on stderr unless `quiet`.
pub fn load_model(args: &ModelArgs, quiet: bool) -> Result<Model> {
    let source = ModelSource::parse(&args.model)?;
    let mut last_report = Instant::now();
    let mut on_progress = |p: LoadProgress| {
        if quiet {
            return;
        }
        match p {
            LoadProgress::Download(d) => {
                if last_report.elapsed().as_millis() >= 200 || d.downloaded == d.total {
                    last_report = Instant::now();
                    eprint!(
                        "\rdownloading {}: {:.1}/{:.1} MB   ",
                        d.file,
                        d.downloaded as f64 / 1e6,
                        d.total as f64 / 1e6
                    );
                    if d.downloaded == d.total {
                        eprintln!();
                    }
                }
            }
            LoadProgress::Stage(s) => eprintln!("{s} ..."),
        }
    };
    Model::load(&source, args.device, args.dtype, &mut on_progress)
}
