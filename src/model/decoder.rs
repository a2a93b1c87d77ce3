//! One hookable decoder for every family ([`super::config::Family`]): what sets them apart (norms,
//! MLP, positions, attention variants) is data in [`ArchConfig`], their weight names in
//! [`super::families`].
//!
//! candle-transformers' models expose no hooks and return last-position logits only, so we own the
//! forward pass. It is shaped for activation patching:
//! - every named site (resid_pre, attn_out, resid_mid, mlp_out, resid_post) goes through a
//!   [`Hooks`] visitor that may read or replace the activation, per batch row and position;
//! - a forward may start at any layer, from hidden states at absolute positions `offset..`, attending
//!   to a cached key/value prefix for positions `< offset` (what a patch at (L, P) needs to recompute
//!   only its causal cone);
//! - only the last position goes through the final norm and the unembedding.
//!
//! The packed forwards the fast schedule runs (many cones at once, baselines sharing a prefix) are
//! in [`super::cones`]; the attention computations in [`super::attention`]; the layers' weights in
//! [`super::layers`].

use std::sync::RwLock;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::{ArchConfig, AttentionKind};
use super::kernels::skinny::linear as linear_fwd;
use super::layers::{Layer, Norm, causal_mask, rope_tables};
use crate::error::{Error, Result};

/// A place in the forward pass whose activation can be read or overwritten. Names follow
/// TransformerLens (`blocks.{L}.hook_resid_pre`, `blocks.{L}.attn.hook_z` and so on). The residual
/// sites are `[batch, seq, hidden]`; the attention's own are per head, as each variant says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// The residual stream entering layer L (= resid_post of layer L−1; the embeddings for L = 0).
    ResidPre,
    /// The attention block's output, after o_proj, before it is added to the residual stream.
    AttnOut,
    /// The residual stream between attention and MLP.
    ResidMid,
    /// The MLP block's output, before it is added to the residual stream.
    MlpOut,
    /// The residual stream leaving layer L: the decoder layer's output.
    ResidPost,
    /// Queries after QK-norm and RoPE, `[batch, heads, seq, head_dim]`.
    Q,
    /// Keys after QK-norm and RoPE, `[batch, kv_heads, seq, head_dim]` (this forward's positions).
    K,
    /// Values, `[batch, kv_heads, seq, head_dim]` (this forward's positions).
    V,
    /// Attention probabilities, `[batch, heads, seq, offset + seq]` (queries × key positions).
    Pattern,
    /// Every head's output before o_proj, `[batch, seq, heads * head_dim]` (head h: columns
    /// `h * head_dim..`).
    Z,
}

/// Reads or overwrites activations at [`Site`]s during a forward pass.
pub trait Hooks {
    /// Called with the activation `x` (`[batch, seq, hidden]`) at `site` of `layer`. Sequence index
    /// 0 of `x` is absolute token position `offset`. Returns the activation the forward continues with.
    fn visit(&mut self, site: Site, layer: usize, offset: usize, x: Tensor) -> Result<Tensor>;
}

/// Hooks that change nothing.
pub struct NoHooks;

impl Hooks for NoHooks {
    fn visit(&mut self, _: Site, _: usize, _: usize, x: Tensor) -> Result<Tensor> {
        Ok(x)
    }
}

/// One layer's attention internals for a whole prompt (batch 1), per head.
#[derive(Debug, Clone)]
pub struct HeadActivations {
    /// Queries after QK-norm and RoPE, `[heads, seq, head_dim]`.
    pub q: Tensor,
    /// Keys after QK-norm and RoPE, `[kv_heads, seq, head_dim]`.
    pub k: Tensor,
    /// Values, `[kv_heads, seq, head_dim]`.
    pub v: Tensor,
    /// Attention probabilities, `[heads, seq, seq]`.
    pub pattern: Tensor,
    /// Head outputs (o_proj's input split by head), `[heads, seq, head_dim]`.
    pub z: Tensor,
    /// o_proj's output, `[seq, hidden]`: the attention output before Gemma's post-attention norm.
    pub o: Tensor,
}

