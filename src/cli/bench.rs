//! `patchbay bench`: times the naive and fast schedules on one sweep, alternating, with the time to
//! the first cell, CPU time, peak memory and where the last round's time went.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clap::{Args, ValueEnum};

use super::{PatchArgs, procfs};
use patchbay::dataset::templates::Template;
use patchbay::model::{DeviceChoice, DtypeChoice, Model, ModelSource};
use patchbay::patching::estimate::EstimateMethod;
use patchbay::patching::result::{ForwardTiming, Timing};
use patchbay::patching::sweep::{DEFAULT_BATCH_CELLS, DEFAULT_TOP_K};
use patchbay::patching::{Schedule, Sweep, SweepOptions, SweepRequest, SweepResult, TokenSweepRequest};
use patchbay::{Error, Result};

/// The IOI prompts of the seed notebook, the benchmark's default sweep.
pub const IOI_CLEAN: &str = "After John and Mary went to the store, Mary gave a bottle of milk to";
/// The corrupted IOI prompt (the second name swapped).
pub const IOI_CORRUPTED: &str = "After John and Mary went to the store, John gave a bottle of milk to";
/// The benchmark's default model: the SmolLM2 GGUF that scripts/fetch-test-model.sh puts in
/// `$PATCHBAY_CACHE/models/` (default `.cache/models/`).
const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Synthetic benchmark prompts: this many tokens, differing at [`SYNTHETIC_DIFF_POSITION`].
const SYNTHETIC_PROMPT_TOKENS: usize = 16;
/// Where the synthetic clean and corrupted prompts differ (like IOI's second name).
const SYNTHETIC_DIFF_POSITION: usize = 9;
/// The bench lists a sweep's forwards one by one up to this many (the fast schedule's blocks);
/// beyond, it gives their median.
const FORWARDS_LISTED: usize = 16;

/// What the naive schedule does with the no-op cells (positions before the first differing token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NoopCells {
    /// Run a forward for them too, as a notebook loop does.
    Run,
    /// Fill them as exact zeros, as the fast schedule does.
    Skip,
}

/// `patchbay bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A Hub repo id, model folder or .gguf file (default: the SmolLM2 GGUF that
    /// scripts/fetch-test-model.sh fetches into $PATCHBAY_CACHE/models, default .cache/models).
    #[arg(long, short, conflicts_with = "synthetic")]
    pub model: Option<String>,
    /// Instead of a model file, random weights in the shape of: qwen3-0.6b, gpt2-small, pythia-160m
    /// or gemma3-270m (their published configs). Prompts are then token
    /// ids (16 tokens, differing at position 9).
    #[arg(long)]
    pub synthetic: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Precision (auto: f32 on CPU, bf16 on CUDA).
    #[arg(long, value_enum, default_value_t = DtypeChoice::Auto)]
    pub dtype: DtypeChoice,
    /// Rounds; each runs every schedule once, in the order given.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
    /// Schedules to time, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "naive,fast")]
    pub schedules: Vec<Schedule>,
    #[command(flatten)]
    pub patch: PatchArgs,
    /// Naive schedule: cells per forward (1 = one forward per cell, like a notebook loop).
    #[arg(long, default_value_t = DEFAULT_BATCH_CELLS)]
    pub batch: usize,
    /// Naive schedule: `run` a forward for the no-op cells too (positions before the first differing
    /// token), as a notebook loop does, or `skip` them as the fast schedule does. With `run` the
    /// bench also reports naive's time without them.
    #[arg(long, value_enum, default_value_t = NoopCells::Run)]
    pub naive_noops: NoopCells,
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
    /// Also time attribution patching's estimate of every cell (atp or atp-star) and compare it
    /// with the last fast round's exact cells: rank correlation, how many of the exact top 10 are
    /// in the estimate's top 20, and the first exact cell after the estimate.
    #[arg(long, value_enum)]
    pub estimate: Option<EstimateMethod>,
    /// Instead, time a dataset sweep of this template's pairs against the same pairs swept one
    /// after another as single sweeps.
    #[arg(long, value_enum, conflicts_with = "pairs")]
    pub template: Option<Template>,
    /// Instead, time a dataset sweep of this file's pairs (JSONL or CSV).
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// With --template: how many pairs.
    #[arg(long, default_value_t = 32)]
    pub n: usize,
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

