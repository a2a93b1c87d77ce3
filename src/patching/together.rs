//! Several prepared sweeps of one model run together on the fast schedule (a dataset's pairs):
//! their cells are packed into shared forwards, each cell's cone attending to its own target
//! run's cached keys and values ([`Transformer::forward_cones_over`]), so short prompts fill the
//! large, efficient blocks one pair's cells cannot.
//!
//! [`Transformer::forward_cones_over`]: crate::model::Transformer::forward_cones_over

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor};

use super::layout::CellAt;
use super::logits::logits_rows;
use super::result::ForwardTiming;
use super::schedule::{Schedule, block_bounds};
use super::sweep::{Sweep, SweepOptions};
use super::{SweepEvent, SweepResult};
use crate::error::{Error, Result};
use crate::model::LayerKv;

/// Whether `sweeps` can share forwards with `options`: the fast schedule, no estimate, and
/// residual-stream components (head cells recompute their layer's attention per run).
fn packable(sweeps: &[Sweep<'_>], options: &SweepOptions) -> bool {
    options.schedule == Schedule::Fast
        && options.estimate.is_none()
        && sweeps.iter().all(|s| !s.layout.component.has_heads())
}

/// Runs `sweeps` (prepared on one model) to the end, reporting each one's events to
/// `observe(index, event)`, and returns their results in order. Where packing does not apply
/// ([`packable`]) they run one after another. A cancel stops within the forward in flight; every
/// cell finished before it is kept, and the results say they are incomplete.
pub fn run_together(
    mut sweeps: Vec<Sweep<'_>>,
    options: &SweepOptions,
    cancel: &AtomicBool,
    observe: &mut dyn FnMut(usize, SweepEvent<'_>),
) -> Result<Vec<SweepResult>> {
    if !packable(&sweeps, options) {
        let mut out = Vec::with_capacity(sweeps.len());
        for (i, s) in sweeps.into_iter().enumerate() {
            out.push(s.run_observed(options, cancel, &mut |e| observe(i, e))?);
        }
        return Ok(out);
    }
    let Some(first) = sweeps.first() else {
        return Ok(Vec::new());
    };
    let model = first.model;
    let t = &model.transformer;
    let start = Instant::now();
    // Each sweep's free cells (no-ops, the last layer's), then its blocks as it would run them.
    let mut starts = Vec::with_capacity(sweeps.len());
    let mut blocks = Vec::with_capacity(sweeps.len());
    for (i, s) in sweeps.iter_mut().enumerate() {
        let (noops, mut cells): (Vec<CellAt>, Vec<CellAt>) = s.layout.cells().partition(|&at| s.is_noop(at));
        s.emit_noops(&noops, &mut |e| observe(i, e));
        let last = s.layout.layers - 1;
        if s.emit_last_layer(options.top_k, &mut |e| observe(i, e)) {
            cells.retain(|at| at.layer != last);
        }
        starts.push(if cells.is_empty() { Vec::new() } else { s.cone_starts()? });
        blocks.push(s.fast_blocks(cells));
    }
    // Round k: every sweep's k-th block (late layers first, as each would run), split where one
    // forward's logits or activations would pass the memory bounds.
    let rounds = blocks.iter().map(Vec::len).max().unwrap_or(0);
    let tensor_attention = !(t.device().is_cpu() && t.dtype() == DType::F32);
    let seq = sweeps.iter().map(|s| s.layout.positions).max().unwrap_or(1);
    let (max_cells, max_rows) = block_bounds(&model.config, seq, tensor_attention);
    let mut chunks: Vec<Vec<(usize, CellAt)>> = Vec::new();
    let mut packed = 0;
    for k in 0..rounds {
        for (i, b) in blocks.iter().enumerate() {
            for &at in b.get(k).into_iter().flatten() {
                let rows = sweeps[i].layout.positions - sweeps[i].cost.cone_offset(at);
                match chunks.last_mut() {
                    Some(c) if c.len() < max_cells && packed + rows <= max_rows => {
                        c.push((i, at));
                        packed += rows;
                    }
                    _ => {
                        chunks.push(vec![(i, at)]);
                        packed = rows;
                    }
                }
            }
        }
    }
    let prefixes: Vec<&[LayerKv]> = sweeps.iter().map(|s| s.target_kv.as_slice()).collect();
    let mut error = None;
    let mut filed: Vec<Vec<super::Cell>> = vec![Vec::new(); sweeps.len()];
    let mut timings: Vec<Vec<ForwardTiming>> = vec![Vec::new(); sweeps.len()];
    for chunk in chunks {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        match run_chunk(&sweeps, &starts, &prefixes, &chunk, options, cancel) {
            Ok(groups) => {
                for (i, cells, timing) in groups {
                    let cost: usize = cells
                        .iter()
                        .map(|c| sweeps[i].cost.cell_cost(Schedule::Fast, c.at))
                        .sum();
                    observe(i, SweepEvent::Work(cost as f64));
                    for cell in cells {
                        observe(i, SweepEvent::Cell(&cell));
                        filed[i].push(cell);
                    }
                    timings[i].push(timing);
                }
            }
            Err(Error::Cancelled(_)) => break,
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    let cancelled = cancel.load(Ordering::Relaxed);
    Ok(sweeps
        .into_iter()
        .zip(filed.into_iter().zip(timings))
        .map(|(mut s, (cells, timing))| {
            for cell in cells {
                s.file(cell);
            }
            s.result.timing.forwards.extend(timing);
            s.result.complete = !cancelled && error.is_none();
            s.result.error = error.clone();
            s.result.timing.schedule = Schedule::Fast;
            s.result.timing.baseline_seconds = s.baseline_seconds;
            s.result.timing.sweep_seconds = s.baseline_seconds + start.elapsed().as_secs_f64();
            s.result
        })
        .collect())
}

/// One shared forward: the cones of every sweep's cells in `chunk`, then each sweep's cells from
/// its rows of the logits, as (sweep, cells, timing).
fn run_chunk(
    sweeps: &[Sweep<'_>],
    starts: &[Vec<Tensor>],
    prefixes: &[&[LayerKv]],
    chunk: &[(usize, CellAt)],
    options: &SweepOptions,
    cancel: &AtomicBool,
) -> Result<Vec<(usize, Vec<super::Cell>, ForwardTiming)>> {
    let forward_start = Instant::now();
    // Consecutive cells of one sweep form a group: its cones, its prefix.
    let groups: Vec<(usize, Vec<CellAt>)> = chunk
        .chunk_by(|a, b| a.0 == b.0)
        .map(|g| (g[0].0, g.iter().map(|&(_, at)| at).collect()))
        .collect();
    let (mut cones, mut cone_prefix) = (Vec::new(), Vec::new());
    for (i, cells) in &groups {
        let c = sweeps[*i].residual_cones(cells, &starts[*i])?;
        cone_prefix.extend(std::iter::repeat_n(*i, c.len()));
        cones.extend(c);
    }
    let t = &sweeps[groups[0].0].model.transformer;
    let logits = t.forward_cones_over(&cones, prefixes, &cone_prefix, cancel, &mut |_| {})?;
    let mut rows = logits_rows(&logits)?.into_iter();
    let forward_seconds = forward_start.elapsed().as_secs_f64();
    let mut out = Vec::with_capacity(groups.len());
    for (i, cells) in groups {
        let cells_start = Instant::now();
        let group_rows: Vec<Vec<f32>> = rows.by_ref().take(cells.len()).collect();
        let s = &sweeps[i];
        let token_layers = cells.iter().map(|&at| s.cost.token_layers(Schedule::Fast, at)).sum();
        let (computed, metrics_seconds) = s.block_cells(&cells, group_rows, options.top_k);
        let timing = ForwardTiming {
            cells: cells.len(),
            token_layers,
            // The shared forward's time is the chunk's: each sweep records it for its cells.
            forward_seconds,
            cells_seconds: cells_start.elapsed().as_secs_f64(),
            metrics_seconds,
        };
        out.push((i, computed, timing));
    }
    Ok(out)
}
