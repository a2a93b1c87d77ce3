//! `patchbay gui`: the desktop app, optionally started on given prompts, model and device.

use std::path::PathBuf;

use clap::Args;

use patchbay::app::{DatasetStart, Overrides, PatchbayApp, StartOptions};
use patchbay::dataset::templates::Template;
use patchbay::model::{DeviceChoice, DtypeChoice};
use patchbay::patching::estimate::{EstimateMethod, Exact};
use patchbay::patching::{Component, Direction, Metric};
use patchbay::{Error, Result};

/// `patchbay gui`.
#[derive(Debug, Args, Default)]
pub struct GuiArgs {
    /// Load this model at start (a Hub repo id, a folder or a .gguf file) instead of the last one used.
    #[arg(long, short)]
    pub model: Option<String>,
    /// The demo model offered when the chosen one cannot be loaded (default: the fetched SmolLM2 GGUF).
    #[arg(long)]
    pub demo_model: Option<PathBuf>,
    /// Run a sweep with the current prompts as soon as the model has loaded.
    #[arg(long)]
    pub run: bool,
    /// Start with this clean prompt (else the one used last).
    #[arg(long)]
    pub clean: Option<String>,
    /// Start with this corrupted prompt.
    #[arg(long)]
    pub corrupted: Option<String>,
    /// Start with this correct answer (e.g. " John").
    #[arg(long)]
    pub correct: Option<String>,
    /// Start with this incorrect answer (e.g. " Mary").
    #[arg(long)]
    pub incorrect: Option<String>,
    /// The activation to patch.
    #[arg(long, value_enum)]
    pub component: Option<Component>,
    /// Head components: one cell per (layer, position, head).
    #[arg(long)]
    pub by_position: bool,
    /// denoising or noising.
    #[arg(long, value_enum)]
    pub direction: Option<Direction>,
    /// Put the model's BOS before both prompts where its tokenizer adds none (GPT-2).
    #[arg(long)]
    pub prepend_bos: bool,
    /// Draw an attribution-patching estimate first (atp-star, atp), or not (off).
    #[arg(long)]
    pub estimate: Option<EstimateChoice>,
    /// With an estimate: which cells are verified exactly: all, top:K or none.
    #[arg(long)]
    pub exact: Option<Exact>,
    /// Open this file of prompt pairs (JSONL or CSV) once the model has loaded (with --run: run it).
    #[arg(long, conflicts_with = "template")]
    pub pairs: Option<PathBuf>,
    /// Generate a dataset of this template once the model has loaded (with --run: run it).
    #[arg(long, value_enum)]
    pub template: Option<Template>,
    /// With --template: how many pairs.
    #[arg(long, default_value_t = 32)]
    pub n: usize,
    /// With --template: the seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The metric the heatmap shows.
    #[arg(long, value_enum)]
    pub metric: Option<Metric>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// Precision (auto: f32 on CPU, bf16 on CUDA).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeChoice>,
}

/// `--estimate`: a method, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EstimateChoice {
    AtpStar,
    Atp,
    Off,
}

/// Opens the desktop app; returns when its window closes.
pub fn run(args: GuiArgs) -> Result<()> {
    let start = StartOptions {
        model: args.model,
        demo_model: args.demo_model,
        fresh: false,
        run_on_load: args.run,
        overrides: Overrides {
            clean: args.clean,
            corrupted: args.corrupted,
            correct: args.correct,
            incorrect: args.incorrect,
            component: args.component,
            by_position: args.by_position.then_some(true),
            direction: args.direction,
            prepend_bos: args.prepend_bos.then_some(true),
            estimate: args.estimate.map(|e| match e {
                EstimateChoice::Off => None,
                EstimateChoice::Atp => Some(EstimateMethod::Atp),
                EstimateChoice::AtpStar => Some(EstimateMethod::AtpStar),
            }),
            exact: args.exact,
            metric: args.metric,
            device: args.device,
            dtype: args.dtype,
        },
        dataset: match (args.pairs, args.template) {
            (Some(path), _) => Some(DatasetStart::File(path)),
            (None, Some(template)) => Some(DatasetStart::Template {
                template,
                n: args.n,
                seed: args.seed,
            }),
            (None, None) => None,
        },
    };
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Patchbay")
            .with_app_id("patchbay")
            .with_inner_size([1400.0, 860.0])
            .with_min_inner_size([900.0, 560.0]),
        ..Default::default()
    };
    eframe::run_native(
        "Patchbay",
        options,
        Box::new(move |cc| Ok(Box::new(PatchbayApp::new(cc, start)))),
    )
    .map_err(|e| {
        Error::Device(format!(
            "cannot open the window ({e}); is a display available (DISPLAY / WAYLAND_DISPLAY)?"
        ))
    })
}
