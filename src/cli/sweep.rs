//! `patchbay sweep`: one component over every layer × position, printed as text and written as
//! JSON, CSV, NPY and figures. Ctrl-C keeps the cells computed so far.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{ModelArgs, PatchArgs, load_model};
use patchbay::dataset::templates::Template;
use patchbay::export::Shown;
use patchbay::export::data::STDOUT;
use patchbay::export::{self, Format};
use patchbay::model::ModelSource;
use patchbay::patching::estimate::{EstimateMethod, EstimateView, Exact, agreement, with_view};
use patchbay::patching::sweep::{DEFAULT_BATCH_CELLS, DEFAULT_MAX_CELLS, DEFAULT_TOP_K, MAX_TOP_K};
use patchbay::patching::{
    Axis, Metric, Progress, Schedule, Sweep, SweepEvent, SweepOptions, SweepRequest, SweepResult,
};
use patchbay::{Error, Result};

/// Datasets: a file of pairs, or a built-in template.
#[derive(Debug, Clone, Args)]
pub struct DatasetArgs {
    /// Sweep every pair of a JSONL or CSV file (fields clean, corrupted, correct, incorrect and
    /// optionally label) and show the mean over pairs.
    #[arg(long, conflicts_with_all = ["template", "clean", "corrupted", "correct", "incorrect"])]
    pub pairs: Option<PathBuf>,
    /// Generate the pairs for the model's tokenizer instead: ioi, greater-than or factual.
    #[arg(long, value_enum, conflicts_with_all = ["clean", "corrupted", "correct", "incorrect"])]
    pub template: Option<Template>,
    /// With --template: how many pairs.
    #[arg(long, default_value_t = 32, requires = "template")]
    pub n: usize,
    /// With --template: the random seed (the same seed gives the same pairs).
    #[arg(long, default_value_t = 0, requires = "template")]
    pub seed: u64,
    /// Leave flagged pairs (the model gets the clean prompt wrong, or clean and corrupted barely
    /// differ) out of the mean.
    #[arg(long)]
    pub exclude_flagged: bool,
}

/// Attribution patching: an estimate of every cell first, then exact cells by importance.
#[derive(Debug, Clone, Args)]
pub struct EstimateArgs {
    /// Estimate every cell by attribution patching first (atp: first order; atp-star: AtP*,
    /// queries and keys through the exact attention softmax), then compute exact cells largest
    /// estimated effect first. Adds an `estimate` object and a `verified` mask to the results.
    #[arg(long, value_enum)]
    pub estimate: Option<EstimateMethod>,
    /// With --estimate: which cells are computed exactly: all, top:K (the K of largest estimated
    /// effect) or none. Cells not computed are null in `values`.
    #[arg(long, default_value = "all", requires = "estimate")]
    pub exact: Exact,
    /// With --estimate: also verify this many random cells outside the top K, to bound what the
    /// estimate missed.
    #[arg(long, default_value_t = 0, requires = "estimate")]
    pub sample: usize,
}

