//! What a head cell's inspector shows beside the top tokens: the head's attention pattern at the
//! last position over the source positions, in the clean, corrupted and patched runs. Computed on
//! demand, one cell at a time, with plain forwards (the patched one through the naive patch).

use std::collections::HashMap;

use candle_core::Tensor;

use super::hooks::{PatchCells, SourceActs};
use super::layout::{CellAt, Layout};
use super::{Component, Direction};
use crate::error::{Error, Result};
use crate::model::{Hooks, Model, Site, Span};

/// Which head cell's patterns to compute, with what its sweep was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternRequest {
    pub clean_ids: Vec<u32>,
    pub corrupted_ids: Vec<u32>,
    pub component: Component,
    pub direction: Direction,
    pub by_position: bool,
    pub at: CellAt,
}

/// One head cell's attention at the last position: a row over source positions per query head
/// (several for a key/value head under GQA), in each run.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadPatterns {
    pub request: PatternRequest,
    /// The query heads shown (the cell's head, or those its key/value head serves).
    pub query_heads: Vec<usize>,
    pub clean: Vec<Vec<f32>>,
    pub corrupted: Vec<Vec<f32>>,
    /// The target run with the cell's patch.
    pub patched: Vec<Vec<f32>>,
}

/// Records activations at the (site, layer) pairs asked for.
struct Record(HashMap<(Site, usize), Option<Tensor>>);

impl Hooks for Record {
    fn visit(&mut self, site: Site, layer: usize, _: usize, x: Tensor) -> Result<Tensor> {
        if let Some(slot) = self.0.get_mut(&(site, layer)) {
            *slot = Some(x.clone());
        }
        Ok(x)
    }
}

/// Applies `first`, then shows the result to `then`.
struct Then<'a>(&'a mut dyn Hooks, &'a mut dyn Hooks);

impl Hooks for Then<'_> {
    fn visit(&mut self, site: Site, layer: usize, offset: usize, x: Tensor) -> Result<Tensor> {
        let x = self.0.visit(site, layer, offset, x)?;
        self.1.visit(site, layer, offset, x)
    }
}

/// The attention patterns of `request`'s cell (see [`HeadPatterns`]).
pub fn head_patterns(model: &Model, request: &PatternRequest) -> Result<HeadPatterns> {
    let cfg = &model.config;
    let at = request.at;
    let seq = request.clean_ids.len();
    let layout = Layout::for_model(request.component, request.by_position, cfg, seq);
    let component = layout.component_of(at);
    let (true, Some(site), Some(head)) = (component.has_heads(), component.site(), at.head) else {
        return Err(Error::Input("attention patterns are shown for head cells only".into()));
    };
    if seq == 0 || request.corrupted_ids.len() != seq || at.layer >= cfg.num_layers || head >= layout.heads {
        return Err(Error::Input("the cell is not in this model's grid".into()));
    }
    let query_heads: Vec<usize> = if component.per_kv_head() {
        let rep = cfg.num_heads / cfg.num_kv_heads.max(1);
        (head * rep..(head + 1) * rep).collect()
    } else {
        vec![head]
    };
    let t = &model.transformer;
    let layer = at.layer;
    let run = |ids: &[u32], hooks: &mut dyn Hooks| -> Result<()> {
        t.forward(t.embed(&[ids])?, Span::default(), hooks).map(|_| ())
    };
    let rows = |pattern: Option<Tensor>| -> Result<Vec<Vec<f32>>> {
        let pattern = pattern.ok_or_else(|| Error::Internal("the pattern was not visited".into()))?;
        // [1, heads, seq, seq]: the last query's row per head.
        let last = pattern.get(0)?.narrow(1, seq - 1, 1)?.squeeze(1)?;
        query_heads
            .iter()
            .map(|&h| Ok(last.get(h)?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?))
            .collect()
    };
    let (source_ids, target_ids) = match request.direction {
        Direction::Denoising => (&request.clean_ids, &request.corrupted_ids),
        Direction::Noising => (&request.corrupted_ids, &request.clean_ids),
    };
    let pattern_at = (Site::Pattern, layer);
    let mut source = Record(HashMap::from([(pattern_at, None), ((site, layer), None)]));
    run(source_ids, &mut source)?;
    let mut target = Record(HashMap::from([(pattern_at, None)]));
    run(target_ids, &mut target)?;
    let mut acts = SourceActs::new();
    // (For head_pattern the patched site is the pattern itself: one entry serves both.)
    if let Some(Some(act)) = source.0.get(&(site, layer)) {
        acts.insert((site, layer), act.clone());
    }
    let source_rows = rows(source.0.remove(&pattern_at).flatten())?;
    let target_rows = rows(target.0.remove(&pattern_at).flatten())?;
    let mut patch = PatchCells {
        layout: &layout,
        rows: &[at],
        source: &acts,
        num_heads: cfg.num_heads,
    };
    let mut patched = Record(HashMap::from([(pattern_at, None)]));
    run(target_ids, &mut Then(&mut patch, &mut patched))?;
    let patched = rows(patched.0.remove(&pattern_at).flatten())?;
    let (clean, corrupted) = match request.direction {
        Direction::Denoising => (source_rows, target_rows),
        Direction::Noising => (target_rows, source_rows),
    };
    Ok(HeadPatterns {
        request: request.clone(),
        query_heads,
        clean,
        corrupted,
        patched,
    })
}
