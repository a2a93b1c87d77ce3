//! The headless commands: `patchbay sweep`, `patchbay bench`, `patchbay tokenize`, `patchbay info`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::export::{data, figure};
use crate::model::{DEFAULT_MODEL, DeviceChoice, LoadProgress, Model, ModelSource, parse_dtype};
use crate::patching::Component;
use crate::patching::result::{ForwardTiming, SweepResult, Timing};
use crate::patching::sweep::{
    DEFAULT_BATCH_CELLS, DEFAULT_TOP_K, Progress, Schedule, Sweep, SweepEvent, SweepOptions, SweepRequest,
    TokenSweepRequest,
};

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
    /// Time the naive and fast schedules on one sweep, alternating, with peak memory.
    Bench(Box<BenchArgs>),
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
    /// resid_post, resid_pre, attn_out or mlp_out.
    #[arg(long)]
    pub component: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// auto, f32, bf16 or f16.
    #[arg(long)]
    pub dtype: Option<String>,
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
    /// How cells are computed: fast (causal cones, many cells per forward) or naive (one full
    /// forward per cell, the baseline).
    #[arg(long, default_value = "fast")]
    pub schedule: String,
    /// Next-token candidates kept per cell.
    #[arg(long, default_value_t = DEFAULT_TOP_K)]
    pub top_k: usize,
    /// Naive schedule: cells per batched forward (1 = one forward per cell, like a notebook loop).
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

/// The IOI prompts of the seed notebook, the benchmark's default sweep.
pub const IOI_CLEAN: &str = "After John and Mary went to the store, Mary gave a bottle of milk to";
/// The corrupted IOI prompt (the second name swapped).
pub const IOI_CORRUPTED: &str = "After John and Mary went to the store, John gave a bottle of milk to";
/// The benchmark's default model: the SmolLM2 GGUF that scripts/fetch-test-model.sh puts in
/// `$PATCHBAY_CACHE/models/` (default `.cache/models/`).
pub const BENCH_DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Synthetic benchmark prompts: this many tokens, differing at [`SYNTHETIC_DIFF_POSITION`].
pub const SYNTHETIC_PROMPT_TOKENS: usize = 16;
/// The bench lists a sweep's forwards one by one up to this many (the fast schedule's blocks);
/// beyond, it gives their median.
const BENCH_FORWARDS_LISTED: usize = 16;

/// Where the synthetic clean and corrupted prompts differ (like IOI's second name).
pub const SYNTHETIC_DIFF_POSITION: usize = 9;

