//! Sweeps: validate the prompts and answers, run the clean and corrupted baselines, then patch
//! every cell (layer × position, layer × head, …) and stream each finished one.
//!
//! Denoising patches the clean run's activations into the corrupted run; noising the corrupted
//! run's into the clean run. Below, the run that gives activations is the *source* and the run
//! patched is the *target*.
//!
//! Two schedules compute the same cells:
//! - [`Schedule::Fast`] (default) runs only each patch's causal cone. A patch at (layer L,
//!   position P) changes nothing before L and nothing at positions before P, so a cell starts from
//!   the corrupted run's residual stream with the patched value written in, attends to the
//!   corrupted run's cached keys/values for positions < P, and many cells share one packed forward
//!   ([`Transformer::forward_cones`](crate::model::Transformer::forward_cones)).
//!   The last layer's cells need no layer at all, only the final norm and unembedding of one row:
//!   they are computed with the baselines.
//!   Head cells start at the next layer too, from the layer's recomputed attention output
//!   ([`super::heads`]).
//! - [`Schedule::Naive`] runs one full target forward per cell, as a notebook loop does, patching
//!   through hooks ([`super::hooks`]): the baseline the fast schedule is measured and tested against.
//!
//! Both start from the same baselines: the clean and corrupted prompts in one packed forward that
//! computes their shared first tokens once
//! ([`Transformer::forward_shared_prefix`](crate::model::Transformer::forward_shared_prefix)).

use std::cell::RefCell;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::Tensor;

use super::Direction;
use super::cost::CostModel;
use super::estimate::{Attribution, EstimateMethod, Exact, choose_exact, importance_tiers};
use super::grid::Grid;
use super::heads::HeadPatcher;
use super::hooks::SourceActs;
use super::layout::{CellAt, Layout};
use super::logits::{Softmax, top_tokens_with};
use super::metric::MetricBasis;
use super::progress::{SweepEvent, reporting_attempt};
use super::result::{Cell, ForwardTiming, SweepResult};
use super::schedule::{BlockRun, Schedule, run_blocks};
use crate::error::Result;
use crate::model::{LayerKv, Model};

/// How many next-token candidates are kept per run.
pub const DEFAULT_TOP_K: usize = 10;
/// At most this many candidates per cell: each is stored for every cell and written to the JSON.
pub const MAX_TOP_K: usize = 100;
/// Sweeps with more cells to compute than this are refused by the CLI unless `--max-cells` allows
/// them, and confirmed in the app: a long prompt differing at its first token can mean hours.
pub const DEFAULT_MAX_CELLS: usize = 20_000;
/// Naive schedule: cells per forward. 1 = one forward per cell, as a notebook loop runs them.
pub const DEFAULT_BATCH_CELLS: usize = 1;

/// Knobs of a sweep run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepOptions {
    pub schedule: Schedule,
    /// Next-token candidates kept per cell.
    pub top_k: usize,
    /// Naive schedule only: cells per batched forward (the fast schedule sizes its own blocks).
    pub batch_cells: usize,
    /// Naive schedule only: fill the no-op cells (positions before the first differing token) as
    /// exact zeros, as the fast schedule does. `false` runs a forward for them too, as a notebook
    /// loop does (the benchmark's baseline); their values then come out as ~0 rather than exactly 0.
    pub skip_noops: bool,
    /// Estimate every cell first by attribution patching ([`Sweep::attribution`]), then compute
    /// the exact cells in order of estimated importance.
    pub estimate: Option<EstimateMethod>,
    /// With an estimate: which cells are computed exactly.
    pub exact: Exact,
    /// With an estimate: this many more cells, drawn at random from those `exact` leaves out.
    pub sample: usize,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            schedule: Schedule::default(),
            top_k: DEFAULT_TOP_K,
            batch_cells: DEFAULT_BATCH_CELLS,
            skip_noops: true,
            estimate: None,
            exact: Exact::All,
            sample: 0,
        }
    }
}

