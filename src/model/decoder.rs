//! One hookable decoder for the Llama, Qwen2 and Qwen3 families.
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

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::config::ArchConfig;
use super::kernels::skinny::linear as linear_fwd;
use super::layers::{Attention, Layer, Mlp, causal_mask, linear, rope_tables, rows_of, stacked_linear};
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
    fn new(cfg: &ArchConfig, positions: usize, device: &Device, dtype: DType) -> Result<Self> {
        let (cos, sin) = rope_tables(cfg, positions, device)?;
        Ok(Self {
            positions,
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
        })
    }
}

/// A decoder-only transformer with hooks. Weights use the HF checkpoint names.
pub struct Transformer {
    pub(super) cfg: ArchConfig,
    pub(super) embed_tokens: Embedding,
    pub(super) layers: Vec<Layer>,
    pub(super) norm: Tensor,
    /// The unembedding, `[vocab, hidden]` (the embeddings when tied).
    pub(super) lm_head: Linear,
    /// RoPE tables for the positions used so far (grown on demand: a checkpoint's
    /// `max_position_embeddings` may be far more than any prompt needs).
    rope: RwLock<RopeTables>,
    pub(super) device: Device,
    pub(super) dtype: DType,
}

impl Transformer {
    /// Builds the decoder from weights named as in an HF checkpoint (`model.layers.0.self_attn.q_proj.weight`, …).
    pub fn new(cfg: &ArchConfig, vb: VarBuilder) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let vbm = vb.pp("model");
        let embed_weight = vbm.get((cfg.vocab_size, d), "embed_tokens.weight")?;
        let embed_tokens = Embedding::new(embed_weight.clone(), d);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let vbl = vbm.pp(format!("layers.{i}"));
            let va = vbl.pp("self_attn");
            let qkv_proj = stacked_linear(
                d,
                &[
                    (cfg.num_heads * hd, va.pp("q_proj")),
                    (cfg.num_kv_heads * hd, va.pp("k_proj")),
                    (cfg.num_kv_heads * hd, va.pp("v_proj")),
                ],
            )?;
            let attn = Attention {
                q_proj: rows_of(&qkv_proj, 0, cfg.num_heads * hd)?,
                kv_proj: rows_of(&qkv_proj, cfg.num_heads * hd, 2 * cfg.num_kv_heads * hd)?,
                qkv_proj,
                o_proj: linear(cfg.num_heads * hd, d, va.pp("o_proj"))?,
                q_norm: if cfg.qk_norm() {
                    Some(va.get(hd, "q_norm.weight")?)
                } else {
                    None
                },
                k_norm: if cfg.qk_norm() {
                    Some(va.get(hd, "k_norm.weight")?)
                } else {
                    None
                },
            };
            let vm = vbl.pp("mlp");
            let mlp = Mlp {
                gate_proj: linear(d, cfg.intermediate_size, vm.pp("gate_proj"))?,
                up_proj: linear(d, cfg.intermediate_size, vm.pp("up_proj"))?,
                down_proj: linear(cfg.intermediate_size, d, vm.pp("down_proj"))?,
            };
            layers.push(Layer {
                input_layernorm: vbl.get(d, "input_layernorm.weight")?,
                attn,
                post_attention_layernorm: vbl.get(d, "post_attention_layernorm.weight")?,
                mlp,
            });
        }
        let norm = vbm.get(d, "norm.weight")?;
        // Tied checkpoints usually omit lm_head.weight; use the embeddings then.
        let lm_head = if !cfg.tie_word_embeddings && vb.contains_tensor("lm_head.weight") {
            vb.get((cfg.vocab_size, d), "lm_head.weight")?
        } else {
            embed_weight
        };
        let rope = RopeTables::new(
            cfg,
            ROPE_INITIAL_POSITIONS.min(cfg.max_position_embeddings),
            vb.device(),
            vb.dtype(),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head: Linear::new(lm_head, None),
            rope: RwLock::new(rope),
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

    /// Token embeddings, `[batch, seq, hidden]`, for equally long rows of token ids.
    pub fn embed(&self, rows: &[&[u32]]) -> Result<Tensor> {
        let seq = rows.first().map_or(0, |r| r.len());
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let ids = Tensor::from_vec(flat, (rows.len(), seq), &self.device)?;
        Ok(self.embed_tokens.forward(&ids)?)
    }

    /// Runs layers `span.start_layer..` on `hidden` (that layer's resid_pre, `[batch, seq, hidden]`),
    /// calling `hooks` at every site, and returns last-position logits.
    pub fn forward(&self, hidden: Tensor, span: Span, hooks: &mut dyn Hooks) -> Result<Forward> {
        let (batch, seq, _) = hidden.dims3()?;
        let mask = causal_mask(seq, span.offset, &self.device, self.dtype)?;
        let (cos, sin) = self.rope(span.offset + seq)?;
        let (cos, sin) = (cos.narrow(0, span.offset, seq)?, sin.narrow(0, span.offset, seq)?);
        let mut kv_out = Vec::new();
        let mut x = hidden;
        for (l, layer) in self.layers.iter().enumerate().skip(span.start_layer) {
            x = hooks.visit(Site::ResidPre, l, span.offset, x)?;
            let prefix = span.prefix.map(|p| &p[l]);
            let normed = candle_nn::ops::rms_norm(&x, &layer.input_layernorm, self.cfg.rms_norm_eps as f32)?;
            let at = super::attention::At {
                layer: l,
                offset: span.offset,
                prefix,
                batch,
            };
            let (attn, kv) = self.attention(&layer.attn, &normed, &cos, &sin, mask.as_ref(), at, hooks)?;
            let attn = hooks.visit(Site::AttnOut, l, span.offset, attn)?;
            let mid = hooks.visit(Site::ResidMid, l, span.offset, (x + attn)?)?;
            let mlp = layer
                .mlp
                .forward(&mid, &layer.post_attention_layernorm, self.cfg.rms_norm_eps as f32)?;
            let mlp = hooks.visit(Site::MlpOut, l, span.offset, mlp)?;
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

    /// resid_post of `layer` from its resid_mid (`[.., hidden]`): adds the MLP block's output. Lets a
    /// sweep patch attn_out at one position without rerunning the layer's attention.
    pub fn mlp_residual(&self, layer: usize, mid: &Tensor) -> Result<Tensor> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::Internal(format!("layer {layer} out of range")))?;
        let mlp = l
            .mlp
            .forward(mid, &l.post_attention_layernorm, self.cfg.rms_norm_eps as f32)?;
        Ok((mid + mlp)?)
    }

    /// Layer `layer`'s attention internals for a whole prompt from its resid_pre (`[1, seq, hidden]`):
    /// what head-level patching reads from the source run and the run it patches.
    pub fn head_activations(&self, layer: usize, resid_pre: &Tensor) -> Result<HeadActivations> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::Internal(format!("layer {layer} out of range")))?;
        let seq = resid_pre.dim(1)?;
        let mask = causal_mask(seq, 0, &self.device, self.dtype)?;
        let (cos, sin) = self.rope(seq)?;
        let (cos, sin) = (cos.narrow(0, 0, seq)?, sin.narrow(0, 0, seq)?);
        let normed = candle_nn::ops::rms_norm(resid_pre, &l.input_layernorm, self.cfg.rms_norm_eps as f32)?;
        let mut record = RecordHeads::default();
        let at = super::attention::At {
            layer,
            offset: 0,
            prefix: None,
            batch: 1,
        };
        self.attention(&l.attn, &normed, &cos, &sin, mask.as_ref(), at, &mut record)?;
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
        })
    }

    /// Layer `layer`'s o_proj weight split by head, `[heads, head_dim, hidden]`: head h's output
    /// `z_h` (`[.., head_dim]`) adds `z_h · W[h]` to the attention output.
    pub fn o_proj_by_head(&self, layer: usize) -> Result<Tensor> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::Internal(format!("layer {layer} out of range")))?;
        let (heads, hd) = (self.cfg.num_heads, self.cfg.head_dim);
        // weight: [hidden, heads * hd] → [heads, hd, hidden].
        Ok(l.attn
            .o_proj
            .weight()
            .t()?
            .reshape((heads, hd, self.cfg.hidden_size))?
            .contiguous()?)
    }

    /// RoPE cos/sin tables covering at least positions `0..positions` (more rows are fine: callers
    /// narrow or index them), built once and grown as prompts need.
    pub(super) fn rope(&self, positions: usize) -> Result<(Tensor, Tensor)> {
        let poisoned = || Error::Internal("the RoPE tables' lock is poisoned".into());
        {
            let tables = self.rope.read().map_err(|_| poisoned())?;
            if tables.positions >= positions {
                return Ok((tables.cos.clone(), tables.sin.clone()));
            }
        }
        let mut tables = self.rope.write().map_err(|_| poisoned())?;
        if tables.positions < positions {
            let grown = positions
                .next_power_of_two()
                .min(self.cfg.max_position_embeddings.max(positions));
            *tables = RopeTables::new(&self.cfg, grown, &self.device, self.dtype)?;
        }
        Ok((tables.cos.clone(), tables.sin.clone()))
    }

    /// Logits, `[rows, vocab]` f32, of last-layer residual streams `[rows, hidden]`: the final norm
    /// and the unembedding.
    pub fn final_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let normed = candle_nn::ops::rms_norm(hidden, &self.norm, self.cfg.rms_norm_eps as f32)?;
        self.unembed(&normed)
    }
}
