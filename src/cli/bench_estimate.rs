//! `patchbay bench --estimate`: what attribution patching's estimate of every cell costs, in
//! seconds and in forwards of the target prompt, and how well it finds the cells the exact sweep
//! says matter.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::bench::Bench;
use patchbay::Result;
use patchbay::model::NoHooks;
use patchbay::patching::estimate::{EstimateMethod, Exact, spearman, top_overlap};
use patchbay::patching::{Schedule, SweepEvent, SweepOptions, SweepResult};

/// Rounds the estimate is timed over (it is quick).
const ROUNDS: usize = 5;

/// Times `method`'s estimate, compares it with `exact` (the last fast round's cells, when there
/// was one), and times a sweep that draws the estimate first to its first exact cell.
pub(super) fn run(bench: &Bench, method: EstimateMethod, exact: Option<&SweepResult>) -> Result<()> {
    println!("\nattribution patching ({})", method.label());
    let t = &bench.model.transformer;
    let sweep = bench.prepare()?;
    let target: Vec<u32> = match sweep.result().direction {
        patchbay::patching::Direction::Denoising => sweep.result().corrupted.token_ids.clone(),
        patchbay::patching::Direction::Noising => sweep.result().clean.token_ids.clone(),
    };
    // One plain forward of the target prompt: the unit the issue counts the estimate in. Timed
    // alternately with the estimate, medians of each, so load on the cores weighs on both alike.
    let (mut forwards, mut seconds) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
    let mut estimate = None;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        t.forward(t.embed(&[&target])?, Default::default(), &mut NoHooks)?;
        forwards.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        estimate = Some(sweep.attribution(method)?);
        seconds.push(started.elapsed().as_secs_f64());
    }
    forwards.sort_by(f64::total_cmp);
    let forward = forwards[ROUNDS / 2];
    seconds.sort_by(f64::total_cmp);
    let median = seconds[ROUNDS / 2];
    println!(
        "  estimate of all {} cells: {:.3} s median of {ROUNDS} ({:.3} s best) = {:.1} forwards of the target \
         prompt ({:.1} ms each, median, timed alternately)",
        sweep.result().layout().len(),
        median,
        seconds[0],
        median / forward,
        forward * 1e3
    );
    if let (Some(estimate), Some(exact)) = (&estimate, exact) {
        let target_ld = sweep.target_logit_diff();
        let computed: Vec<usize> = (0..exact.skipped.flat().len())
            .filter(|&i| !exact.skipped.flat()[i] && exact.patched_logit_diff.flat()[i].is_some())
            .collect();
        let pick = |v: &[Option<f64>]| -> Vec<f64> { computed.iter().filter_map(|&i| v[i]).collect() };
        let (x, e) = (pick(exact.patched_logit_diff.flat()), pick(estimate.logit_diff.flat()));
        let max_error = x.iter().zip(&e).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        println!(
            "  against the exact cells ({} computed): rank correlation {}, exact top 10 in the estimate's top 20: \
             {}/10, max |exact − estimate| {max_error:.3} (raw LD)",
            computed.len(),
            spearman(&x, &e).map_or_else(|| "n/a".into(), |r| format!("{r:.3}")),
            top_overlap(
                exact.patched_logit_diff.flat(),
                estimate.logit_diff.flat(),
                target_ld,
                10,
                20
            ),
        );
    }
    // A sweep that draws the estimate first: when it arrives, and the first exact cell after it.
    let options = SweepOptions {
        estimate: Some(method),
        exact: Exact::All,
        ..bench.options(Schedule::Fast)
    };
    let started = Instant::now();
    let sweep = bench.prepare()?;
    let last_layer = sweep.result().layout().layers - 1;
    let (mut estimated, mut first_exact) = (None, None);
    // The last layer's cells come with the baselines: the first exact cell is the first a forward
    // computed.
    sweep.run_observed(&options, &AtomicBool::new(false), &mut |event| match event {
        SweepEvent::Estimated(_) => estimated = Some(started.elapsed().as_secs_f64()),
        SweepEvent::Cell(c) if !c.skipped && c.at.layer != last_layer && first_exact.is_none() => {
            first_exact = Some(started.elapsed().as_secs_f64());
        }
        _ => {}
    })?;
    let ms = |s: Option<f64>| s.map_or_else(|| "n/a".into(), |s| format!("{:.0} ms", s * 1e3));
    println!(
        "  sweep with the estimate first: estimate drawn after {} (baselines included), first cell computed by a \
         forward after {}, all cells after {:.3} s",
        ms(estimated),
        ms(first_exact),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