/// The loaded model and how to prepare the benchmark's sweep on it.
pub(super) struct Bench<'a> {
    pub(super) args: &'a BenchArgs,
    pub(super) model: Model,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let model = Model::load(&source(&args)?, args.device, args.dtype, &mut |_| {})?;
    let bench = Bench { args: &args, model };
    if args.template.is_some() || args.pairs.is_some() {
        return super::bench_dataset::run(&bench);
    }
    bench.print_header();
    if !args.no_warmup {
        bench.warm_up()?;
    }
    let schedules = &args.schedules;
    let mut runs: Vec<Vec<BenchRun>> = schedules.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds {
        for (runs, &schedule) in runs.iter_mut().zip(schedules) {
            let run = bench.time(schedule)?;
            print_round(round, schedule, &run);
            runs.push(run);
        }
    }
    print_summary(args.rounds, schedules, &runs);
    println!("\nwhere round {}'s time went", args.rounds);
    for (schedule, rs) in schedules.iter().zip(&runs) {
        if let Some(run) = rs.last() {
            print_time_breakdown(*schedule, &run.result.timing);
        }
    }
    if let Some(method) = args.estimate {
        let exact = schedules
            .iter()
            .zip(&runs)
            .filter_map(|(_, rs)| rs.last())
            .next_back()
            .map(|run| &run.result);
        super::bench_estimate::run(&bench, method, exact)?;
    }
    Ok(())
}

/// The model to time: `--synthetic`, `--model`, or the fetched SmolLM2 GGUF.
fn source(args: &BenchArgs) -> Result<ModelSource> {
    if let Some(shape) = &args.synthetic {
        return Ok(ModelSource::Synthetic {
            shape: shape.clone(),
            seed: 0,
        });
    }
    if let Some(model) = &args.model {
        return ModelSource::parse(model);
    }
    let cache = std::env::var_os("PATCHBAY_CACHE").map_or_else(|| PathBuf::from(".cache"), PathBuf::from);
    let path = cache.join("models").join(DEFAULT_MODEL_FILE);
    if !path.is_file() {
        return Err(Error::model_file(
            "the benchmark's default model is missing: run scripts/fetch-test-model.sh from the \
             repository root, or pass --model",
            path,
        ));
    }
    Ok(ModelSource::Gguf(path))
}

