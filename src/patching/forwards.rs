//! How a sweep's cells are computed: the fast schedule's cones (residual-stream cells start from a
//! precomputed patched row, head cells from their layer's recomputed attention output) and the
//! naive schedule's full forwards with hooks.

use std::cell::RefCell;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Tensor};

use super::heads::HeadPatcher;
use super::hooks::PatchCells;
use super::layout::CellAt;
use super::logits::logits_rows;
use super::schedule::{Schedule, fast_blocks, tier_blocks};
use super::sweep::Sweep;
use super::{Component, Direction};
use crate::error::{Error, Result};
use crate::model::{Cone, Model, Site, Span};

/// The residual stream a cone starts from (see [`CostModel::cone_start_layer`](super::cost::CostModel::cone_start_layer)) when `component` at
/// `layer` is patched with `source` (rows of the source run's activation); `pre` and `mid` are the
/// target run's resid_pre and resid_mid at the same positions.
pub(super) fn patched_stream(
    model: &Model,
    component: Component,
    layer: usize,
    source: Tensor,
    pre: Tensor,
    mid: Tensor,
) -> Result<Tensor> {
    Ok(match component {
        Component::ResidPre | Component::ResidPost => source,
        // resid_post = resid_mid + mlp_out.
        Component::MlpOut => (mid + source)?,
        // The layer's MLP runs on the patched resid_mid.
        Component::ResidMid => model.transformer.mlp_residual(layer, &source)?,
        // resid_mid = resid_pre + attn_out; the layer's MLP then runs on it (or, with a parallel
        // residual, on resid_pre as before).
        Component::AttnOut => model.transformer.attn_residual(layer, &pre, &source)?,
        other => return Err(Error::Internal(format!("{other} has no residual-stream patch"))),
    })
}

/// The residual sites a sweep of `component` patches.
pub(super) fn residual_sites(component: Component) -> Vec<Site> {
    match component {
        Component::Block => Component::BLOCK_PARTS.iter().filter_map(|c| c.site()).collect(),
        c if c.has_heads() => Vec::new(),
        c => c.site().into_iter().collect(),
    }
}

