//! `patchbay bench --template ioi --n 32` (or `--pairs FILE`): a dataset sweep against the same
//! pairs swept one after another as single sweeps, side by side, with peak memory.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::bench::Bench;
use super::procfs;
use patchbay::dataset::run::{DatasetRequest, run as run_dataset};
use patchbay::dataset::{Dataset, templates};
use patchbay::patching::{Schedule, Sweep};
use patchbay::{Error, Result};

pub(super) fn run(bench: &Bench) -> Result<()> {
    let args = bench.args;
    let model = &bench.model;
    let dataset = match (&args.pairs, args.template) {
        (Some(path), _) => Dataset::load(path)?,
        (None, Some(t)) => templates::generate(t, args.n, 0, &model.tokenizer, args.patch.prepend_bos)?,
        (None, None) => return Err(Error::Internal("no dataset".into())),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "model     {} ({}), {} threads",
        model.source.display_name(),
        model.config.summary(),
        threads
    );
    println!(
        "dataset   {}: {} pairs, {} sweep, fast schedule",
        dataset.name,
        dataset.pairs.len(),
        args.patch.component
    );
    let request = DatasetRequest {
        dataset,
        component: args.patch.component,
        direction: args.patch.direction,
        by_position: args.patch.by_position,
        prepend_bos: args.patch.prepend_bos,
    };
    let options = bench.options(Schedule::Fast);
    // Untimed warm-up: one pair.
    if let Some(first) = request.pair_request(0) {
        Sweep::prepare(model, &first, options.top_k)?.run(&options, &AtomicBool::new(false), &mut |_| {})?;
    }
    for round in 1..=args.rounds {
        procfs::reset_peak_rss();
        let started = Instant::now();
        let result = run_dataset(model, &request, &options, &AtomicBool::new(false), &mut |_| {})?;
        let dataset_seconds = started.elapsed().as_secs_f64();
        let dataset_rss = procfs::status_bytes("VmHWM");
        procfs::reset_peak_rss();
        let started = Instant::now();
        let mut singles = 0;
        for i in 0..request.dataset.pairs.len() {
            let Some(pair) = request.pair_request(i) else { continue };
            if let Ok(sweep) = Sweep::prepare(model, &pair, options.top_k) {
                sweep.run(&options, &AtomicBool::new(false), &mut |_| {})?;
                singles += 1;
            }
        }
        let single_seconds = started.elapsed().as_secs_f64();
        let single_rss = procfs::status_bytes("VmHWM");
        let mib = |b: Option<u64>| b.map_or_else(|| "n/a".into(), |b| format!("{} MiB", b >> 20));
        println!(
            "round {round}   dataset sweep {:>3} pairs {dataset_seconds:>7.2} s (peak RSS {})   {singles} single sweeps \
             one after another {single_seconds:>7.2} s (peak RSS {})",
            result.swept().count(),
            mib(dataset_rss),
            mib(single_rss)
        );
    }
    Ok(())
}