/// `patchbay sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The clean prompt.
    #[arg(long, required_unless_present_any = ["pairs", "template"])]
    pub clean: Option<String>,
    /// The corrupted prompt (same number of tokens).
    #[arg(long, required_unless_present_any = ["pairs", "template"])]
    pub corrupted: Option<String>,
    /// The answer the clean prompt should give (one token, e.g. " John").
    #[arg(long, required_unless_present_any = ["pairs", "template"])]
    pub correct: Option<String>,
    /// The answer the corrupted prompt gives (one token, e.g. " Mary").
    #[arg(long, required_unless_present_any = ["pairs", "template"])]
    pub incorrect: Option<String>,
    #[command(flatten)]
    pub patch: PatchArgs,
    #[command(flatten)]
    pub dataset: DatasetArgs,
    /// What the text heatmap, --npy and the figures show (the JSON and CSV hold every metric).
    #[arg(long, value_enum, default_value_t = Metric::Normalized)]
    pub metric: Metric,
    /// Which slice the figures draw of a three-axis grid: the position of a --by-position head
    /// sweep (default: the last), the component of a block sweep (0 resid_pre, 1 attn_out, 2 mlp_out).
    #[arg(long)]
    pub view: Option<usize>,
    /// How cells are computed: fast (causal cones, many cells per forward) or naive (one full
    /// forward per cell, the baseline).
    #[arg(long, value_enum, default_value_t = Schedule::Fast)]
    pub schedule: Schedule,
    /// Next-token candidates kept per cell (at most 100).
    #[arg(long, default_value_t = DEFAULT_TOP_K as u64, value_parser = clap::value_parser!(u64).range(0..=MAX_TOP_K as u64))]
    pub top_k: u64,
    /// Refuse sweeps with more cells to compute than this (a long prompt differing at its first
    /// token can take hours); the refusal gives the count and an estimate.
    #[arg(long, default_value_t = DEFAULT_MAX_CELLS)]
    pub max_cells: usize,
    /// Naive schedule: cells per batched forward (1 = one forward per cell, like a notebook loop).
    #[arg(long, default_value_t = DEFAULT_BATCH_CELLS)]
    pub batch: usize,
    #[command(flatten)]
    pub estimate: EstimateArgs,
    /// With --estimate: what the text heatmap, --npy and the figures show.
    #[arg(long, value_enum, default_value_t = EstimateView::Exact)]
    pub show: EstimateView,
    /// Write the full results as JSON (`-`: standard output, the report then going to stderr).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write one CSV row per cell.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write the --metric grid as .npy (float64, the result's shape: layers × positions, layers ×
    /// heads, …).
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

impl SweepArgs {
    /// The outputs asked for, each with its format, in the order they are written.
    pub(super) fn outputs(&self) -> Vec<(&Path, Format)> {
        [
            (&self.out, Format::Json),
            (&self.csv, Format::Csv),
            (&self.npy, Format::Npy),
            (&self.png, Format::Png),
            (&self.svg, Format::Svg),
        ]
        .into_iter()
        .filter_map(|(path, format)| Some((path.as_deref()?, format)))
        .collect()
    }
}

/// Set by the first Ctrl-C (or SIGTERM) during the sweep: it stops within a layer's time and what
/// it computed is written as usual.
pub(super) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Where the command is, for what a Ctrl-C does ([`stop_on_interrupt`]).
pub(super) static PHASE: AtomicU8 = AtomicU8::new(LOADING);
const LOADING: u8 = 0;
pub(super) const SWEEPING: u8 = 1;
pub(super) const WRITING: u8 = 2;

pub fn run(args: SweepArgs) -> Result<()> {
    if args.dataset.pairs.is_some() || args.dataset.template.is_some() {
        return super::dataset::run(&args);
    }
    let text = |s: &Option<String>| s.clone().unwrap_or_default();
    let request = SweepRequest {
        clean: text(&args.clean),
        corrupted: text(&args.corrupted),
        correct: text(&args.correct),
        incorrect: text(&args.incorrect),
        component: args.patch.component,
        direction: args.patch.direction,
        by_position: args.patch.by_position,
        prepend_bos: args.patch.prepend_bos,
    };
    let options = SweepOptions {
        schedule: args.schedule,
        top_k: args.top_k as usize,
        batch_cells: args.batch,
        estimate: args.estimate.estimate,
        exact: args.estimate.exact,
        sample: args.estimate.sample,
        ..SweepOptions::default()
    };
    if args.show != EstimateView::Exact && options.estimate.is_none() {
        return Err(Error::Input(
            "--show estimate and --show difference need an estimate: add --estimate atp-star (or atp)".into(),
        ));
    }
    let outputs = args.outputs();
    let paths: Vec<&Path> = outputs.iter().map(|&(path, _)| path).collect();
    let model_files = ModelSource::parse(&args.model.model).map_or_else(|_| Vec::new(), |s| s.files());
    export::check_outputs(&paths, &model_files)?;
    // With an output on standard output (`-`), the report goes to stderr.
    let mut out: Box<dyn Write> = if paths.contains(&Path::new(STDOUT)) {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout().lock())
    };
    stop_on_interrupt();
    let model = load_model(&args.model, args.quiet)?;
    let _ = writeln!(
        out,
        "model     {} ({}, {} on {}, loaded in {:.2} s)",
        model.source.display_name(),
        model.config.summary(),
        model.dtype().as_str(),
        model.device_kind(),
        model.load_seconds
    );
    // From here on, Ctrl-C keeps what is computed.
    PHASE.store(SWEEPING, Ordering::SeqCst);
    let prepared = Sweep::prepare(&model, &request, options.top_k)?;
    print_baselines(&mut out, prepared.result());
    let estimate = prepared.estimate(&options);
    if estimate.cells > args.max_cells {
        return Err(Error::Input(format!(
            "this sweep has {} cells to compute, about {} here; --max-cells {} (or more) runs it",
            estimate.cells,
            fmt_duration(estimate.seconds),
            estimate.cells
        )));
    }
    let _ = writeln!(
        out,
        "cells     {} to compute ({} skipped as no-ops), about {}",
        estimate.cells,
        prepared.result().layout().len() - estimate.cells,
        fmt_duration(estimate.seconds)
    );
    let mut bar = CellsBar::new(prepared.result(), prepared.progress(&options), args.quiet);
    let result = prepared.run_observed(&options, &INTERRUPTED, &mut |event| bar.observe(event))?;
    bar.finish();
    PHASE.store(WRITING, Ordering::SeqCst);
    print_agreement(&mut out, &result);
    let result_shown = with_view(&result, args.show);
    let _ = write!(
        out,
        "{}",
        text_heatmap(result_shown.as_ref().unwrap_or(&result), args.metric)
    );
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
    let layout = result.layout();
    let shown = Shown {
        metric: args.metric,
        view: args
            .view
            .unwrap_or(if layout.view_count() == layout.positions {
                layout.positions - 1
            } else {
                0
            })
            .min(layout.view_count() - 1),
        auto_range: false,
    };
    let outcome = write_outputs(&result, result_shown.as_ref().unwrap_or(&result), &outputs, &shown);
    for p in &outcome.written {
        let _ = writeln!(out, "wrote     {p}");
    }
    finish(&result, outcome)
}