/// A prepared sweep: inputs validated, baselines run, source activations cached.
pub struct Sweep<'m> {
    pub(super) model: &'m Model,
    pub(super) result: SweepResult,
    pub(super) layout: Layout,
    /// The source run's activations at the sites the sweep patches, per layer, `[1, seq, ..]` as
    /// the forward's hooks see them (head sites are added when the naive schedule needs them).
    pub(super) source: SourceActs,
    /// The source run's resid_pre per layer, `[seq, hidden]` (head cells recompute its attention).
    pub(super) source_stream: Vec<Tensor>,
    /// The target run's residual stream, `[seq, hidden]`: resid_pre of every layer, then the
    /// last layer's resid_post (where a cone that starts after the last layer begins).
    pub(super) target_stream: Vec<Tensor>,
    /// The target run's resid_mid per layer, `[seq, hidden]`.
    pub(super) target_mid: Vec<Tensor>,
    /// The target run's keys/values per layer, `[1, kv_heads, seq, head_dim]`.
    pub(super) target_kv: Vec<LayerKv>,
    /// First position where the prompts' tokens differ (`seq` when they are identical).
    pub(super) first_diff: usize,
    /// The last layer's cells, computed with the baselines (resid_post, resid_mid, attn_out and
    /// mlp_out): the logits of the patch at the last position, and the target run's, which every
    /// patch at an earlier position leaves unchanged there.
    pub(super) last_layer_logits: Option<(Vec<f32>, Vec<f32>)>,
    /// Each cell's predicted work.
    pub(super) cost: CostModel,
    /// The target run's logits (the no-op cells' numbers).
    pub(super) target_logits: Vec<f32>,
    /// What every cell's metrics are measured against.
    pub(super) basis: MetricBasis,
    pub(super) baseline_seconds: f64,
}

impl<'m> Sweep<'m> {
    /// The result so far: baselines, tokens, answers; no cells yet.
    pub fn result(&self) -> &SweepResult {
        &self.result
    }

    /// The first position where the prompts differ; earlier cells are exact no-ops.
    pub fn first_diff(&self) -> usize {
        self.first_diff
    }

    /// Computes every cell, calling `on_cell` as each finishes. When `cancel` is set the sweep stops
    /// and returns what it has, with `complete == false`: within a layer of the fast schedule's
    /// block in flight (whose cells are dropped), after the forward in flight of the naive one. The
    /// no-op cells and those computed with the baselines are reported first, whatever `cancel` says.
    ///
    /// An error while computing cells does not lose the ones already computed: the sweep returns
    /// them with `complete == false` and the error in `error`. When the GPU runs out of memory the
    /// block in flight is first split and retried (see [`run_blocks`]).
    pub fn run(
        self,
        options: &SweepOptions,
        cancel: &AtomicBool,
        on_cell: &mut dyn FnMut(&Cell),
    ) -> Result<SweepResult> {
        self.run_observed(options, cancel, &mut |event| {
            if let SweepEvent::Cell(cell) = event {
                on_cell(cell);
            }
        })
    }

