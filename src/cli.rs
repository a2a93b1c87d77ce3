//! The headless commands: `patchbay sweep`, `patchbay tokenize`, `patchbay info`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::export::{data, figure};
use crate::model::{DEFAULT_MODEL, DeviceChoice, LoadProgress, Model, ModelSource, parse_dtype};
use crate::patching::Component;
use crate::patching::result::SweepResult;
use crate::patching::sweep::{DEFAULT_BATCH_CELLS, DEFAULT_TOP_K, Schedule, Sweep, SweepOptions, SweepRequest};

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
    /// Patch one component over every layer × position and report the normalized logit difference.
    Sweep(Box<SweepArgs>),
    /// Show how prompts and answers tokenize, with positions.
    Tokenize(TokenizeArgs),
    /// Show a model's architecture and where it was loaded from.
    Info(ModelArgs),
    /// Open the desktop app (the default when no command is given).
    Gui(GuiArgs),
}

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
}

/// Which model, on which device.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A Hugging Face repo id, a folder (config.json + *.safetensors + tokenizer.json) or a .gguf file.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
}

/// `patchbay sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The clean prompt.
    #[arg(long)]
    pub clean: String,
    /// The corrupted prompt (same number of tokens).
    #[arg(long)]
    pub corrupted: String,
    /// The answer the clean prompt should give (one token, e.g. " John").
    #[arg(long)]
    pub correct: String,
    /// The answer the corrupted prompt gives (one token, e.g. " Mary").
    #[arg(long)]
    pub incorrect: String,
    /// resid_post, resid_pre, attn_out or mlp_out.
    #[arg(long, default_value = "resid_post")]
    pub component: String,
    /// How cells are computed.
    #[arg(long, default_value = "naive")]
    pub schedule: String,
    /// Next-token candidates kept per cell.
    #[arg(long, default_value_t = DEFAULT_TOP_K)]
    pub top_k: usize,
    /// Cells per batched forward.
    #[arg(long, default_value_t = DEFAULT_BATCH_CELLS)]
    pub batch: usize,
    /// Write the full results as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write one CSV row per cell.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write the normalized matrix as .npy (layers × positions, float64).
    #[arg(long)]
    pub npy: Option<PathBuf>,
    /// Save the heatmap figure as PNG.
    #[arg(long)]
    pub png: Option<PathBuf>,
    /// Save the heatmap figure as SVG.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `patchbay tokenize`.
#[derive(Debug, Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Texts to tokenize (prompts get the model's BOS, like a sweep; use --plain for answers).
    #[arg(required = true)]
    pub texts: Vec<String>,
    /// Tokenize without special tokens, as answers are.
    #[arg(long)]
    pub plain: bool,
}

/// Loads the model named by `args`, reporting progress on stderr.
pub fn load_model(args: &ModelArgs, quiet: bool) -> Result<Model> {
    let source = ModelSource::parse(&args.model)?;
    let device = DeviceChoice::parse(&args.device)?;
    let dtype = args.dtype.as_deref().map(parse_dtype).transpose()?;
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
    Model::load(&source, device, dtype, &mut on_progress)
}

/// Runs a parsed command.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Sweep(args) => sweep(*args),
        Command::Tokenize(args) => tokenize(args),
        Command::Info(args) => info(args),
        Command::Gui(args) => gui(args),
    }
}

fn sweep(args: SweepArgs) -> Result<()> {
    let request = SweepRequest {
        clean: args.clean.clone(),
        corrupted: args.corrupted.clone(),
        correct: args.correct.clone(),
        incorrect: args.incorrect.clone(),
        component: Component::parse(&args.component)?,
    };
    let options = SweepOptions {
        schedule: Schedule::parse(&args.schedule)?,
        top_k: args.top_k,
        batch_cells: args.batch,
    };
    for p in [&args.out, &args.csv, &args.npy, &args.png, &args.svg]
        .into_iter()
        .flatten()
    {
        check_writable(p)?;
    }
    let model = load_model(&args.model, args.quiet)?;
    let out = std::io::stdout();
    let mut out = out.lock();
    let _ = writeln!(
        out,
        "model     {} ({}, {} on {}, loaded in {:.2} s)",
        model.source.display_name(),
        model.config.summary(),
        model.dtype_name(),
        model.device_name(),
        model.load_seconds
    );
    let prepared = Sweep::prepare(&model, &request, options.top_k)?;
    let r = prepared.result();
    let _ = writeln!(
        out,
        "clean     {} tokens, LD = {:+.4}  (top: {:?})",
        r.clean.token_ids.len(),
        r.clean_logit_diff,
        r.clean_top_k.first().map(|t| &t.token)
    );
    let _ = writeln!(
        out,
        "corrupted {} tokens, LD = {:+.4}  (top: {:?})",
        r.corrupted.token_ids.len(),
        r.corrupted_logit_diff,
        r.corrupted_top_k.first().map(|t| &t.token)
    );
    let _ = writeln!(
        out,
        "answers   correct {:?} = {}, incorrect {:?} = {}",
        r.correct.token, r.correct.token_id, r.incorrect.token, r.incorrect.token_id
    );
    for w in &r.warnings {
        let _ = writeln!(out, "warning   {w}");
    }
    let total = r.layers() * r.positions();
    let mut done = 0usize;
    let started = Instant::now();
    let mut last_draw = Instant::now();
    let quiet = args.quiet;
    let cancel = AtomicBool::new(false);
    let result = prepared.run(&options, &cancel, &mut |_cell| {
        done += 1;
        if !quiet && (last_draw.elapsed().as_millis() >= 100 || done == total) {
            last_draw = Instant::now();
            draw_progress(done, total, started.elapsed().as_secs_f64());
        }
    })?;
    if !quiet {
        eprintln!();
    }
    let _ = write!(out, "{}", text_heatmap(&result));
    let t = &result.timing;
    let _ = writeln!(
        out,
        "timing    {} cells computed, {} skipped, sweep {:.2} s ({} schedule), load {:.2} s",
        t.cells_computed,
        t.cells_skipped,
        t.sweep_seconds,
        t.schedule,
        t.load_seconds.unwrap_or_default()
    );
    data::save(&result, args.out.as_deref(), args.csv.as_deref(), args.npy.as_deref())?;
    for p in [&args.png, &args.svg].into_iter().flatten() {
        figure::save(&result, p, None)?;
    }
    for p in [&args.out, &args.csv, &args.npy, &args.png, &args.svg]
        .into_iter()
        .flatten()
    {
        let _ = writeln!(out, "wrote     {}", p.display());
    }
    Ok(())
}