/// "0.8 s", "4 min", "2.1 h".
fn fmt_duration(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.1} s")
    } else if seconds < 5400.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{:.1} h", seconds / 3600.0)
    }
}

/// The estimate's cost and how far it was off on the cells verified.
fn print_agreement(out: &mut dyn Write, r: &SweepResult) {
    let (Some(e), Some(a)) = (&r.estimate, agreement(r)) else {
        return;
    };
    let num = |v: Option<f64>, digits: usize| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}"));
    let _ = writeln!(
        out,
        "estimate  {} in {:.3} s; {} of {} cells verified exactly, max |exact − estimate| {} (raw LD), \
         rank correlation {}",
        e.method.label(),
        e.seconds,
        a.verified,
        a.cells,
        num(a.max_abs_error, 4),
        num(a.rank_correlation, 3)
    );
}

/// The clean and corrupted runs, the answers and any warnings, before the cells.
fn print_baselines(out: &mut dyn Write, r: &SweepResult) {
    let top = |k: &[patchbay::patching::result::TopToken]| {
        k.first()
            .map_or_else(|| "none kept".to_owned(), |t| format!("{:?}", t.token))
    };
    let _ = writeln!(
        out,
        "clean     {} tokens, LD = {:+.4}  (top: {})",
        r.clean.token_ids.len(),
        r.clean_logit_diff,
        top(&r.clean_top_k)
    );
    let _ = writeln!(
        out,
        "corrupted {} tokens, LD = {:+.4}  (top: {})",
        r.corrupted.token_ids.len(),
        r.corrupted_logit_diff,
        top(&r.corrupted_top_k)
    );
    let _ = writeln!(
        out,
        "answers   correct {:?} = {}, incorrect {:?} = {}",
        r.correct.token, r.correct.token_id, r.incorrect.token, r.incorrect.token_id
    );
    for w in &r.warnings {
        let _ = writeln!(out, "warning   {w}");
    }
}

/// The progress bar on stderr: its length is the sweep's work (see [`Progress`]), its message the
/// cells done and an ETA from the recent rate. Where stderr is not a terminal there is no bar,
/// only a closing line with the cells done.
struct CellsBar {
    bar: Option<ProgressBar>,
    progress: Progress,
    started: Instant,
    cells: usize,
    total_cells: usize,
    quiet: bool,
}

/// The bar counts work in these steps (the work itself is fractional token-layers).
const BAR_STEPS: u64 = 10_000;