impl Bench<'_> {
    fn naive_runs_noops(&self) -> bool {
        self.args.naive_noops == NoopCells::Run
    }

    pub(super) fn options(&self, schedule: Schedule) -> SweepOptions {
        SweepOptions {
            schedule,
            top_k: DEFAULT_TOP_K,
            batch_cells: self.args.batch,
            skip_noops: !self.naive_runs_noops(),
            ..SweepOptions::default()
        }
    }

    /// The sweep, baselines run: the IOI prompts (or those given), or for a synthetic model
    /// arbitrary token ids, the corrupted prompt differing at one position.
    pub(super) fn prepare(&self) -> Result<Sweep<'_>> {
        let (args, model) = (self.args, &self.model);
        if args.synthetic.is_none() {
            let request = SweepRequest {
                clean: args.clean.clone(),
                corrupted: args.corrupted.clone(),
                correct: args.correct.clone(),
                incorrect: args.incorrect.clone(),
                component: args.patch.component,
                direction: args.patch.direction,
                by_position: args.patch.by_position,
                prepend_bos: args.patch.prepend_bos,
            };
            return Sweep::prepare(model, &request, DEFAULT_TOP_K);
        }
        let vocab = model.config.vocab_size as u32;
        let clean_ids: Vec<u32> = (0..SYNTHETIC_PROMPT_TOKENS as u32)
            .map(|i| (1000 + 37 * i) % vocab)
            .collect();
        let mut corrupted_ids = clean_ids.clone();
        corrupted_ids[SYNTHETIC_DIFF_POSITION] = (clean_ids[SYNTHETIC_DIFF_POSITION] + 1) % vocab;
        let request = TokenSweepRequest {
            clean_ids,
            corrupted_ids,
            correct_id: 2000 % vocab,
            incorrect_id: 3000 % vocab,
            component: args.patch.component,
            direction: args.patch.direction,
            by_position: args.patch.by_position,
        };
        Sweep::prepare_tokens(model, &request, DEFAULT_TOP_K)
    }

    fn print_header(&self) {
        let (args, model) = (self.args, &self.model);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!("machine   {} ({threads} threads)", procfs::cpu_name());
        println!(
            "model     {} ({}, {} on {})",
            model.source.display_name(),
            model.config.summary(),
            model.dtype().as_str(),
            model.device_kind()
        );
        println!(
            "load      {:.2} s, RSS after load {}, peak {}",
            model.load_seconds,
            procfs::fmt_bytes(procfs::status_bytes("VmRSS")),
            procfs::fmt_bytes(procfs::status_bytes("VmHWM"))
        );
        println!(
            "sweep     {}{}, {}, {}; seconds = baselines + all cells (model load excluded)",
            args.patch.component,
            if args.patch.by_position { " by position" } else { "" },
            args.patch.direction,
            if args.synthetic.is_some() {
                format!("{SYNTHETIC_PROMPT_TOKENS} token ids differing at position {SYNTHETIC_DIFF_POSITION}")
            } else {
                format!("{:?} vs {:?}", args.clean, args.corrupted)
            }
        );
        println!(
            "schedules naive = one full corrupted forward per cell{}, {} row(s) per forward, no reuse; \
             fast = causal cones packed into a few forwards, no-op cells filled as exact zeros",
            if self.naive_runs_noops() {
                ", no-op cells included (a notebook loop)"
            } else {
                ", no-op cells skipped"
            },
            args.batch
        );
        if !procfs::reset_peak_rss() {
            println!("note      cannot reset the peak-RSS counter here: peaks are for the whole process so far");
        }
    }

    /// Each schedule once, untimed; the naive one only up to its first computed cell, as every
    /// later forward has the same shapes.
    fn warm_up(&self) -> Result<()> {
        let started = Instant::now();
        for &schedule in &self.args.schedules {
            let stop = AtomicBool::new(false);
            let result = self.prepare()?.run(&self.options(schedule), &stop, &mut |cell| {
                if !cell.skipped && schedule == Schedule::Naive {
                    stop.store(true, Ordering::Relaxed);
                }
            })?;
            if let Some(e) = &result.error {
                return Err(Error::Stopped(format!(
                    "the {schedule} warm-up sweep stopped early: {e}"
                )));
            }
        }
        let what: Vec<&str> = self
            .args
            .schedules
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
        Ok(())
    }

    /// One timed sweep with `schedule`.
    fn time(&self, schedule: Schedule) -> Result<BenchRun> {
        procfs::reset_peak_rss();
        let options = self.options(schedule);
        let started = Instant::now();
        let cpu_before = procfs::cpu_seconds();
        let prepared = self.prepare()?;
        let first_diff = prepared.first_diff();
        let mut first_cell = None;
        // Time spent on no-op cells that were computed (naive with `--naive-noops run`): the time
        // since the previous callback, which is that cell's own forward when there is one cell
        // per forward. With several cells per forward a block's time would land on its first
        // cell, so it is not measured then.
        let per_cell_forwards = schedule == Schedule::Naive && self.args.batch <= 1;
        let mut last_callback = Instant::now();
        let mut noop_seconds = 0.0;
        let result = prepared.run(&options, &AtomicBool::new(false), &mut |cell| {
            let now = Instant::now();
            if !cell.skipped {
                if first_cell.is_none() {
                    first_cell = Some(started.elapsed().as_secs_f64());
                }
                if per_cell_forwards && cell.at.position.is_some_and(|p| p < first_diff) {
                    noop_seconds += (now - last_callback).as_secs_f64();
                }
            }
            last_callback = now;
        })?;
        if let Some(e) = &result.error {
            return Err(Error::Stopped(format!("the {schedule} sweep stopped early: {e}")));
        }
        Ok(BenchRun {
            seconds: started.elapsed().as_secs_f64(),
            cpu_seconds: procfs::cpu_seconds()
                .zip(cpu_before)
                .map(|(after, before)| after - before),
            first_cell_seconds: first_cell,
            noop_seconds,
            peak_rss: procfs::status_bytes("VmHWM"),
            result,
        })
    }
}