impl Sweep<'_> {
    /// The blocks of one importance tier ([`tier_blocks`]).
    pub(super) fn tier_blocks(&self, cells: Vec<CellAt>) -> Vec<Vec<CellAt>> {
        let t = &self.model.transformer;
        let tensor_attention = !(t.device().is_cpu() && t.dtype() == DType::F32);
        let rows = |&at: &CellAt| self.layout.positions - self.cost.cone_offset(at);
        tier_blocks(
            cells,
            &self.model.config,
            self.layout.positions,
            tensor_attention,
            &rows,
        )
    }

    /// The fast schedule's blocks of `cells` ([`fast_blocks`]).
    pub(super) fn fast_blocks(&self, cells: Vec<CellAt>) -> Vec<Vec<CellAt>> {
        let t = &self.model.transformer;
        let tensor_attention = !(t.device().is_cpu() && t.dtype() == DType::F32);
        let cost = |&at: &CellAt| self.cost.cell_cost(Schedule::Fast, at);
        let rows = |&at: &CellAt| self.layout.positions - self.cost.cone_offset(at);
        fast_blocks(
            cells,
            &self.model.config,
            self.layout.positions,
            tensor_attention,
            &cost,
            &rows,
        )
    }

    /// Per (block part, layer), `part * layers + layer`: the patched residual stream a cone starts
    /// from, `[seq - first_diff, hidden]`, row i for a patch at position `first_diff + i`.
    pub(super) fn cone_starts(&self) -> Result<Vec<Tensor>> {
        let seq = self.layout.positions;
        let (from, len) = (self.first_diff, seq - self.first_diff);
        let parts: Vec<Component> = match self.layout.component {
            Component::Block => Component::BLOCK_PARTS.to_vec(),
            c => vec![c],
        };
        let mut starts = Vec::with_capacity(parts.len() * self.layout.layers);
        for component in parts {
            let site = component.site().ok_or_else(|| Error::Internal("no site".into()))?;
            for l in 0..self.layout.layers {
                let source = self
                    .source
                    .get(&(site, l))
                    .ok_or_else(|| Error::Internal(format!("no source {site:?} at layer {l}")))?;
                starts.push(patched_stream(
                    self.model,
                    component,
                    l,
                    source.squeeze(0)?.narrow(0, from, len)?,
                    self.target_stream[l].narrow(0, from, len)?,
                    self.target_mid[l].narrow(0, from, len)?,
                )?);
            }
        }
        Ok(starts)
    }

    /// The fast schedule: one packed forward of the causal cones of `block`'s cells.
    pub(super) fn fast_block(
        &self,
        block: &[CellAt],
        starts: &[Tensor],
        heads: &RefCell<HeadPatcher>,
        cancel: &AtomicBool,
        on_layer: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let cones = if self.layout.component.has_heads() {
            self.head_cones(block, &mut heads.borrow_mut())?
        } else {
            self.residual_cones(block, starts)?
        };
        let logits = self
            .model
            .transformer
            .forward_cones(&cones, &self.target_kv, cancel, on_layer)?;
        logits_rows(&logits)
    }

    /// The cones of residual-stream cells (every component but the heads'): the precomputed
    /// patched row, then the target run's stream after it.
    pub(super) fn residual_cones(&self, block: &[CellAt], starts: &[Tensor]) -> Result<Vec<Cone>> {
        block
            .iter()
            .map(|&at| {
                let position = self.cost.cone_offset(at);
                let start_layer = self.cost.cone_start_layer(at);
                let patched =
                    starts[at.part * self.layout.layers + at.layer].narrow(0, position - self.first_diff, 1)?;
                Ok(Cone {
                    start_layer,
                    offset: position,
                    hidden: self.with_target_tail(patched, start_layer, position + 1)?,
                })
            })
            .collect()
    }

    /// `rows` followed by the target run's resid_pre of `layer` from position `from` on.
    fn with_target_tail(&self, rows: Tensor, layer: usize, from: usize) -> Result<Tensor> {
        let seq = self.layout.positions;
        Ok(if from < seq {
            let rest = self.target_stream[layer].narrow(0, from, seq - from)?;
            Tensor::cat(&[&rows, &rest], 0)?
        } else {
            rows
        })
    }

    /// The cones of head cells: each layer's patched attention output rows through the rest of
    /// the layer in one pass, then the target run's stream after them.
    fn head_cones(&self, block: &[CellAt], heads: &mut HeadPatcher) -> Result<Vec<Cone>> {
        let t = &self.model.transformer;
        let mut cones = Vec::with_capacity(block.len());
        // Block cells are in layer order: one MLP pass per run of cells of one layer.
        for run in block.chunk_by(|a, b| a.layer == b.layer) {
            let layer = run[0].layer;
            let outs = run.iter().map(|&at| heads.patched_o(at)).collect::<Result<Vec<_>>>()?;
            let lens: Vec<usize> = outs.iter().map(|m| m.dim(0)).collect::<candle_core::Result<_>>()?;
            let pres = run
                .iter()
                .zip(&lens)
                .map(|(&at, &len)| Ok(self.target_stream[layer].narrow(0, heads.offset(at), len)?))
                .collect::<Result<Vec<_>>>()?;
            let attn = t.attn_post(layer, Tensor::cat(&outs, 0)?)?;
            let posts = t.attn_residual(layer, &Tensor::cat(&pres, 0)?, &attn)?;
            let mut row = 0;
            for (&at, &len) in run.iter().zip(&lens) {
                let offset = heads.offset(at);
                let rows = posts.narrow(0, row, len)?;
                row += len;
                cones.push(Cone {
                    start_layer: layer + 1,
                    offset,
                    hidden: self.with_target_tail(rows, layer + 1, offset + len)?,
                });
            }
        }
        Ok(cones)
    }

    /// The naive schedule's head sites need the source run's queries, keys, values, patterns and
    /// head outputs, shaped as the forward's hooks see them.
    pub(super) fn cache_source_heads(&mut self) -> Result<()> {
        let t = &self.model.transformer;
        let site = self
            .layout
            .component
            .site()
            .ok_or_else(|| Error::Internal("no head site".into()))?;
        for l in 0..self.layout.layers {
            let acts = t.head_activations(l, &self.source_stream[l].unsqueeze(0)?)?;
            let act = match site {
                Site::Q => acts.q,
                Site::K => acts.k,
                Site::V => acts.v,
                Site::Pattern => acts.pattern,
                _ => {
                    let (heads, seq, hd) = acts.z.dims3()?;
                    acts.z.transpose(0, 1)?.contiguous()?.reshape((seq, heads * hd))?
                }
            };
            self.source.insert((site, l), act.unsqueeze(0)?);
        }
        Ok(())
    }

    /// One full target forward per cell, batched: returns last-position logits per cell.
    pub(super) fn naive_batch(&self, batch: &[CellAt]) -> Result<Vec<Vec<f32>>> {
        let t = &self.model.transformer;
        let ids = match self.result.direction {
            Direction::Denoising => &self.result.corrupted.token_ids,
            Direction::Noising => &self.result.clean.token_ids,
        };
        let rows: Vec<&[u32]> = batch.iter().map(|_| ids.as_slice()).collect();
        let mut hooks = PatchCells {
            layout: &self.layout,
            rows: batch,
            source: &self.source,
            num_heads: self.model.config.num_heads,
        };
        let out = t.forward(t.embed(&rows)?, Span::default(), &mut hooks)?;
        logits_rows(&out.last_logits.to_dtype(DType::F32)?)
    }
}