/// Records the attention sites of one layer.
#[derive(Default)]
struct RecordHeads {
    q: Option<Tensor>,
    k: Option<Tensor>,
    v: Option<Tensor>,
    pattern: Option<Tensor>,
    z: Option<Tensor>,
}

impl Hooks for RecordHeads {
    fn visit(&mut self, site: Site, _: usize, _: usize, x: Tensor) -> Result<Tensor> {
        let slot = match site {
            Site::Q => &mut self.q,
            Site::K => &mut self.k,
            Site::V => &mut self.v,
            Site::Pattern => &mut self.pattern,
            Site::Z => &mut self.z,
            _ => return Ok(x),
        };
        *slot = Some(x.clone());
        Ok(x)
    }
}

/// Keys and values of one layer, after RoPE (and QK-norm), `[batch, kv_heads, seq, head_dim]`.
#[derive(Debug, Clone)]
pub struct LayerKv {
    pub k: Tensor,
    pub v: Tensor,
}

/// Where a forward starts and what it may attend to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Span<'a> {
    /// The first layer to run; the input is that layer's resid_pre.
    pub start_layer: usize,
    /// Absolute position of the input's first token.
    pub offset: usize,
    /// Keys/values for positions `0..offset`, one entry per layer (batch 1 or the input's batch).
    pub prefix: Option<&'a [LayerKv]>,
    /// Keep every layer's keys/values (for the whole sequence, prefix included) in the output.
    pub keep_kv: bool,
}

/// What a forward returns.
#[derive(Debug)]
pub struct Forward {
    /// Logits at the last position, `[batch, vocab]`, f32.
    pub last_logits: Tensor,
    /// Per-layer keys/values when [`Span::keep_kv`] was set (entries before `start_layer` are absent).
    pub kv: Vec<LayerKv>,
}

/// RoPE tables are built for this many positions at load, and grown (doubling) when a prompt needs more.
const ROPE_INITIAL_POSITIONS: usize = 512;

/// RoPE cos/sin tables `[positions, head_dim / 2]` in the model's dtype.
pub(super) struct RopeTables {
    positions: usize,
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    fn new(cfg: &ArchConfig, kind: AttentionKind, positions: usize, device: &Device, dtype: DType) -> Result<Self> {
        let (cos, sin) = match (kind, cfg.local_rope_theta) {
            (AttentionKind::Local, Some(theta)) => rope_tables(
                cfg.rotary_dim,
                theta,
                &super::config::RopeScaling::Default,
                positions,
                device,
            )?,
            _ => rope_tables(cfg.rotary_dim, cfg.rope_theta, &cfg.rope_scaling, positions, device)?,
        };
        Ok(Self {
            positions,
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
        })
    }
}

/// A decoder-only transformer with hooks.
pub struct Transformer {
    pub(super) cfg: ArchConfig,
    /// Token embeddings, `[vocab, hidden]`.
    pub(super) embed_weight: Tensor,
    /// Learned position embeddings, `[positions, hidden]` (GPT-2).
    pub(super) position_weight: Option<Tensor>,
    /// The embedding scale as a scalar of the model's dtype (Gemma).
    embedding_scale: Option<Tensor>,
    pub(super) layers: Vec<Layer>,
    pub(super) final_norm: Norm,
    /// The unembedding, `[vocab, hidden]` (the embeddings when tied).
    pub(super) lm_head: Linear,
    /// RoPE tables for the positions used so far, global layers' then local layers' (grown on
    /// demand: a checkpoint's `max_position_embeddings` may be far more than any prompt needs).
    rope: [RwLock<RopeTables>; 2],
    pub(super) device: Device,
    pub(super) dtype: DType,
}