fn fmt_ms(seconds: Option<f64>) -> String {
    seconds.map_or("-".to_owned(), |s| format!("{:.0} ms", s * 1000.0))
}

fn print_round(round: u64, schedule: Schedule, run: &BenchRun) {
    // The six metrics' own CPU time (beyond the softmax the top-k needs), as a share of the sweep's.
    let metrics: f64 = run.result.timing.forwards.iter().map(|f| f.metrics_seconds).sum();
    let metrics_share = run.cpu_seconds.map_or(String::new(), |cpu| {
        format!("  metrics {:.1}% of cpu", 100.0 * metrics / cpu.max(1e-9))
    });
    println!(
        "round {round}   {:<5} {:>4} cells computed, {:>4} skipped  {:>8.3} s (cpu {:>7.2} s)  first cell {:>7}  \
         peak RSS {}{metrics_share}{}",
        schedule.name(),
        run.result.timing.cells_computed,
        run.result.timing.cells_skipped,
        run.seconds,
        run.cpu_seconds.unwrap_or(f64::NAN),
        fmt_ms(run.first_cell_seconds),
        procfs::fmt_bytes(run.peak_rss),
        if run.noop_seconds > 0.0 {
            format!("  (no-op cells {:.3} s)", run.noop_seconds)
        } else {
            String::new()
        }
    );
}

/// Medians (and best rounds) per schedule, the speed-up, and the schedules' largest disagreement.
///
/// The best round shows what the code does when nothing else competes for the cores; the median,
/// what a user on a busy machine sees.
fn print_summary(rounds: u64, schedules: &[Schedule], runs: &[Vec<BenchRun>]) {
    println!("\nsummary over {rounds} rounds: median (best)");
    let mut medians = Vec::new();
    let mut noop_free = Vec::new();
    for (schedule, rs) in schedules.iter().zip(runs) {
        let seconds: Vec<f64> = rs.iter().map(|r| r.seconds).collect();
        let m = median(seconds.clone()).unwrap_or_default();
        let best = seconds.iter().copied().fold(f64::INFINITY, f64::min);
        let first = median(rs.iter().filter_map(|r| r.first_cell_seconds).collect());
        let peak = rs.iter().filter_map(|r| r.peak_rss).max();
        let cpu = median(rs.iter().filter_map(|r| r.cpu_seconds).collect()).unwrap_or(f64::NAN);
        println!(
            "  {:<5} {:>8.3} s ({:.3} s), cpu {:.2} s   first computed cell after {}   peak RSS {}",
            schedule.name(),
            m,
            best,
            cpu,
            fmt_ms(first),
            procfs::fmt_bytes(peak)
        );
        medians.push((*schedule, m, best, cpu));
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
    if let (Some(a), Some(b)) = (runs.first().and_then(|r| r.last()), runs.last().and_then(|r| r.last()))
        && schedules.len() > 1
    {
        print_gap(schedules, &a.result, &b.result);
    }
}

/// The schedules must agree cell by cell: their largest raw logit-difference gap, beside the scale.
fn print_gap(schedules: &[Schedule], a: &SweepResult, b: &SweepResult) {
    let worst = a
        .patched_logit_diff
        .flat()
        .iter()
        .zip(b.patched_logit_diff.flat())
        .filter_map(|(x, y)| Some((x.as_ref()? - y.as_ref()?).abs()))
        .fold(0.0f64, f64::max);
    let scale = b
        .clean_answer_logits
        .iter()
        .chain(&b.corrupted_answer_logits)
        .fold(0f32, |m, &x| m.max(x.abs()));
    println!(
        "  largest raw logit-difference gap between {} and {}: {worst:.2e} (clean LD {:+.4}, corrupted LD \
         {:+.4}, answer logits up to {scale:.2} in magnitude)",
        schedules[0].name(),
        schedules[schedules.len() - 1].name(),
        b.clean_logit_diff,
        b.corrupted_logit_diff
    );
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
    if forwards.len() <= FORWARDS_LISTED {
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