    /// [`Sweep::run`], reporting the work done as it goes too ([`SweepEvent::Work`]: within a
    /// block of the fast schedule, after each layer), for a [`Progress`] from [`Sweep::progress`].
    pub fn run_observed(
        mut self,
        options: &SweepOptions,
        cancel: &AtomicBool,
        observe: &mut dyn FnMut(SweepEvent<'_>),
    ) -> Result<SweepResult> {
        let start = Instant::now();
        let attribution = self.attribute(options, observe);
        let skip_noops = options.schedule == Schedule::Fast || options.skip_noops;
        let (noops, mut cells): (Vec<CellAt>, Vec<CellAt>) =
            self.layout.cells().partition(|&at| skip_noops && self.is_noop(at));
        self.emit_noops(&noops, observe);
        let last = self.layout.layers - 1;
        if options.schedule == Schedule::Fast && self.emit_last_layer(options.top_k, observe) {
            cells.retain(|at| at.layer != last);
        }
        let ordered = attribution.is_some();
        if let Some(a) = &attribution {
            a.by_importance(self.target_logit_diff(), &mut cells, |at| self.layout.index(at));
            let before = cells.len();
            cells = choose_exact(cells, options.exact, options.sample);
            let work: f64 = cells
                .iter()
                .map(|&at| self.cost.cell_cost(options.schedule, at) as f64)
                .sum();
            observe(SweepEvent::Planned {
                cells: self.layout.len() - (before - cells.len()),
                work,
            });
        }
        let naive_setup = match options.schedule {
            Schedule::Naive if self.layout.component.has_heads() => self.cache_source_heads(),
            _ => Ok(()),
        };
        let blocks: Vec<Vec<CellAt>> = match options.schedule {
            Schedule::Fast if ordered => importance_tiers(cells)
                .into_iter()
                .flat_map(|tier| self.tier_blocks(tier))
                .collect(),
            Schedule::Fast => self.fast_blocks(cells),
            Schedule::Naive => cells
                .chunks(options.batch_cells.max(1))
                .map(<[CellAt]>::to_vec)
                .collect(),
        };
        // The patched residual stream the fast schedule's cones start from.
        let starts = match options.schedule {
            Schedule::Fast if !blocks.is_empty() && !self.layout.component.has_heads() => self.cone_starts(),
            _ => Ok(Vec::new()),
        };
        let heads = RefCell::new(HeadPatcher::new(
            &self.model.transformer,
            self.layout.component,
            &self.source_stream,
            &self.target_stream,
            self.first_diff,
        ));
        let run = match naive_setup.and(starts) {
            Ok(starts) => {
                let (mut computed, mut timings) = (Vec::new(), Vec::new());
                let run = run_blocks(blocks, cancel, &mut |block| {
                    let (cells, timing) = self.run_block(block, options, &starts, &heads, cancel, observe)?;
                    for cell in cells {
                        observe(SweepEvent::Cell(&cell));
                        computed.push(cell);
                    }
                    timings.push(timing);
                    Ok(())
                });
                drop(heads);
                for cell in computed {
                    self.file(cell);
                }
                self.result.timing.forwards.extend(timings);
                run
            }
            Err(e) => BlockRun {
                cancelled: false,
                error: Some(e),
                split_to: None,
            },
        };
        if let Some(most) = run.split_to {
            self.result.warnings.push(format!(
                "the GPU ran out of memory on the larger blocks of cells; the sweep went on with at most \
                 {most} cells per forward"
            ));
        }
        if let Some(a) = attribution {
            self.result.verified = Some(Grid::from_flat(
                self.layout.shape(),
                self.result
                    .patched_logit_diff
                    .flat()
                    .iter()
                    .map(Option::is_some)
                    .collect(),
            ));
            self.result.estimate = Some(a);
        }
        self.result.complete = !run.cancelled && run.error.is_none();
        self.result.error = run.error.map(|e| e.to_string());
        self.result.timing.schedule = options.schedule;
        self.result.timing.baseline_seconds = self.baseline_seconds;
        self.result.timing.sweep_seconds = self.baseline_seconds + start.elapsed().as_secs_f64();
        Ok(self.result)
    }

    /// The estimate `options` ask for, reported to `observe`; a failed one becomes a warning and
    /// the sweep goes on exactly.
    fn attribute(&mut self, options: &SweepOptions, observe: &mut dyn FnMut(SweepEvent<'_>)) -> Option<Attribution> {
        let method = options.estimate?;
        match self.attribution(method) {
            Ok(a) => {
                observe(SweepEvent::Estimated(&a));
                Some(a)
            }
            Err(e) => {
                self.result.warnings.push(format!(
                    "the {} estimate failed ({e}); the cells are computed exactly",
                    method.name()
                ));
                None
            }
        }
    }

    /// The target run's logit difference (the corrupted run's when denoising).
    pub fn target_logit_diff(&self) -> f64 {
        match self.result.direction {
            Direction::Denoising => self.result.corrupted_logit_diff,
            Direction::Noising => self.result.clean_logit_diff,
        }
    }

    /// Whether patching `at` cannot change anything ([`Layout::is_noop`]).
    pub(super) fn is_noop(&self, at: CellAt) -> bool {
        self.layout.is_noop(at, self.first_diff)
    }

    /// The no-op cells: the target run's own numbers.
    pub(super) fn emit_noops(&mut self, noops: &[CellAt], observe: &mut dyn FnMut(SweepEvent<'_>)) {
        // As many candidates as the baselines kept.
        let template = self.cell_of(CellAt::at(0, 0), &self.target_logits, self.result.clean_top_k.len());
        for &at in noops {
            let cell = Cell {
                at,
                skipped: true,
                ..template.clone()
            };
            self.emit(cell, observe);
        }
    }

    /// The last layer's cells computed with the baselines: one cell for the patch at the last
    /// position, the target run's logits (one top-k, shared) for the others. Returns whether they
    /// were there to emit.
    pub(super) fn emit_last_layer(&mut self, top_k: usize, observe: &mut dyn FnMut(SweepEvent<'_>)) -> bool {
        let Some((patched, target)) = self.last_layer_logits.take() else {
            return false;
        };
        let (last, seq) = (self.layout.layers - 1, self.layout.positions);
        let at_last = self.cell_of(CellAt::at(last, seq - 1), &patched, top_k);
        let earlier = self.cell_of(CellAt::at(last, 0), &target, top_k);
        for position in self.first_diff..seq - 1 {
            self.emit(
                Cell {
                    at: CellAt::at(last, position),
                    ..earlier.clone()
                },
                observe,
            );
        }
        self.emit(at_last, observe);
        true
    }

    /// Computes one block of cells (one packed forward, or a naive batch) and records the
    /// forward's timing; the work it did is reported as it goes. Returns the cells, for the caller
    /// to deliver, and the forward's timing.
    fn run_block(
        &self,
        block: &[CellAt],
        options: &SweepOptions,
        starts: &[Tensor],
        heads: &RefCell<HeadPatcher>,
        cancel: &AtomicBool,
        observe: &mut dyn FnMut(SweepEvent<'_>),
    ) -> Result<(Vec<Cell>, ForwardTiming)> {
        let forward_start = Instant::now();
        let logits = match options.schedule {
            Schedule::Fast => reporting_attempt(observe, |on_layer| {
                self.fast_block(block, starts, heads, cancel, on_layer)
            })?,
            Schedule::Naive => self.naive_batch(block)?,
        };
        let cells_start = Instant::now();
        let (cells, metrics_seconds) = self.block_cells(block, logits, options.top_k);
        let token_layers = block
            .iter()
            .map(|&at| self.cost.token_layers(options.schedule, at))
            .sum();
        // The rest of the cells' predicted cost: their unembeddings, and for the naive schedule
        // (which reports no layers) the whole forward.
        let cost: usize = block.iter().map(|&at| self.cost.cell_cost(options.schedule, at)).sum();
        let reported = if options.schedule == Schedule::Fast {
            token_layers
        } else {
            0
        };
        observe(SweepEvent::Work(cost.saturating_sub(reported) as f64));
        let timing = ForwardTiming {
            cells: block.len(),
            token_layers,
            forward_seconds: (cells_start - forward_start).as_secs_f64(),
            cells_seconds: cells_start.elapsed().as_secs_f64(),
            metrics_seconds,
        };
        Ok((cells, timing))
    }

    /// Reports a finished cell and files it in the result.
    fn emit(&mut self, cell: Cell, observe: &mut dyn FnMut(SweepEvent<'_>)) {
        observe(SweepEvent::Cell(&cell));
        self.file(cell);
    }

    /// Files a finished cell in the result.
    pub(super) fn file(&mut self, cell: Cell) {
        if cell.skipped {
            self.result.timing.cells_skipped += 1;
        } else {
            self.result.timing.cells_computed += 1;
        }
        self.result.insert(cell);
    }

    /// A computed cell from its patched run's logits.
    fn cell_of(&self, at: CellAt, row: &[f32], top_k: usize) -> Cell {
        self.timed_cell_of(at, row, top_k).0
    }

    /// [`Sweep::cell_of`], and the seconds its metrics took beyond the softmax the top-k needs
    /// anyway (what `patchbay bench` reports as the metrics' cost).
    fn timed_cell_of(&self, at: CellAt, row: &[f32], top_k: usize) -> (Cell, f64) {
        let (correct, incorrect) = (self.result.correct.token_id, self.result.incorrect.token_id);
        let softmax = Softmax::of(row);
        let started = Instant::now();
        let metrics = self.basis.measure_with(row, softmax);
        let metrics_seconds = started.elapsed().as_secs_f64();
        let cell = Cell {
            at,
            metrics,
            skipped: false,
            top_k: top_tokens_with(self.model, row, top_k, softmax),
            answer_logits: [row[correct as usize], row[incorrect as usize]],
        };
        (cell, metrics_seconds)
    }

    /// The finished cells of one block from its logits rows, in block order, and the CPU seconds
    /// their metrics took. Spread over the cores: the metrics, softmax and top-k over a large
    /// vocabulary per cell are not free.
    pub(super) fn block_cells(&self, block: &[CellAt], logits: Vec<Vec<f32>>, top_k: usize) -> (Vec<Cell>, f64) {
        let timed: Vec<(Cell, f64)> = if block.len() <= 1 {
            block
                .iter()
                .zip(&logits)
                .map(|(&at, r)| self.timed_cell_of(at, r, top_k))
                .collect()
        } else {
            // On rayon's pool, which the CPU kernels already keep: no threads started per block.
            use rayon::prelude::*;
            block
                .par_iter()
                .zip(logits.par_iter())
                .map(|(&at, r)| self.timed_cell_of(at, r, top_k))
                .collect()
        };
        let metrics_seconds = timed.iter().map(|(_, s)| s).sum();
        (timed.into_iter().map(|(c, _)| c).collect(), metrics_seconds)
    }
}