impl CellsBar {
    fn new(result: &SweepResult, progress: Progress, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(BAR_STEPS), ProgressDrawTarget::stderr_with_hz(10));
            let style = ProgressStyle::with_template("[{bar:30}] {percent:>3}%  {msg}  {elapsed_precise}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("#> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Self {
            bar,
            progress,
            started: Instant::now(),
            cells: 0,
            total_cells: result.layout().len(),
            quiet,
        }
    }

    fn observe(&mut self, event: SweepEvent<'_>) {
        let elapsed = self.started.elapsed().as_secs_f64();
        match event {
            SweepEvent::Cell(_) => self.cells += 1,
            SweepEvent::Work(work) => self.progress.work_done(work, elapsed),
            SweepEvent::Estimated(_) => {}
            SweepEvent::Planned { cells, work } => {
                // The cells the estimate left out will not come.
                self.progress.set_total(work);
                self.total_cells = cells;
            }
        }
        let Some(bar) = &self.bar else { return };
        let eta = match self.progress.eta(elapsed) {
            Some(eta) if self.cells < self.total_cells => format!("  eta {eta:.1} s"),
            _ => String::new(),
        };
        bar.set_position((self.progress.fraction() * BAR_STEPS as f64) as u64);
        bar.set_message(format!("{}/{} cells{eta}", self.cells, self.total_cells));
    }

    fn finish(self) {
        let line = format!(
            "{}/{} cells in {:.1} s",
            self.cells,
            self.total_cells,
            self.started.elapsed().as_secs_f64()
        );
        match self.bar {
            Some(bar) => bar.finish_with_message(line),
            None if !self.quiet => eprintln!("{line}"),
            None => {}
        }
    }
}

/// Ctrl-C and SIGTERM: while the model loads, quit at once (nothing is computed yet); during the
/// sweep, the first stops it keeping its cells ([`INTERRUPTED`]) and a second quits at once; while
/// the results are written, wait for them (a moment) rather than lose them.
pub(super) fn stop_on_interrupt() {
    let installed = ctrlc::set_handler(|| match PHASE.load(Ordering::SeqCst) {
        LOADING => {
            eprintln!("\ncancelled while loading the model; nothing was computed");
            std::process::exit(130);
        }
        SWEEPING if !INTERRUPTED.swap(true, Ordering::SeqCst) => eprintln!(
            "\nstopping; the cells computed so far will be written (Ctrl-C again quits at once, writing nothing)"
        ),
        SWEEPING => {
            eprintln!("\nquitting without writing the results");
            std::process::exit(130);
        }
        _ => eprintln!("\nwriting the results computed so far; they will be kept"),
    });
    if let Err(e) = installed {
        eprintln!("warning   Ctrl-C will end the sweep without writing its cells ({e})");
    }
}

/// What writing the outputs came to.
struct Written {
    /// The paths written.
    written: Vec<String>,
    /// Why the others were not, with their paths.
    failures: Vec<String>,
    json_written: bool,
}

/// Writes every output asked for, each on its own: one that fails does not stop the others.
/// Writes the outputs: the data files (JSON, CSV) from `result`, the ones that draw one metric
/// (NPY, figures) from `drawn` (the result, or its estimate or the difference, per `--show`).
fn write_outputs(result: &SweepResult, drawn: &SweepResult, outputs: &[(&Path, Format)], shown: &Shown) -> Written {
    let mut outcome = Written {
        written: Vec::new(),
        failures: Vec::new(),
        json_written: false,
    };
    for &(path, format) in outputs {
        let source = match format {
            Format::Json | Format::Csv => result,
            _ => drawn,
        };
        match export::save_as(source, path, format, shown) {
            Ok(()) => {
                outcome.json_written |= format == Format::Json;
                outcome.written.push(path.display().to_string());
            }
            Err(e) => outcome.failures.push(e.to_string()),
        }
    }
    outcome
}