impl Transformer {
    /// Builds the decoder from weights named as in an HF checkpoint of `cfg`'s family.
    pub fn new(cfg: &ArchConfig, vb: VarBuilder) -> Result<Self> {
        let weights = super::families::load(cfg, vb.clone())?;
        let positions = ROPE_INITIAL_POSITIONS.min(cfg.max_position_embeddings);
        let tables = |kind| -> Result<RwLock<RopeTables>> {
            Ok(RwLock::new(RopeTables::new(
                cfg,
                kind,
                positions,
                vb.device(),
                vb.dtype(),
            )?))
        };
        let embedding_scale = cfg
            .embedding_scale
            .map(|s| Tensor::new(s as f32, vb.device())?.to_dtype(vb.dtype()))
            .transpose()?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_weight: weights.embed,
            position_weight: weights.positions,
            embedding_scale,
            layers: weights.layers,
            final_norm: weights.final_norm,
            lm_head: Linear::new(weights.lm_head, None),
            rope: [tables(AttentionKind::Global)?, tables(AttentionKind::Local)?],
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Logits, f32, for final-normed hidden states `[rows, hidden]`.
    fn unembed(&self, normed: &Tensor) -> Result<Tensor> {
        Ok(linear_fwd(&self.lm_head, normed)?.to_dtype(DType::F32)?)
    }

    /// The architecture this decoder was built for.
    pub fn config(&self) -> &ArchConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Token embeddings, `[batch, seq, hidden]`, for equally long rows of token ids at positions
    /// `0..seq` (with learned positions and the embedding scale where the family has them).
    pub fn embed(&self, rows: &[&[u32]]) -> Result<Tensor> {
        let seq = rows.first().map_or(0, |r| r.len());
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let positions: Vec<u32> = (0..rows.len()).flat_map(|_| 0..seq as u32).collect();
        Ok(self
            .embed_at(&flat, &positions)?
            .reshape((rows.len(), seq, self.cfg.hidden_size))?)
    }

    /// Embeddings `[tokens, hidden]` of token `ids` at absolute `positions` (one each).
    pub(super) fn embed_at(&self, ids: &[u32], positions: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let n = ids.len();
        let x = self
            .embed_weight
            .index_select(&Tensor::from_vec(ids.to_vec(), n, &self.device)?, 0)?;
        let x = match &self.embedding_scale {
            Some(scale) => x.broadcast_mul(scale)?,
            None => x,
        };
        Ok(match &self.position_weight {
            Some(wpe) => {
                if let Some(&bad) = positions.iter().find(|&&p| p as usize >= wpe.dim(0).unwrap_or(0)) {
                    return Err(Error::Input(format!(
                        "position {bad} is past this model's {} learned positions",
                        self.cfg.max_position_embeddings
                    )));
                }
                (x + wpe.index_select(&Tensor::from_vec(positions.to_vec(), n, &self.device)?, 0)?)?
            }
            None => x,
        })
    }

    /// Runs layers `span.start_layer..` on `hidden` (that layer's resid_pre, `[batch, seq, hidden]`),
    /// calling `hooks` at every site, and returns last-position logits.
    pub fn forward(&self, hidden: Tensor, span: Span, hooks: &mut dyn Hooks) -> Result<Forward> {
        let (batch, seq, _) = hidden.dims3()?;
        let masks = [
            causal_mask(seq, span.offset, None, &self.device, self.dtype)?,
            causal_mask(seq, span.offset, self.cfg.sliding_window, &self.device, self.dtype)?,
        ];
        let mut kv_out = Vec::new();
        let mut x = hidden;
        for (l, layer) in self.layers.iter().enumerate().skip(span.start_layer) {
            x = hooks.visit(Site::ResidPre, l, span.offset, x)?;
            let kind = self.cfg.layer_kinds[l] as usize;
            let (cos, sin) = self.rope(l, span.offset + seq)?;
            let (cos, sin) = (cos.narrow(0, span.offset, seq)?, sin.narrow(0, span.offset, seq)?);
            let normed = layer.attn_norm.forward(&x)?;
            let at = super::attention::At {
                layer: l,
                offset: span.offset,
                prefix: span.prefix.map(|p| &p[l]),
                batch,
            };
            let (o, kv) = self.attention(&layer.attn, &normed, &cos, &sin, masks[kind].as_ref(), at, hooks)?;
            let attn = hooks.visit(Site::AttnOut, l, span.offset, self.attn_post(l, o)?)?;
            let mid = hooks.visit(Site::ResidMid, l, span.offset, (&x + attn)?)?;
            let mlp_in = if self.cfg.parallel_residual { &x } else { &mid };
            let mlp = hooks.visit(
                Site::MlpOut,
                l,
                span.offset,
                layer.mlp.forward(&layer.mlp_norm.forward(mlp_in)?)?,
            )?;
            x = hooks.visit(Site::ResidPost, l, span.offset, (mid + mlp)?)?;
            if span.keep_kv {
                kv_out.push(kv);
            }
        }
        let last = x.narrow(1, seq - 1, 1)?.squeeze(1)?.contiguous()?;
        let last_logits = self.final_logits(&last)?;
        Ok(Forward {
            last_logits,
            kv: kv_out,
        })
    }

    fn layer(&self, layer: usize) -> Result<&Layer> {
        self.layers
            .get(layer)
            .ok_or_else(|| Error::Internal(format!("layer {layer} out of range")))
    }

    /// The attention block's output as it joins the residual stream, from o_proj's output `o`:
    /// Gemma's post-attention norm, else `o` itself.
    pub fn attn_post(&self, layer: usize, o: Tensor) -> Result<Tensor> {
        match &self.layer(layer)?.attn.post_norm {
            Some(norm) => norm.forward(&o),
            None => Ok(o),
        }
    }

    /// resid_post of `layer` from its resid_mid (`[.., hidden]`): adds the MLP block's output. Lets a
    /// sweep patch resid_mid without rerunning the layer's attention. Not for a parallel residual,
    /// whose MLP reads the layer's input (see [`ArchConfig::has_resid_mid`]).
    pub fn mlp_residual(&self, layer: usize, mid: &Tensor) -> Result<Tensor> {
        if self.cfg.parallel_residual {
            return Err(Error::Internal(
                "resid_mid of a parallel-residual layer feeds no MLP".into(),
            ));
        }
        let l = self.layer(layer)?;
        Ok((mid + l.mlp.forward(&l.mlp_norm.forward(mid)?)?)?)
    }

    /// resid_post of `layer` from its resid_pre and its attention output `attn` (as it joins the
    /// residual stream), rows `[.., hidden]` at the same positions: lets a sweep patch attn_out, or
    /// heads, without rerunning the rest of the layer's attention.
    pub fn attn_residual(&self, layer: usize, pre: &Tensor, attn: &Tensor) -> Result<Tensor> {
        let l = self.layer(layer)?;
        let mid = (pre + attn)?;
        let mlp_in = if self.cfg.parallel_residual { pre } else { &mid };
        Ok((&mid + l.mlp.forward(&l.mlp_norm.forward(mlp_in)?)?)?)
    }

    /// Layer `layer`'s attention internals for a whole prompt from its resid_pre (`[1, seq, hidden]`):
    /// what head-level patching reads from the source run and the run it patches.
    pub fn head_activations(&self, layer: usize, resid_pre: &Tensor) -> Result<HeadActivations> {
        let l = self.layer(layer)?;
        let seq = resid_pre.dim(1)?;
        let mask = causal_mask(seq, 0, self.cfg.window(layer), &self.device, self.dtype)?;
        let (cos, sin) = self.rope(layer, seq)?;
        let (cos, sin) = (cos.narrow(0, 0, seq)?, sin.narrow(0, 0, seq)?);
        let normed = l.attn_norm.forward(resid_pre)?;
        let mut record = RecordHeads::default();
        let at = super::attention::At {
            layer,
            offset: 0,
            prefix: None,
            batch: 1,
        };
        let (o, _) = self.attention(&l.attn, &normed, &cos, &sin, mask.as_ref(), at, &mut record)?;
        let take = |t: Option<Tensor>| t.ok_or_else(|| Error::Internal("an attention site was not visited".into()));
        let z = take(record.z)?; // [1, seq, heads * hd]
        Ok(HeadActivations {
            q: take(record.q)?.squeeze(0)?,
            k: take(record.k)?.squeeze(0)?,
            v: take(record.v)?.squeeze(0)?,
            pattern: take(record.pattern)?.squeeze(0)?,
            z: z.reshape((seq, self.cfg.num_heads, self.cfg.head_dim))?
                .transpose(0, 1)?
                .contiguous()?,
            o: o.squeeze(0)?,
        })
    }

    /// Attention of per-head queries `q` over keys and values `k`, `v` (each `[n, seq, head_dim]`,
    /// a whole prompt from position 0) with layer `layer`'s scaling, softcap and window: the head
    /// outputs, `[n, seq, head_dim]`.
    pub fn attend_heads(&self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let seq = q.dim(1)?;
        let scores = super::attention::softcap(
            (q.matmul(&k.t()?.contiguous()?)? * self.cfg.attention_scale)?,
            self.cfg.attn_softcap,
        )?;
        let scores = match causal_mask(seq, 0, self.cfg.window(layer), &self.device, self.dtype)? {
            Some(mask) => scores.broadcast_add(&mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?;
        Ok(probs.matmul(&v.contiguous()?)?)
    }

    /// Layer `layer`'s o_proj weight split by head, `[heads, head_dim, hidden]`: head h's output
    /// `z_h` (`[.., head_dim]`) adds `z_h · W[h]` to o_proj's output.
    pub fn o_proj_by_head(&self, layer: usize) -> Result<Tensor> {
        let l = self.layer(layer)?;
        let (heads, hd) = (self.cfg.num_heads, self.cfg.head_dim);
        // weight: [hidden, heads * hd] → [heads, hd, hidden].
        Ok(l.attn
            .o_proj
            .weight()
            .t()?
            .reshape((heads, hd, self.cfg.hidden_size))?
            .contiguous()?)
    }

    /// RoPE cos/sin tables for `layer` (its kind's base) covering at least positions
    /// `0..positions` (more rows are fine: callers narrow or index them), built once and grown as
    /// prompts need.
    pub(super) fn rope(&self, layer: usize, positions: usize) -> Result<(Tensor, Tensor)> {
        let kind = self
            .cfg
            .layer_kinds
            .get(layer)
            .copied()
            .unwrap_or(AttentionKind::Global);
        let lock = &self.rope[kind as usize];
        let poisoned = || Error::Internal("the RoPE tables' lock is poisoned".into());
        {
            let tables = lock.read().map_err(|_| poisoned())?;
            if tables.positions >= positions {
                return Ok((tables.cos.clone(), tables.sin.clone()));
            }
        }
        let mut tables = lock.write().map_err(|_| poisoned())?;
        if tables.positions < positions {
            let grown = positions
                .next_power_of_two()
                .min(self.cfg.max_position_embeddings.max(positions));
            *tables = RopeTables::new(&self.cfg, kind, grown, &self.device, self.dtype)?;
        }
        Ok((tables.cos.clone(), tables.sin.clone()))
    }

    /// Logits, `[rows, vocab]` f32, of last-layer residual streams `[rows, hidden]`: the final norm,
    /// the unembedding and, for Gemma 2, the final softcap (the logit difference is taken after it,
    /// as HF does).
    pub fn final_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let normed = self.final_norm.forward(hidden)?;
        let logits = self.unembed(&normed)?;
        Ok(match self.cfg.final_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }
}
