//! `patchbay sweep --pairs FILE` / `--template ioi --n 32`: every pair swept, the mean over pairs
//! shown and written with each pair's own result.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::load_model;
use super::sweep::{INTERRUPTED, PHASE, SWEEPING, SweepArgs, WRITING, stop_on_interrupt, text_heatmap};
use patchbay::dataset::result::DatasetResult;
use patchbay::dataset::run::{DatasetEvent, DatasetRequest};
use patchbay::dataset::{Dataset, templates};
use patchbay::export::{self, Shown};
use patchbay::model::ModelSource;
use patchbay::patching::SweepOptions;
use patchbay::{Error, Result};

pub fn run(args: &SweepArgs) -> Result<()> {
    let outputs = args.outputs();
    let paths: Vec<&Path> = outputs.iter().map(|&(path, _)| path).collect();
    let model_files = ModelSource::parse(&args.model.model).map_or_else(|_| Vec::new(), |s| s.files());
    export::check_outputs(&paths, &model_files)?;
    if args.estimate.estimate.is_some() {
        return Err(Error::Input(
            "--estimate applies to single-pair sweeps; a dataset sweep computes every pair's cells exactly".into(),
        ));
    }
    let mut out = std::io::stdout().lock();
    stop_on_interrupt();
    let model = load_model(&args.model, args.quiet)?;
    let dataset = match (&args.dataset.pairs, args.dataset.template) {
        (Some(path), _) => Dataset::load(path)?,
        (None, Some(t)) => templates::generate(
            t,
            args.dataset.n,
            args.dataset.seed,
            &model.tokenizer,
            args.patch.prepend_bos,
        )?,
        (None, None) => return Err(Error::Internal("no dataset".into())),
    };
    let _ = writeln!(
        out,
        "model     {} ({}, loaded in {:.2} s)",
        model.source.display_name(),
        model.config.summary(),
        model.load_seconds
    );
    let _ = writeln!(out, "dataset   {}: {} pairs", dataset.name, dataset.pairs.len());
    for d in &dataset.dropped {
        let _ = writeln!(out, "dropped   {}: {}", d.what, d.why);
    }
    if let Some(names) = dataset.named_positions() {
        let _ = writeln!(out, "columns   {} (each pair's own token index)", names.join(", "));
    }
    let request = DatasetRequest {
        dataset,
        component: args.patch.component,
        direction: args.patch.direction,
        by_position: args.patch.by_position,
        prepend_bos: args.patch.prepend_bos,
    };
    let options = SweepOptions {
        schedule: args.schedule,
        top_k: args.top_k as usize,
        batch_cells: args.batch,
        ..SweepOptions::default()
    };
    PHASE.store(SWEEPING, Ordering::SeqCst);
    let pairs = request.dataset.pairs.len();
    let bar = (!args.quiet).then(|| {
        let bar = ProgressBar::with_draw_target(Some(pairs as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} pairs {msg}") {
            bar.set_style(style);
        }
        bar
    });
    let started = std::time::Instant::now();
    let mut result = patchbay::dataset::run::run(&model, &request, &options, &INTERRUPTED, &mut |event| match event {
        DatasetEvent::PairFinished { .. } | DatasetEvent::PairFailed { .. } => {
            if let Some(b) = &bar {
                b.inc(1);
            }
        }
        _ => {}
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    PHASE.store(WRITING, Ordering::SeqCst);
    result.exclude_flagged = args.dataset.exclude_flagged;
    result.aggregate();
    report(&mut out, &result, seconds);
    if let Some(mean) = result.mean_view() {
        let _ = write!(out, "mean over pairs: {}", text_heatmap(&mean, args.metric));
    }
    let mut failures = Vec::new();
    for (path, format) in outputs {
        match result.save(path, format, &shown(args)) {
            Ok(written) => {
                for p in written {
                    let _ = writeln!(out, "wrote     {}", p.display());
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    if !failures.is_empty() {
        return Err(Error::Stopped(failures.join("; ")));
    }
    if !result.complete {
        let done = result.swept().count();
        return Err(Error::Stopped(format!(
            "the dataset sweep stopped early: {done} of {pairs} pairs kept (\"complete\": false)"
        )));
    }
    Ok(())
}

/// Each pair's baselines and flags, and the aggregate's size.
fn report(out: &mut dyn Write, r: &DatasetResult, seconds: f64) {
    for (i, p) in r.pairs.iter().enumerate() {
        let label = p.pair.label.as_deref().unwrap_or("");
        let line = match (&p.result, &p.error) {
            (Some(s), _) => format!(
                "clean LD {:+.3}, corrupted LD {:+.3}{}",
                s.clean_logit_diff,
                s.corrupted_logit_diff,
                p.flagged
                    .as_ref()
                    .map_or(String::new(), |f| format!("  [flagged: {f}]"))
            ),
            (None, Some(e)) => format!("not run: {e}"),
            (None, None) => "not run (cancelled)".into(),
        };
        let _ = writeln!(out, "pair {i:>3}  {label:<28} {line}");
    }
    let flagged = r.pairs.iter().filter(|p| p.flagged.is_some()).count();
    let included = r.aggregate.as_ref().map_or(0, |a| a.pairs);
    let _ = writeln!(
        out,
        "swept     {} pairs in {seconds:.2} s; {flagged} flagged; the mean is over {included} pairs{}",
        r.swept().count(),
        if r.exclude_flagged { " (flagged left out)" } else { "" }
    );
}

fn shown(args: &SweepArgs) -> Shown {
    Shown {
        metric: args.metric,
        view: args.view.unwrap_or(0),
        auto_range: false,
    }
}