/// The command's outcome: Ok for a complete sweep whose outputs were written; otherwise an error
/// saying what was kept and where, after putting the cells in the temporary folder when no JSON
/// could be written.
fn finish(result: &SweepResult, outcome: Written) -> Result<()> {
    let failed = (!outcome.failures.is_empty()).then(|| {
        let failures = outcome.failures.join("; ");
        if outcome.json_written {
            failures
        } else {
            rescue(result, failures)
        }
    });
    if result.complete {
        return failed.map_or(Ok(()), |f| Err(Error::Stopped(f)));
    }
    let t = &result.timing;
    let kept = format!(
        "{} of {} cells done ({} computed, {} skipped as no-ops){}",
        result.done_cells(),
        result.layout().len(),
        t.cells_computed,
        t.cells_skipped,
        if outcome.written.is_empty() {
            String::new()
        } else {
            format!(", written to {} (\"complete\": false)", outcome.written.join(", "))
        }
    );
    let failed = failed.map_or(String::new(), |f| format!(". {f}"));
    Err(match &result.error {
        Some(e) => Error::Stopped(format!("the sweep stopped early ({kept}): {e}{failed}")),
        None => Error::Cancelled(format!("cancelled: {kept}{failed}")),
    })
}

/// Outputs could not be written after the sweep (the disk filled up, the folder went away) and the
/// JSON was not among those written: the results go to a JSON file in the temporary folder, so the
/// computed cells are not lost. Returns `failures` saying where.
fn rescue(result: &SweepResult, failures: String) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = std::env::temp_dir().join(format!("patchbay-sweep-{stamp}-{}.json", std::process::id()));
    match export::save_as(result, &path, Format::Json, &Shown::default()) {
        Ok(()) => format!(
            "{failures}. The results are saved in {} instead (the JSON that --out writes)",
            path.display()
        ),
        Err(_) => failures,
    }
}

/// The heatmap as text, one table per view (per component of a block sweep, per position of a
/// by-position head sweep, the no-op positions left out): one row per layer, one column per
/// position or head.
pub fn text_heatmap(r: &SweepResult, metric: Metric) -> String {
    let scale = match metric {
        Metric::Normalized => "×100 (100 = clean behaviour, 0 = corrupted)",
        Metric::Prob => "×100 (probability of the correct answer, %)",
        Metric::LogitDiff => "(logit difference)",
        Metric::Logprob => "(log-probability of the correct answer)",
        Metric::Kl => "(KL(clean || patched), nats)",
        Metric::Rank => "(rank of the correct answer, 0 = top)",
    };
    let format = |v: f64| match metric {
        Metric::Normalized | Metric::Prob => format!("{:.0}", v * 100.0),
        Metric::Rank => format!("{v:.0}"),
        Metric::Kl => format!("{v:.2}"),
        Metric::LogitDiff | Metric::Logprob => format!("{v:.1}"),
    };
    let mut s = format!(
        "\n{} patching ({}), {metric} {scale}; · = skipped no-op\n",
        r.component, r.direction
    );
    let layout = r.layout();
    let width = if r.component.per_kv_head() { 12 } else { 6 };
    for slice in 0..layout.view_count() {
        let view = layout.view(slice);
        let cells: Vec<usize> = (0..view.rows)
            .flat_map(|l| (0..view.cols).map(move |c| (l, c)))
            .map(|(l, c)| layout.index(layout.view_cell(&view, l, c)))
            .collect();
        if view.fixed.is_some() && cells.iter().all(|&i| r.skipped.flat()[i]) {
            continue;
        }
        if view.fixed.is_some() {
            s.push_str(&format!("\n{}\n", r.view_title(&view)));
        }
        let labels = r.column_labels(&view);
        s.push_str("layer ");
        for (c, label) in labels.iter().enumerate().take(view.cols) {
            let name = match view.columns {
                Axis::Head => label.clone(),
                _ => c.to_string(),
            };
            s.push_str(&format!("{name:>width$}"));
        }
        s.push('\n');
        for l in 0..view.rows {
            s.push_str(&format!("{l:>5} "));
            for c in 0..view.cols {
                let i = cells[l * view.cols + c];
                let cell = match (
                    r.skipped.flat()[i],
                    r.metric_at(metric, i),
                    r.patched_logit_diff.flat()[i],
                ) {
                    (true, _, _) => "·".to_owned(),
                    (false, Some(v), _) => format(v),
                    (false, None, Some(raw)) => format!("{raw:.1}"),
                    (false, None, None) => "?".to_owned(),
                };
                s.push_str(&format!("{cell:>width$}"));
            }
            s.push('\n');
        }
    }
    s.push_str("tokens ");
    s.push_str(&r.position_labels().join(" "));
    s.push('\n');
    s
}
