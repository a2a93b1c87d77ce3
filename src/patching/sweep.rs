//! Sweeps: validate the prompts and answers, run the clean and corrupted baselines, then patch
//! every layer × position and stream each finished cell.
//!
//! Two schedules compute the same cells:
//! - [`Schedule::Fast`] (default) runs only each patch's causal cone. A patch at (layer L,
//!   position P) changes nothing before L and nothing at positions before P, so a cell starts from
//!   the corrupted run's residual stream with the patched value written in, attends to the
//!   corrupted run's cached keys/values for positions < P, and many cells share one packed forward
//!   ([`Transformer::forward_cones`](crate::model::Transformer::forward_cones)).
//!   The last layer's cells need no layer at all, only the final norm and unembedding of one row:
//!   they are computed with the baselines.
//! - [`Schedule::Naive`] runs one full corrupted forward per cell, as a notebook loop does: the
//!   baseline the fast schedule is measured and tested against.
//!
//! Both start from the same baselines: the clean and corrupted prompts in one packed forward that
//! computes their shared first tokens once
//! ([`Transformer::forward_shared_prefix`](crate::model::Transformer::forward_shared_prefix)).

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::{DType, Tensor};

use super::Component;
use super::logits::{logits_rows, top_tokens};
use super::metric::{logit_diff, normalized};
use super::progress::{SweepEvent, reporting_attempt};
use super::request::{SweepRequest, TokenSweepRequest, ValidRequest};
use super::result::{Baseline, Cell, ForwardTiming, ModelRecord, SweepResult};
use super::schedule::{BlockRun, CellAt, Schedule, fast_blocks, run_blocks};
use crate::error::{Error, Result};
use crate::model::{Cone, Hooks, LayerKv, Model, Site, Span};

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
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            schedule: Schedule::default(),
            top_k: DEFAULT_TOP_K,
            batch_cells: DEFAULT_BATCH_CELLS,
            skip_noops: true,
        }
    }
}

/// A prepared sweep: inputs validated, baselines run, clean activations cached.
pub struct Sweep<'m> {
    pub(super) model: &'m Model,
    pub(super) result: SweepResult,
    /// The clean run's activation at the swept site, per layer, `[1, seq, hidden]`.
    clean_acts: Vec<Tensor>,
    /// The corrupted run's residual stream, `[seq, hidden]`: resid_pre of every layer, then the
    /// last layer's resid_post (where a cone that starts after the last layer begins).
    corrupted_stream: Vec<Tensor>,
    /// The corrupted run's resid_mid per layer, `[seq, hidden]`.
    corrupted_mid: Vec<Tensor>,
    /// The corrupted run's keys/values per layer, `[1, kv_heads, seq, head_dim]`.
    corrupted_kv: Vec<LayerKv>,
    /// First position where the prompts' tokens differ (`seq` when they are identical).
    pub(super) first_diff: usize,
    /// The last layer's cells, computed with the baselines (every component but resid_pre): the
    /// logits of the patch at the last position, and the corrupted run's, which every patch at an
    /// earlier position leaves unchanged there.
    pub(super) last_layer_logits: Option<(Vec<f32>, Vec<f32>)>,
    pub(super) baseline_seconds: f64,
}

/// Overwrites, per batch row, one (layer, position) of one site with the clean activation.
struct PatchRows<'a> {
    site: Site,
    /// (layer, position) patched in each batch row.
    rows: &'a [CellAt],
    clean: &'a [Tensor],
}

impl Hooks for PatchRows<'_> {
    fn visit(&mut self, site: Site, layer: usize, offset: usize, x: Tensor) -> Result<Tensor> {
        if site != self.site || !self.rows.iter().any(|&(l, _)| l == layer) {
            return Ok(x);
        }
        let (batch, seq, hidden) = x.dims3()?;
        let mut mask = vec![0u8; batch * seq];
        for (row, &(l, p)) in self.rows.iter().enumerate() {
            if l == layer && p >= offset && p < offset + seq {
                mask[row * seq + (p - offset)] = 1;
            }
        }
        let mask = Tensor::from_vec(mask, (batch, seq, 1), x.device())?.broadcast_as((batch, seq, hidden))?;
        let clean = self.clean[layer]
            .narrow(1, offset, seq)?
            .broadcast_as((batch, seq, hidden))?;
        Ok(mask.where_cond(&clean, &x)?)
    }
}