/// Fails early, before minutes of work, when an output file cannot be created.
fn check_writable(path: &std::path::Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() {
        return Err(Error::Io {
            message: "cannot write results: the folder does not exist".into(),
            path: dir.to_owned(),
        });
    }
    Ok(())
}

fn draw_progress(done: usize, total: usize, seconds: f64) {
    const WIDTH: usize = 30;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let eta = if done > 0 {
        seconds / done as f64 * (total - done) as f64
    } else {
        0.0
    };
    eprint!(
        "\r[{}{}] {done}/{total} cells  {seconds:.1} s  eta {eta:.1} s ",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled)
    );
}

/// The heatmap as text: one row per layer, one column per position, values ×100 rounded.
pub fn text_heatmap(r: &SweepResult) -> String {
    let mut s = format!(
        "\n{} patching, normalized logit difference ×100 (100 = clean behaviour restored, 0 = none; · = skipped no-op)\n",
        r.component
    );
    s.push_str("layer ");
    for p in 0..r.positions() {
        s.push_str(&format!("{p:>5}"));
    }
    s.push('\n');
    for l in 0..r.layers() {
        s.push_str(&format!("{l:>5} "));
        for p in 0..r.positions() {
            let cell = match (r.skipped[l][p], r.values[l][p], r.patched_logit_diff[l][p]) {
                (true, _, _) => "·".to_owned(),
                (false, Some(v), _) => format!("{:.0}", v * 100.0),
                (false, None, Some(raw)) => format!("{raw:.1}"),
                (false, None, None) => "?".to_owned(),
            };
            s.push_str(&format!("{cell:>5}"));
        }
        s.push('\n');
    }
    s.push_str("tokens ");
    let labels: Vec<String> = r
        .clean
        .tokens
        .iter()
        .zip(&r.corrupted.tokens)
        .enumerate()
        .map(|(i, (c, k))| {
            if c == k {
                format!("{i}:{c:?}")
            } else {
                format!("{i}:{c:?}/{k:?}")
            }
        })
        .collect();
    s.push_str(&labels.join(" "));
    s.push('\n');
    s
}

fn tokenize(args: TokenizeArgs) -> Result<()> {
    let model = load_model(&args.model, true)?;
    for text in &args.texts {
        let ids = if args.plain {
            model.tokenizer.encode_plain(text)?
        } else {
            model.tokenizer.encode_prompt(text)?
        };
        println!("{text:?}: {} tokens", ids.len());
        for (i, id) in ids.iter().enumerate() {
            println!("  {i:>4}  {id:>7}  {:?}", model.tokenizer.token_text(*id));
        }
    }
    Ok(())
}

fn info(args: ModelArgs) -> Result<()> {
    let model = load_model(&args, false)?;
    let c = &model.config;
    println!("model          {}", model.source.display_name());
    println!("source         {:?}", model.source);
    println!("architecture   {}", c.family.hf_class());
    println!("layers         {}", c.num_layers);
    println!("hidden size    {}", c.hidden_size);
    println!(
        "heads          {} query, {} key/value, head_dim {}",
        c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!("mlp size       {}", c.intermediate_size);
    println!(
        "vocab          {} (tokenizer {})",
        c.vocab_size,
        model.tokenizer.vocab_size()
    );
    println!("rope           theta {}, scaling {:?}", c.rope_theta, c.rope_scaling);
    println!("tied embedding {}", c.tie_word_embeddings);
    println!("dtype/device   {} on {}", model.dtype_name(), model.device_name());
    println!("loaded in      {:.2} s", model.load_seconds);
    Ok(())
}

/// Opens the desktop app.
pub fn gui(args: GuiArgs) -> Result<()> {
    let start = crate::app::StartOptions {
        model: args.model,
        demo_model: args.demo_model,
        fresh: false,
        run_on_load: args.run,
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
        Box::new(move |cc| Ok(Box::new(crate::app::PatchbayApp::new(cc, start)))),
    )
    .map_err(|e| {
        Error::Device(format!(
            "cannot open the window ({e}); is a display available (DISPLAY / WAYLAND_DISPLAY)?"
        ))
    })
}