/// `patchbay bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A Hub repo id, model folder or .gguf file (default: the SmolLM2 GGUF that
    /// scripts/fetch-test-model.sh fetches into $PATCHBAY_CACHE/models, default .cache/models).
    #[arg(long, short, conflicts_with = "synthetic")]
    pub model: Option<String>,
    /// Instead of a model file, random weights in the shape of: qwen3-0.6b. Prompts are then token
    /// ids (16 tokens, differing at position 9).
    #[arg(long)]
    pub synthetic: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Rounds; each runs every schedule once, in the order given.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Schedules to time, comma-separated.
    #[arg(long, default_value = "naive,fast")]
    pub schedules: String,
    /// resid_post, resid_pre, attn_out or mlp_out.
    #[arg(long, default_value = "resid_post")]
    pub component: String,
    /// Naive schedule: cells per forward (1 = one forward per cell, like a notebook loop).
    #[arg(long, default_value_t = DEFAULT_BATCH_CELLS)]
    pub batch: usize,
    /// Naive schedule: `run` a forward for the no-op cells too (positions before the first differing
    /// token), as a notebook loop does, or `skip` them as the fast schedule does. With `run` the
    /// bench also reports naive's time without them.
    #[arg(long, default_value = "run", value_parser = ["run", "skip"])]
    pub naive_noops: String,
    /// The clean prompt (text models).
    #[arg(long, default_value = IOI_CLEAN)]
    pub clean: String,
    /// The corrupted prompt (text models).
    #[arg(long, default_value = IOI_CORRUPTED)]
    pub corrupted: String,
    /// The correct answer (text models).
    #[arg(long, default_value = " John")]
    pub correct: String,
    /// The incorrect answer (text models).
    #[arg(long, default_value = " Mary")]
    pub incorrect: String,
    /// Time from the first round on, without the untimed warm-up (a fast sweep and one naive
    /// forward) that otherwise keeps kernel loading, compilation and first-use allocations out of
    /// the numbers.
    #[arg(long)]
    pub no_warmup: bool,
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
        Command::Bench(args) => bench(*args),
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
        ..SweepOptions::default()
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
    // From here on, Ctrl-C keeps what is computed (a model still loading just quits).
    stop_on_interrupt();
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
    let mut progress = prepared.progress(&options);
    let started = Instant::now();
    let mut last_draw = Instant::now();
    let quiet = args.quiet;
    let result = prepared.run_observed(&options, &INTERRUPTED, &mut |event| {
        match event {
            SweepEvent::Cell(_) => done += 1,
            SweepEvent::Work(work) => progress.work_done(work, started.elapsed().as_secs_f64()),
        }
        if !quiet && (last_draw.elapsed().as_millis() >= 100 || done == total) {
            last_draw = Instant::now();
            draw_progress(done, total, &progress, started.elapsed().as_secs_f64());
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
    // Every output asked for, each on its own: one that fails does not stop the others.
    let mut written: Vec<String> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let write = |output: usize, p: &Path| match output {
        0 => data::save(&result, Some(p), None, None),
        1 => data::save(&result, None, Some(p), None),
        2 => data::save(&result, None, None, Some(p)),
        _ => figure::save(&result, p, None),
    };
    let mut json_written = false;
    for (i, path) in [&args.out, &args.csv, &args.npy, &args.png, &args.svg]
        .into_iter()
        .enumerate()
    {
        if let Some(p) = path {
            match write(i, p) {
                Ok(()) => {
                    json_written |= i == 0;
                    written.push(p.display().to_string());
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    for p in &written {
        let _ = writeln!(out, "wrote     {p}");
    }
    // Without the JSON the cells would be lost: they go to the temporary folder instead.
    let failed = (!failures.is_empty()).then(|| {
        let failures = failures.join("; ");
        if json_written {
            failures
        } else {
            rescue(&result, failures)
        }
    });
    if result.complete {
        return failed.map_or(Ok(()), |f| Err(Error::Stopped(f)));
    }
    let t = &result.timing;
    let kept = format!(
        "{} of {} cells done ({} computed, {} skipped as no-ops){}",
        result.done_cells(),
        result.layers() * result.positions(),
        t.cells_computed,
        t.cells_skipped,
        if written.is_empty() {
            String::new()
        } else {
            format!(", written to {} (\"complete\": false)", written.join(", "))
        }
    );
    let failed = failed.map_or(String::new(), |f| format!(". {f}"));
    Err(match &result.error {
        Some(e) => Error::Stopped(format!("the sweep stopped early ({kept}): {e}{failed}")),
        None => Error::Cancelled(format!("cancelled: {kept}{failed}")),
    })
}

/// Set by the first Ctrl-C during `patchbay sweep`: the sweep stops within a layer's time and what
/// it computed is written as usual.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ctrl-C stops a sweep without losing its cells ([`INTERRUPTED`]); a second Ctrl-C quits at once.
/// Unix only: elsewhere Ctrl-C ends the process as usual.
fn stop_on_interrupt() {
    #[cfg(unix)]
    {
        extern "C" fn on_interrupt(_: libc::c_int) {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(130) };
            }
            let msg = b"\nstopping; the cells computed so far will be written (Ctrl-C again quits at once, \
                        writing nothing)\n";
            // SAFETY: write(2) is async-signal-safe and the buffer static; errno, which it may set,
            // is put back for the code the signal interrupted.
            unsafe {
                let errno = errno_location();
                let saved = errno.as_ref().map(|e| *e);
                libc::write(2, msg.as_ptr().cast(), msg.len());
                if let (Some(e), Some(saved)) = (errno.as_mut(), saved) {
                    *e = saved;
                }
            }
        }
        // SAFETY: installs a handler that only touches an atomic and errno and calls
        // async-signal-safe functions.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
        }
    }
}

/// The calling thread's errno, where libc names it.
#[cfg(unix)]
fn errno_location() -> *mut libc::c_int {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    // SAFETY: returns a pointer to the thread's errno.
    return unsafe { libc::__errno_location() };
    #[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
    // SAFETY: returns a pointer to the thread's errno.
    return unsafe { libc::__error() };
    #[allow(unreachable_code)]
    std::ptr::null_mut()
}

/// Outputs could not be written after the sweep (the disk filled up, the folder went away) and the
/// JSON was not among those written: the results go to a JSON file in the temporary folder, so the
/// computed cells are not lost. Returns `failures` saying where.
fn rescue(result: &SweepResult, failures: String) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = std::env::temp_dir().join(format!("patchbay-sweep-{stamp}-{}.json", std::process::id()));
    match data::to_json(result).and_then(|json| data::write_atomic(&path, json.as_bytes())) {
        Ok(()) => format!(
            "{failures}. The results are saved in {} instead (the JSON that --out writes)",
            path.display()
        ),
        Err(_) => failures,
    }
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
    if path.is_dir() {
        return Err(Error::Io {
            message: "cannot write results: this is a folder; give a file name in it".into(),
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// The progress line: a bar and an ETA that follow the work done (see [`Progress`]), and the cells.
fn draw_progress(done: usize, total: usize, progress: &Progress, seconds: f64) {
    const WIDTH: usize = 30;
    let filled = if done == total {
        WIDTH
    } else {
        ((progress.fraction() * WIDTH as f64) as usize).min(WIDTH)
    };
    let eta = match progress.eta(seconds) {
        Some(eta) if done < total => format!("  eta {eta:.1} s"),
        _ => String::new(),
    };
    eprint!(
        "\r[{}{}] {done}/{total} cells  {seconds:.1} s{eta}   ",
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

/// One timed sweep of the benchmark.
struct BenchRun {
    seconds: f64,
    /// CPU seconds of the whole process (all threads) during the run.
    cpu_seconds: Option<f64>,
    first_cell_seconds: Option<f64>,
    /// Seconds spent computing no-op cells (naive schedule running them, as a notebook does).
    noop_seconds: f64,
    peak_rss: Option<u64>,
    result: SweepResult,
}

fn bench(args: BenchArgs) -> Result<()> {
    let schedules = args
        .schedules
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Schedule::parse)
        .collect::<Result<Vec<_>>>()?;
    if schedules.is_empty() || args.rounds == 0 {
        return Err(Error::Input("give at least one schedule and one round".into()));
    }
    let component = Component::parse(&args.component)?;
    let source = match &args.synthetic {
        Some(shape) => ModelSource::Synthetic {
            shape: shape.clone(),
            seed: 0,
        },
        None => match &args.model {
            Some(model) => ModelSource::parse(model)?,
            None => {
                let cache = std::env::var_os("PATCHBAY_CACHE").map_or_else(|| PathBuf::from(".cache"), PathBuf::from);
                let path = cache.join("models").join(BENCH_DEFAULT_MODEL_FILE);
                if !path.is_file() {
                    return Err(Error::model_file(
                        "the benchmark's default model is missing: run scripts/fetch-test-model.sh from the \
                         repository root, or pass --model",
                        path,
                    ));
                }
                ModelSource::Gguf(path)
            }
        },
    };
    let device = DeviceChoice::parse(&args.device)?;
    let dtype = args.dtype.as_deref().map(parse_dtype).transpose()?;
    let model = Model::load(&source, device, dtype, &mut |_| {})?;
    let vocab = model.config.vocab_size as u32;
    // Synthetic prompts: arbitrary ids, the corrupted one differing at one position.
    let synthetic_request = |component| {
        let clean_ids: Vec<u32> = (0..SYNTHETIC_PROMPT_TOKENS as u32)
            .map(|i| (1000 + 37 * i) % vocab)
            .collect();
        let mut corrupted_ids = clean_ids.clone();
        corrupted_ids[SYNTHETIC_DIFF_POSITION] = (clean_ids[SYNTHETIC_DIFF_POSITION] + 1) % vocab;
        TokenSweepRequest {
            clean_ids,
            corrupted_ids,
            correct_id: 2000 % vocab,
            incorrect_id: 3000 % vocab,
            component,
        }
    };
    let text_request = SweepRequest {
        clean: args.clean.clone(),
        corrupted: args.corrupted.clone(),
        correct: args.correct.clone(),
        incorrect: args.incorrect.clone(),
        component,
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("machine   {} ({threads} threads)", cpu_name());
    println!(
        "model     {} ({}, {} on {})",
        model.source.display_name(),
        model.config.summary(),
        model.dtype_name(),
        model.device_name()
    );
    println!(
        "load      {:.2} s, RSS after load {}, peak {}",
        model.load_seconds,
        fmt_bytes(proc_status_bytes("VmRSS")),
        fmt_bytes(proc_status_bytes("VmHWM"))
    );
    println!(
        "sweep     {component}, {}; seconds = baselines + all cells (model load excluded)",
        if args.synthetic.is_some() {
            format!("{SYNTHETIC_PROMPT_TOKENS} token ids differing at position {SYNTHETIC_DIFF_POSITION}")
        } else {
            format!("{:?} vs {:?}", args.clean, args.corrupted)
        }
    );
    let naive_runs_noops = args.naive_noops == "run";
    println!(
        "schedules naive = one full corrupted forward per cell{}, {} row(s) per forward, no reuse; \
         fast = causal cones packed into a few forwards, no-op cells filled as exact zeros",
        if naive_runs_noops {
            ", no-op cells included (a notebook loop)"
        } else {
            ", no-op cells skipped"
        },
        args.batch
    );
    let peak_resets = reset_peak_rss();
    if !peak_resets {
        println!("note      cannot reset the peak-RSS counter here: peaks are for the whole process so far");
    }

    let options = |schedule| SweepOptions {
        schedule,
        top_k: DEFAULT_TOP_K,
        batch_cells: args.batch,
        skip_noops: !naive_runs_noops,
    };
    let prepare = || match &args.synthetic {
        Some(_) => Sweep::prepare_tokens(&model, &synthetic_request(component), DEFAULT_TOP_K),
        None => Sweep::prepare(&model, &text_request, DEFAULT_TOP_K),
    };
    if !args.no_warmup {
        // Each schedule once, untimed; the naive one only up to its first computed cell, as every
        // later forward has the same shapes.
        let started = Instant::now();
        for &schedule in &schedules {
            let stop = AtomicBool::new(false);
            let result = prepare()?.run(&options(schedule), &stop, &mut |cell| {
                if !cell.skipped && schedule == Schedule::Naive {
                    stop.store(true, Ordering::Relaxed);
                }
            })?;
            if let Some(e) = &result.error {
                return Err(Error::Stopped(format!(
                    "the {} warm-up sweep stopped early: {e}",
                    schedule.name()
                )));
            }
        }
        let what: Vec<&str> = schedules
            .iter()
            .map(|s| match s {
                Schedule::Fast => "a fast sweep",
                Schedule::Naive => "one naive forward",
            })
            .collect();
        println!(
            "warm-up   {:.2} s, untimed ({}): kernel loading, compilation and first-use allocations stay \
             out of the rounds",
            started.elapsed().as_secs_f64(),
            what.join(", ")
        );
    }

    let mut runs: Vec<Vec<BenchRun>> = schedules.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds {
        for (si, &schedule) in schedules.iter().enumerate() {
            reset_peak_rss();
            let options = options(schedule);
            let started = Instant::now();
            let cpu_before = process_cpu_seconds();
            let prepared = prepare()?;
            let first_diff = prepared.first_diff();
            let mut first_cell = None;
            // Time spent on no-op cells that were computed (naive with `--naive-noops run`): the time
            // since the previous callback, which is that cell's own forward when there is one cell
            // per forward. With several cells per forward a block's time would land on its first
            // cell, so it is not measured then.
            let per_cell_forwards = schedule == Schedule::Naive && args.batch <= 1;
            let mut last_callback = Instant::now();
            let mut noop_seconds = 0.0;
            let result = prepared.run(&options, &AtomicBool::new(false), &mut |cell| {
                let now = Instant::now();
                if !cell.skipped {
                    if first_cell.is_none() {
                        first_cell = Some(started.elapsed().as_secs_f64());
                    }
                    if per_cell_forwards && cell.position < first_diff {
                        noop_seconds += (now - last_callback).as_secs_f64();
                    }
                }
                last_callback = now;
            })?;
            if let Some(e) = &result.error {
                return Err(Error::Stopped(format!(
                    "the {} sweep stopped early: {e}",
                    schedule.name()
                )));
            }
            let run = BenchRun {
                seconds: started.elapsed().as_secs_f64(),
                cpu_seconds: process_cpu_seconds()
                    .zip(cpu_before)
                    .map(|(after, before)| after - before),
                first_cell_seconds: first_cell,
                noop_seconds,
                peak_rss: proc_status_bytes("VmHWM"),
                result,
            };
            println!(
                "round {round}   {:<5} {:>4} cells computed, {:>4} skipped  {:>8.3} s (cpu {:>7.2} s)  first cell {:>7}  \
                 peak RSS {}{}",
                schedule.name(),
                run.result.timing.cells_computed,
                run.result.timing.cells_skipped,
                run.seconds,
                run.cpu_seconds.unwrap_or(f64::NAN),
                run.first_cell_seconds
                    .map_or("-".to_owned(), |s| format!("{:.0} ms", s * 1000.0)),
                fmt_bytes(run.peak_rss),
                if run.noop_seconds > 0.0 {
                    format!("  (no-op cells {:.3} s)", run.noop_seconds)
                } else {
                    String::new()
                }
            );
            runs[si].push(run);
        }
    }

    // The best round shows what the code does when nothing else competes for the cores; the
    // median, what a user on a busy machine sees.
    println!("\nsummary over {} rounds: median (best)", args.rounds);
    let mut medians = Vec::new();
    let mut noop_free = Vec::new();
    for (schedule, rs) in schedules.iter().zip(&runs) {
        let seconds: Vec<f64> = rs.iter().map(|r| r.seconds).collect();
        let m = median(seconds.clone()).unwrap_or_default();
        let best = seconds.iter().copied().fold(f64::INFINITY, f64::min);
        let first = median(rs.iter().filter_map(|r| r.first_cell_seconds).collect());
        let peak = rs.iter().filter_map(|r| r.peak_rss).max();
        let cpu = median(rs.iter().filter_map(|r| r.cpu_seconds).collect());
        println!(
            "  {:<5} {:>8.3} s ({:.3} s), cpu {:.2} s   first computed cell after {}   peak RSS {}",
            schedule.name(),
            m,
            best,
            cpu.unwrap_or(f64::NAN),
            first.map_or("-".to_owned(), |s| format!("{:.0} ms", s * 1000.0)),
            fmt_bytes(peak)
        );
        medians.push((*schedule, m, best, cpu.unwrap_or(f64::NAN)));
        let without_noops = median(rs.iter().map(|r| r.seconds - r.noop_seconds).collect()).unwrap_or_default();
        if rs.iter().any(|r| r.noop_seconds > 0.0) {
            println!(
                "  {:<5} {without_noops:>8.3} s without the no-op cells' forwards",
                schedule.name()
            );
            noop_free.push((*schedule, without_noops));
        }
    }
    let find = |s: Schedule| medians.iter().find(|(x, ..)| *x == s).map(|&(_, m, b, c)| (m, b, c));
    if let (Some((naive, naive_best, naive_cpu)), Some((fast, fast_best, fast_cpu))) =
        (find(Schedule::Naive), find(Schedule::Fast))
    {
        println!(
            "  speed-up naive / fast = {:.1}x (best rounds: {:.1}x; cpu time: {:.1}x)",
            naive / fast,
            naive_best / fast_best,
            naive_cpu / fast_cpu
        );
        if let Some(&(_, naive_free)) = noop_free.iter().find(|(s, _)| *s == Schedule::Naive) {
            println!(
                "  speed-up with naive's no-op cells left out = {:.1}x (the cone reuse and packing alone)",
                naive_free / fast
            );
        }
    }
    // The schedules must agree cell by cell.
    if let (Some(a), Some(b)) = (runs.first().and_then(|r| r.last()), runs.last().and_then(|r| r.last()))
        && schedules.len() > 1
    {
        let worst = a
            .result
            .patched_logit_diff
            .iter()
            .flatten()
            .zip(b.result.patched_logit_diff.iter().flatten())
            .filter_map(|(x, y)| Some((x.as_ref()? - y.as_ref()?).abs()))
            .fold(0.0f64, f64::max);
        let r = &b.result;
        let scale = r
            .clean_answer_logits
            .iter()
            .chain(&r.corrupted_answer_logits)
            .fold(0f32, |m, &x| m.max(x.abs()));
        println!(
            "  largest raw logit-difference gap between {} and {}: {worst:.2e} (clean LD {:+.4}, corrupted LD \
             {:+.4}, answer logits up to {scale:.2} in magnitude)",
            schedules[0].name(),
            schedules[schedules.len() - 1].name(),
            r.clean_logit_diff,
            r.corrupted_logit_diff
        );
    }
    println!("\nwhere round {}'s time went", args.rounds);
    for (schedule, rs) in schedules.iter().zip(&runs) {
        if let Some(run) = rs.last() {
            print_time_breakdown(*schedule, &run.result.timing);
        }
    }
    Ok(())
}

/// The bench's account of one sweep's time: baselines, each forward (the fast schedule's few) or
/// their median (the naive one's many), the cells' softmax and top-k on the CPU, and the rest.
fn print_time_breakdown(schedule: Schedule, timing: &Timing) {
    let forwards = &timing.forwards;
    let forward_total: f64 = forwards.iter().map(|f| f.forward_seconds).sum();
    let cells_total: f64 = forwards.iter().map(|f| f.cells_seconds).sum();
    let other = timing.sweep_seconds - timing.baseline_seconds - forward_total - cells_total;
    println!(
        "  {:<5} baselines {:.3} s, {} forwards {:.3} s, cells' softmax and top-k {:.3} s, other {:.3} s",
        schedule.name(),
        timing.baseline_seconds,
        forwards.len(),
        forward_total,
        cells_total,
        other
    );
    let rate = |f: &ForwardTiming| f.token_layers as f64 / f.forward_seconds.max(1e-9);
    if forwards.len() <= BENCH_FORWARDS_LISTED {
        for f in forwards {
            println!(
                "        {:>4} cells, {:>7} token-layers: {:>8.1} ms ({:.0} token-layers/s), cells {:.1} ms",
                f.cells,
                f.token_layers,
                f.forward_seconds * 1000.0,
                rate(f),
                f.cells_seconds * 1000.0
            );
        }
    } else if let Some(each) = median(forwards.iter().map(|f| f.forward_seconds).collect()) {
        let token_layers = median(forwards.iter().map(|f| f.token_layers as f64).collect()).unwrap_or_default();
        println!(
            "        median forward {:.1} ms for {token_layers:.0} token-layers ({:.0} token-layers/s)",
            each * 1000.0,
            token_layers / each.max(1e-9)
        );
    }
}

/// The median (the mean of the middle two for an even count); None for no values.
fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(xs[n / 2]),
        _ => Some((xs[n / 2 - 1] + xs[n / 2]) / 2.0),
    }
}

/// A `/proc/self/status` field in bytes (`VmRSS`, `VmHWM` = peak RSS); None off Linux.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kb: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// CPU seconds (user + system, every thread) this process has used, from /proc/self/stat; None off
/// Linux. Less disturbed than wall time when other work shares the cores.
fn process_cpu_seconds() -> Option<f64> {
    /// Linux reports these in USER_HZ ticks, 100 per second on every mainstream configuration.
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is the 3rd field, utime the 14th, stime the 15th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / TICKS_PER_SECOND)
}

/// Resets the peak-RSS counter (`VmHWM`) so the next reading covers only what follows.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn fmt_bytes(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".to_owned(), |b| format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0)))
}

/// The CPU's model name from /proc/cpuinfo, when there is one.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
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
    // Refused here, before a window opens.
    let dtype = match args.dtype.as_deref().map(str::trim) {
        None => None,
        Some(d) if d.eq_ignore_ascii_case("auto") => Some("auto".to_owned()),
        Some(d) => Some(
            match parse_dtype(d)? {
                candle_core::DType::F32 => "f32",
                candle_core::DType::F16 => "f16",
                _ => "bf16",
            }
            .to_owned(),
        ),
    };
    let overrides = crate::app::Overrides {
        clean: args.clean,
        corrupted: args.corrupted,
        correct: args.correct,
        incorrect: args.incorrect,
        component: args.component.as_deref().map(Component::parse).transpose()?,
        device: args.device.as_deref().map(DeviceChoice::parse).transpose()?,
        dtype,
    };
    let start = crate::app::StartOptions {
        model: args.model,
        demo_model: args.demo_model,
        fresh: false,
        run_on_load: args.run,
        overrides,
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