/// The residual stream a cone starts from (see [`Sweep::cone_start_layer`]) when `component` at
/// `layer` is patched with `clean` (rows of the clean run's activation); `pre` and `mid` are the
/// corrupted run's resid_pre and resid_mid at the same positions.
fn patched_stream(
    model: &Model,
    component: Component,
    layer: usize,
    clean: Tensor,
    pre: Tensor,
    mid: Tensor,
) -> Result<Tensor> {
    Ok(match component {
        Component::ResidPre | Component::ResidPost => clean,
        // resid_post = resid_mid + mlp_out.
        Component::MlpOut => (mid + clean)?,
        // resid_mid = resid_pre + attn_out; the layer's MLP then runs on it.
        Component::AttnOut => model.transformer.mlp_residual(layer, &(pre + clean)?)?,
    })
}

impl<'m> Sweep<'m> {
    /// Validates the request, runs the clean and corrupted prompts and caches clean activations.
    pub fn prepare(model: &'m Model, request: &SweepRequest, top_k: usize) -> Result<Self> {
        let start = Instant::now();
        Self::from_request(model, start, request.validate(model)?, top_k)
    }

    /// Like [`Sweep::prepare`], for prompts and answers given as token ids.
    pub fn prepare_tokens(model: &'m Model, request: &TokenSweepRequest, top_k: usize) -> Result<Self> {
        let start = Instant::now();
        Self::from_request(model, start, request.validate(model)?, top_k)
    }

