//! The fast schedule's head cells: a patched query, key, value, pattern or head output at layer L
//! changes only layer L's attention output, and only at the positions it reaches. So a cell's
//! cone starts at layer L + 1 from layer L's resid_post, recomputed where the attention output
//! changed: o_proj's output becomes `o + Σ_h (z'_h − z_h) · W_O[h]`, then (Gemma) the
//! post-attention norm, the residual add and the layer's MLP.
//!
//! Per layer, both runs' attention internals are computed once ([`Transformer::head_activations`])
//! and kept while the schedule works through that layer's cells (late layers first).

use candle_core::Tensor;

use super::Component;
use super::layout::CellAt;
use crate::error::{Error, Result};
use crate::model::{HeadActivations, Transformer};

/// One layer's data for its head cells.
struct LayerHeads {
    layer: usize,
    source: HeadActivations,
    target: HeadActivations,
    /// o_proj split by head, `[heads, head_dim, hidden]`.
    w_o: Tensor,
    /// head_out, head_q, head_pattern: the change in the attention output when head h's component
    /// is patched at every position, `[heads, seq, hidden]`; a by-position cell takes one row.
    delta: Option<Tensor>,
}

/// Computes the patched resid_mid rows of head cells, one layer's internals at a time.
pub(super) struct HeadPatcher<'a> {
    t: &'a Transformer,
    component: Component,
    /// Each layer's resid_pre in the source and target runs, `[seq, hidden]`.
    source_pre: &'a [Tensor],
    target_pre: &'a [Tensor],
    first_diff: usize,
    current: Option<LayerHeads>,
}

/// Key/value heads `[kv_heads, seq, hd]` repeated for their query heads, `[heads, seq, hd]`.
fn per_query_head(kv: &Tensor, heads: usize) -> Result<Tensor> {
    let (kv_heads, seq, hd) = kv.dims3()?;
    let rep = heads / kv_heads.max(1);
    Ok(kv
        .unsqueeze(1)?
        .broadcast_as((kv_heads, rep, seq, hd))?
        .reshape((heads, seq, hd))?)
}

/// Σ over heads of `dz` (`[n, seq, hd]`) through their o_proj slices `w_o` (`[n, hd, hidden]`),
/// per head: `[n, seq, hidden]`.
fn through_o_proj(dz: &Tensor, w_o: &Tensor) -> Result<Tensor> {
    Ok(dz.contiguous()?.matmul(w_o)?)
}

impl<'a> HeadPatcher<'a> {
    pub(super) fn new(
        t: &'a Transformer,
        component: Component,
        source_pre: &'a [Tensor],
        target_pre: &'a [Tensor],
        first_diff: usize,
    ) -> Self {
        Self {
            t,
            component,
            source_pre,
            target_pre,
            first_diff,
            current: None,
        }
    }

    /// The first position a cell's patch changes: its own, or the first differing token when it
    /// patches every position (earlier ones are the same in both runs).
    pub(super) fn offset(&self, at: CellAt) -> usize {
        at.position.unwrap_or(self.first_diff)
    }

    /// Makes `layer`'s internals current.
    fn layer(&mut self, layer: usize) -> Result<&LayerHeads> {
        if self.current.as_ref().is_none_or(|c| c.layer != layer) {
            self.current = None; // free the previous layer's first
            let t = self.t;
            let source = t.head_activations(layer, &self.source_pre[layer].unsqueeze(0)?)?;
            let target = t.head_activations(layer, &self.target_pre[layer].unsqueeze(0)?)?;
            let w_o = t.o_proj_by_head(layer)?;
            let heads = t.config().num_heads;
            let patched_z = match self.component {
                Component::HeadOut => Some(source.z.clone()),
                Component::HeadQ => Some(t.attend_heads(
                    layer,
                    &source.q,
                    &per_query_head(&target.k, heads)?,
                    &per_query_head(&target.v, heads)?,
                )?),
                Component::HeadPattern => Some(
                    source
                        .pattern
                        .matmul(&per_query_head(&target.v, heads)?.contiguous()?)?,
                ),
                _ => None,
            };
            let delta = patched_z.map(|z| through_o_proj(&(z - &target.z)?, &w_o)).transpose()?;
            self.current = Some(LayerHeads {
                layer,
                source,
                target,
                w_o,
                delta,
            });
        }
        self.current
            .as_ref()
            .ok_or_else(|| Error::Internal("no head layer computed".into()))
    }

    /// The target run's o_proj output at positions `offset(at)..` with the cell's patch applied:
    /// `[seq − offset, hidden]` for patches whose effect reaches every later position (keys,
    /// values, every-position patches), `[1, hidden]` for one position's query, pattern or output.
    pub(super) fn patched_o(&mut self, at: CellAt) -> Result<Tensor> {
        let (Some(head), offset) = (at.head, self.offset(at)) else {
            return Err(Error::Internal(format!("a head cell without a head: {at:?}")));
        };
        let component = self.component;
        let t = self.t;
        let heads = t.config().num_heads;
        let data = self.layer(at.layer)?;
        let target_o = data.target.o.clone();
        let seq = target_o.dim(0)?;
        let change = if let Some(delta) = &data.delta {
            let rows = if at.position.is_some() { 1 } else { seq - offset };
            delta.get(head)?.narrow(0, offset, rows)?
        } else {
            // head_k / head_v: key/value head `head` replaced at the patched positions; the query
            // heads it serves attend again.
            let kv_heads = data.target.k.dim(0)?;
            let rep = heads / kv_heads.max(1);
            let mask: Vec<u8> = (0..seq)
                .map(|p| u8::from(at.position.map_or(p >= offset, |q| q == p)))
                .collect();
            let mask = Tensor::from_vec(mask, (seq, 1), t.device())?;
            let pick = |source: &Tensor, target: &Tensor| -> Result<Tensor> {
                let (s, t) = (source.get(head)?, target.get(head)?);
                Ok(mask.broadcast_as(t.shape())?.where_cond(&s, &t)?)
            };
            let (mut k, mut v) = (data.target.k.get(head)?, data.target.v.get(head)?);
            if component == Component::HeadK {
                k = pick(&data.source.k, &data.target.k)?;
            } else {
                v = pick(&data.source.v, &data.target.v)?;
            }
            let hd = k.dim(1)?;
            let expand = |x: &Tensor| x.unsqueeze(0)?.broadcast_as((rep, seq, hd));
            let q = data.target.q.narrow(0, head * rep, rep)?;
            let z = t.attend_heads(at.layer, &q, &expand(&k)?, &expand(&v)?)?;
            let dz = (z - data.target.z.narrow(0, head * rep, rep)?)?;
            through_o_proj(&dz, &data.w_o.narrow(0, head * rep, rep)?.contiguous()?)?
                .sum(0)?
                .narrow(0, offset, seq - offset)?
        };
        let rows = change.dim(0)?;
        Ok((target_o.narrow(0, offset, rows)? + change)?)
    }
}
