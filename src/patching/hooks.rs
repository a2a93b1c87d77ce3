//! The naive schedule's patch: hooks that overwrite, per batch row, one cell's activation with the
//! source run's, at whichever site the cell's component lives (a residual site, or one head's
//! queries, keys, values, pattern or output).

use std::collections::HashMap;

use candle_core::Tensor;

use super::layout::{CellAt, Layout};
use crate::error::{Error, Result};
use crate::model::{Hooks, Site};

/// The source run's activations, per (site, layer), batch 1, shaped as the forward's hooks see
/// them (see [`Site`]).
pub(super) type SourceActs = HashMap<(Site, usize), Tensor>;

/// Overwrites each batch row's cell with the source activation.
pub(super) struct PatchCells<'a> {
    pub(super) layout: &'a Layout,
    /// The cell patched in each batch row.
    pub(super) rows: &'a [CellAt],
    pub(super) source: &'a SourceActs,
    pub(super) num_heads: usize,
}

impl Hooks for PatchCells<'_> {
    fn visit(&mut self, site: Site, layer: usize, offset: usize, x: Tensor) -> Result<Tensor> {
        let here = |c: &CellAt| c.layer == layer && self.layout.component_of(*c).site() == Some(site);
        if !self.rows.iter().any(here) {
            return Ok(x);
        }
        let source = self
            .source
            .get(&(site, layer))
            .ok_or_else(|| Error::Internal(format!("no source activation for {site:?} at layer {layer}")))?;
        let dims = x.dims().to_vec();
        // As [batch, a, b, rest], the mask over (a, b): (position, head) for the head outputs,
        // (head, position) for queries, keys, values and patterns (positions = query positions),
        // (position, 1) for the residual sites.
        let (a, b, positions_first) = match site {
            Site::Z => (dims[1], self.num_heads, true),
            Site::Q | Site::K | Site::V | Site::Pattern => (dims[1], dims[2], false),
            _ => (dims[1], 1, true),
        };
        let batch = dims[0];
        let shape4 = (batch, a, b, x.elem_count() / (batch * a * b));
        let mut mask = vec![0u8; batch * a * b];
        let seq = if positions_first { a } else { b };
        for (row, cell) in self.rows.iter().enumerate() {
            if !here(cell) {
                continue;
            }
            let positions: Vec<usize> = match cell.position {
                Some(p) if p >= offset && p < offset + seq => vec![p - offset],
                Some(_) => Vec::new(),
                None => (0..seq).collect(),
            };
            let heads: Vec<usize> = match cell.head {
                Some(h) => vec![h],
                None => (0..if positions_first { b } else { a }).collect(),
            };
            for &p in &positions {
                for &h in &heads {
                    let (i, j) = if positions_first { (p, h) } else { (h, p) };
                    mask[(row * a + i) * b + j] = 1;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (batch, a, b, 1), x.device())?.broadcast_as(shape4)?;
        let mut source_dims = dims.clone();
        source_dims[0] = 1;
        if source.dims() != source_dims.as_slice() {
            return Err(Error::Internal(format!(
                "the source's {site:?} is {:?}; the forward's is {dims:?}",
                source.dims()
            )));
        }
        let source = source
            .reshape((1, shape4.1, shape4.2, shape4.3))?
            .broadcast_as(shape4)?;
        Ok(mask.where_cond(&source, &x.reshape(shape4)?)?.reshape(dims)?)
    }
}