    /// Runs the baselines for a validated request and caches what both schedules need.
    fn from_request(model: &'m Model, start: Instant, request: ValidRequest, top_k: usize) -> Result<Self> {
        if top_k > MAX_TOP_K {
            return Err(Error::Input(format!(
                "top-k is {top_k}; at most {MAX_TOP_K} candidates are kept per cell"
            )));
        }
        let first_diff = request.first_diff();
        let component = request.component;
        let seq = request.clean.token_ids.len();

        let t = &model.transformer;
        let site = component.site();
        let layers = model.config.num_layers;
        // Both baselines in one packed forward (row 0 clean, row 1 corrupted) that computes the
        // tokens before the first difference once; the corrupted row also keeps what the fast
        // schedule starts cones from.
        let mut sites = vec![site, Site::ResidPre, Site::ResidMid, Site::ResidPost];
        sites.sort();
        sites.dedup();
        let baselines = t.forward_shared_prefix(
            &[&request.clean.token_ids, &request.corrupted.token_ids],
            first_diff,
            &sites,
        )?;
        let act = |site: Site, l: usize| {
            baselines
                .acts
                .get(&(site, l))
                .cloned()
                .ok_or_else(|| Error::Internal(format!("no {site:?} activation captured at layer {l}")))
        };
        let clean_acts = (0..layers)
            .map(|l| Ok(act(site, l)?.narrow(0, 0, 1)?))
            .collect::<Result<Vec<_>>>()?;
        let mut corrupted_stream = (0..layers)
            .map(|l| Ok(act(Site::ResidPre, l)?.get(1)?))
            .collect::<Result<Vec<_>>>()?;
        corrupted_stream.push(act(Site::ResidPost, layers - 1)?.get(1)?);
        let corrupted_mid = (0..layers)
            .map(|l| Ok(act(Site::ResidMid, l)?.get(1)?))
            .collect::<Result<Vec<_>>>()?;
        let corrupted_kv = baselines
            .kv
            .iter()
            .map(|kv| {
                Ok(LayerKv {
                    k: kv.k.narrow(0, 1, 1)?,
                    v: kv.v.narrow(0, 1, 1)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;

        // The last layer's cells (every component but resid_pre) run no layer at all: the patched
        // residual stream at the last position goes straight to the final norm and unembedding:
        // the clean-patched row for the patch at the last position, the corrupted run's own for
        // the others. They share the baselines' pass over the unembedding, so the first cells are
        // ready with the baselines.
        let last = layers - 1;
        let has_ready = component != Component::ResidPre && first_diff < seq;
        let mut finals = vec![baselines.last_hidden.clone()];
        if has_ready {
            let at_last = |t: &Tensor| t.narrow(0, seq - 1, 1);
            finals.push(patched_stream(
                model,
                component,
                last,
                at_last(&clean_acts[last].squeeze(0)?)?,
                at_last(&corrupted_stream[last])?,
                at_last(&corrupted_mid[last])?,
            )?);
        }
        let mut logits = logits_rows(&t.final_logits(&Tensor::cat(&finals, 0)?)?)?.into_iter();
        let (Some(clean_logits), Some(corrupted_logits)) = (logits.next(), logits.next()) else {
            return Err(Error::Internal("the baselines did not return two rows".into()));
        };
        let last_layer_logits = logits.next().map(|patched| (patched, corrupted_logits.clone()));

        let (correct, incorrect) = (request.correct.token_id, request.incorrect.token_id);
        let baseline = |logits: &[f32]| Baseline {
            logit_diff: logit_diff(logits, correct, incorrect),
            answer_logits: [logits[correct as usize], logits[incorrect as usize]],
            top_k: top_tokens(model, logits, top_k),
        };
        let result = SweepResult::new(
            ModelRecord::of(model),
            request,
            [baseline(&clean_logits), baseline(&corrupted_logits)],
            layers,
            Some(model.load_seconds),
        );
        Ok(Self {
            model,
            result,
            clean_acts,
            corrupted_stream,
            corrupted_mid,
            corrupted_kv,
            first_diff,
            last_layer_logits,
            baseline_seconds: start.elapsed().as_secs_f64(),
        })
    }

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
        let (layers, seq) = (self.result.layers(), self.result.positions());
        // Positions before the first difference: the clean and corrupted activations are identical
        // there (causal attention), so patching changes nothing.
        let skip_noops = options.schedule == Schedule::Fast || options.skip_noops;
        let first_run = if skip_noops { self.first_diff.min(seq) } else { 0 };
        self.emit_noops(first_run, observe);
        let mut cells: Vec<CellAt> = (0..layers)
            .flat_map(|l| (first_run..seq).map(move |p| (l, p)))
            .collect();
        if options.schedule == Schedule::Fast && self.emit_last_layer(first_run, options.top_k, observe) {
            cells.retain(|&(l, _)| l != layers - 1);
        }
        let blocks: Vec<Vec<CellAt>> = match options.schedule {
            Schedule::Fast => self.fast_blocks(cells),
            Schedule::Naive => cells
                .chunks(options.batch_cells.max(1))
                .map(<[CellAt]>::to_vec)
                .collect(),
        };
        // The patched residual stream the fast schedule's cones start from.
        let starts = match options.schedule {
            Schedule::Fast if !blocks.is_empty() => self.cone_starts(),
            _ => Ok(Vec::new()),
        };
        let run = match starts {
            Ok(starts) => run_blocks(blocks, cancel, &mut |block| {
                self.run_block(block, options, &starts, cancel, observe)
            }),
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
        self.result.complete = !run.cancelled && run.error.is_none();
        self.result.error = run.error.map(|e| e.to_string());
        self.result.timing.schedule = options.schedule;
        self.result.timing.baseline_seconds = self.baseline_seconds;
        self.result.timing.sweep_seconds = self.baseline_seconds + start.elapsed().as_secs_f64();
        Ok(self.result)
    }

    /// The no-op cells of every layer at positions `..first_run`: the corrupted run's own numbers.
    fn emit_noops(&mut self, first_run: usize, observe: &mut dyn FnMut(SweepEvent<'_>)) {
        let (clean_ld, corrupted_ld) = (self.result.clean_logit_diff, self.result.corrupted_logit_diff);
        let corrupted_top = self.result.corrupted_top_k.clone();
        for layer in 0..self.result.layers() {
            for position in 0..first_run {
                let cell = Cell {
                    layer,
                    position,
                    patched_logit_diff: corrupted_ld,
                    value: normalized(corrupted_ld, clean_ld, corrupted_ld),
                    skipped: true,
                    top_k: corrupted_top.clone(),
                    answer_logits: self.result.corrupted_answer_logits,
                };
                self.emit(cell, observe);
            }
        }
    }

    /// The last layer's cells at positions `first_run..`, computed with the baselines: one cell for
    /// the patch at the last position, the corrupted run's logits (one top-k, shared) for the
    /// others. Returns whether they were there to emit.
    fn emit_last_layer(&mut self, first_run: usize, top_k: usize, observe: &mut dyn FnMut(SweepEvent<'_>)) -> bool {
        let Some((patched, corrupted)) = self.last_layer_logits.take() else {
            return false;
        };
        let (last, seq) = (self.result.layers() - 1, self.result.positions());
        let mut made = self
            .block_cells(&[(last, seq - 1), (last, first_run)], vec![patched, corrupted], top_k)
            .into_iter();
        let (Some(at_last), Some(earlier)) = (made.next(), made.next()) else {
            return false;
        };
        for position in first_run..seq - 1 {
            self.emit(
                Cell {
                    position,
                    ..earlier.clone()
                },
                observe,
            );
        }
        self.emit(at_last, observe);
        true
    }

    /// Computes one block of cells (one packed forward, or a naive batch), delivers them and
    /// records the forward's timing; the work it did is reported as it goes.
    fn run_block(
        &mut self,
        block: &[CellAt],
        options: &SweepOptions,
        starts: &[Tensor],
        cancel: &AtomicBool,
        observe: &mut dyn FnMut(SweepEvent<'_>),
    ) -> Result<()> {
        let forward_start = Instant::now();
        let logits = match options.schedule {
            Schedule::Fast => reporting_attempt(observe, |on_layer| self.fast_block(block, starts, cancel, on_layer))?,
            Schedule::Naive => self.naive_batch(block)?,
        };
        let cells_start = Instant::now();
        for cell in self.block_cells(block, logits, options.top_k) {
            self.emit(cell, observe);
        }
        let token_layers = block
            .iter()
            .map(|&(l, p)| self.token_layers(options.schedule, l, p))
            .sum();
        // The rest of the cells' predicted cost: their unembeddings, and for the naive schedule
        // (which reports no layers) the whole forward.
        let cost: usize = block.iter().map(|&(l, p)| self.cell_cost(options.schedule, l, p)).sum();
        let reported = if options.schedule == Schedule::Fast {
            token_layers
        } else {
            0
        };
        observe(SweepEvent::Work(cost.saturating_sub(reported) as f64));
        self.result.timing.forwards.push(ForwardTiming {
            cells: block.len(),
            token_layers,
            forward_seconds: (cells_start - forward_start).as_secs_f64(),
            cells_seconds: cells_start.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    /// Reports a finished cell and files it in the result.
    fn emit(&mut self, cell: Cell, observe: &mut dyn FnMut(SweepEvent<'_>)) {
        observe(SweepEvent::Cell(&cell));
        if cell.skipped {
            self.result.timing.cells_skipped += 1;
        } else {
            self.result.timing.cells_computed += 1;
        }
        self.result.insert(cell);
    }

    /// The finished cells of one block from its logits rows, in block order. Spread over the cores:
    /// a softmax and top-k over a large vocabulary per cell is not free.
    fn block_cells(&self, block: &[CellAt], logits: Vec<Vec<f32>>, top_k: usize) -> Vec<Cell> {
        let (clean_ld, corrupted_ld) = (self.result.clean_logit_diff, self.result.corrupted_logit_diff);
        let (correct, incorrect) = (self.result.correct.token_id, self.result.incorrect.token_id);
        let model = self.model;
        let cell = |&(layer, position): &CellAt, row: &Vec<f32>| {
            let patched = logit_diff(row, correct, incorrect);
            Cell {
                layer,
                position,
                patched_logit_diff: patched,
                value: normalized(patched, clean_ld, corrupted_ld),
                skipped: false,
                top_k: top_tokens(model, row, top_k),
                answer_logits: [row[correct as usize], row[incorrect as usize]],
            }
        };
        if block.len() <= 1 {
            return block.iter().zip(&logits).map(|(c, r)| cell(c, r)).collect();
        }
        // On rayon's pool, which the CPU kernels already keep: no threads started per block.
        use rayon::prelude::*;
        block
            .par_iter()
            .zip(logits.par_iter())
            .map(|(c, r)| cell(c, r))
            .collect()
    }

    /// The fast schedule's blocks of `cells` ([`fast_blocks`]).
    fn fast_blocks(&self, cells: Vec<CellAt>) -> Vec<Vec<CellAt>> {
        let t = &self.model.transformer;
        let tensor_attention = !(t.device().is_cpu() && t.dtype() == DType::F32);
        let cost = |&(l, p): &CellAt| self.cell_cost(Schedule::Fast, l, p);
        fast_blocks(
            cells,
            &self.model.config,
            self.result.positions(),
            tensor_attention,
            &cost,
        )
    }

    /// Per patched layer: the patched residual stream a cone starts from, `[seq - first_diff, hidden]`,
    /// row i for a patch at position `first_diff + i`.
    fn cone_starts(&self) -> Result<Vec<Tensor>> {
        let seq = self.result.positions();
        let (from, len) = (self.first_diff, seq - self.first_diff);
        (0..self.result.layers())
            .map(|l| {
                patched_stream(
                    self.model,
                    self.result.component,
                    l,
                    self.clean_acts[l].squeeze(0)?.narrow(0, from, len)?,
                    self.corrupted_stream[l].narrow(0, from, len)?,
                    self.corrupted_mid[l].narrow(0, from, len)?,
                )
            })
            .collect()
    }

    /// The fast schedule: one packed forward of the causal cones of `block`'s cells.
    fn fast_block(
        &self,
        block: &[CellAt],
        starts: &[Tensor],
        cancel: &AtomicBool,
        on_layer: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let seq = self.result.positions();
        let cones = block
            .iter()
            .map(|&(layer, position)| {
                let start_layer = self.cone_start_layer(layer);
                let patched = starts[layer].narrow(0, position - self.first_diff, 1)?;
                let hidden = if position + 1 < seq {
                    let rest = self.corrupted_stream[start_layer].narrow(0, position + 1, seq - position - 1)?;
                    Tensor::cat(&[&patched, &rest], 0)?
                } else {
                    patched
                };
                Ok(Cone {
                    start_layer,
                    offset: position,
                    hidden,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let logits = self
            .model
            .transformer
            .forward_cones(&cones, &self.corrupted_kv, cancel, on_layer)?;
        logits_rows(&logits)
    }

    /// One full corrupted forward per cell, batched: returns last-position logits per cell.
    fn naive_batch(&self, batch: &[CellAt]) -> Result<Vec<Vec<f32>>> {
        let t = &self.model.transformer;
        let ids = &self.result.corrupted.token_ids;
        let rows: Vec<&[u32]> = batch.iter().map(|_| ids.as_slice()).collect();
        let mut hooks = PatchRows {
            site: self.result.component.site(),
            rows: batch,
            clean: &self.clean_acts,
        };
        let out = t.forward(t.embed(&rows)?, Span::default(), &mut hooks)?;
        logits_rows(&out.last_logits.to_dtype(DType::F32)?)
    }
}
