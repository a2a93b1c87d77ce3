//! One hookable decoder for the Llama, Qwen2 and Qwen3 families.
//!
//! candle-transformers' models expose no hooks and return last-position logits only, so we own the
//! forward pass. It is shaped for activation patching:
//! - every named site (resid_pre, attn_out, resid_mid, mlp_out, resid_post) goes through a
//!   [`Hooks`] visitor that may read or replace the activation, per batch row and position;
//! - a forward may start at any layer, from hidden states at absolute positions `offset..`, attending
//!   to a cached key/value prefix for positions `< offset` (what a patch at (L, P) needs to recompute
//!   only its causal cone);
//! - [`Transformer::forward_cones`] packs many such cones (each its own start layer and positions)
//!   into one pass, so a whole block of patching cells shares every weight read;
//! - [`Transformer::forward_shared_prefix`] runs prompts that share their first tokens (a sweep's
//!   clean and corrupted baselines) computing those tokens once;
//! - only the last position goes through the final norm and the unembedding.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::config::{ArchConfig, RopeScaling};
use super::skinny::linear as linear_fwd;
use crate::error::{Error, Result};

/// A place in the forward pass whose activation can be read or overwritten. Names follow
/// TransformerLens (`blocks.{L}.hook_resid_pre` and so on). Each is `[batch, seq, hidden]`.
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

/// The causal cone of one patch, for [`Transformer::forward_cones`]: everything a change to the
/// residual stream at position `offset` entering layer `start_layer` can affect.
#[derive(Debug, Clone)]
pub struct Cone {
    /// The first layer to run; `num_layers` runs none (only the final norm and unembedding).
    pub start_layer: usize,
    /// Absolute position of the cone's first token.
    pub offset: usize,
    /// `start_layer`'s resid_pre at positions `offset..`, `[seq, hidden]`, with the patch written in.
    pub hidden: Tensor,
}

/// Where one cone's tokens sit in the packed `[tokens, hidden]` activations of a cone forward.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Index into the caller's cones.
    cone: usize,
    /// First packed row.
    row: usize,
    /// Number of tokens.
    len: usize,
    /// Absolute position of the first token.
    offset: usize,
}

/// Where a packed forward's tokens find the keys and values before their segment's offset.
#[derive(Clone, Copy)]
enum Prefix<'a> {
    /// A cache from an earlier forward, `[1, kv_heads, len, head_dim]`.
    Cached(&'a LayerKv),
    /// The first `len` packed rows of this same forward: positions `0..len`, shared by every
    /// segment that starts at `len`.
    Packed(usize),
}

/// One layer of a packed forward: its activations, `[rows, ..]` in the packed row order, and
/// the keys and values of every packed token (after RoPE and QK-norm), `[tokens, kv_heads, hd]`.
struct PackedLayer {
    attn_out: Tensor,
    resid_mid: Tensor,
    mlp_out: Tensor,
    resid_post: Tensor,
    k: Tensor,
    v: Tensor,
}

/// What [`Transformer::forward_shared_prefix`] returns, for each of its prompts.
#[derive(Debug)]
pub struct PromptsForward {
    /// The last layer's residual stream at the last position, `[prompts, hidden]`: what
    /// [`Transformer::final_logits`] turns into logits (left to the caller, so that other rows can
    /// share that pass over the unembedding).
    pub last_hidden: Tensor,
    /// The activations at the sites asked for, per (site, layer), `[prompts, seq, hidden]`.
    pub acts: HashMap<(Site, usize), Tensor>,
    /// Every layer's keys and values, `[prompts, kv_heads, seq, head_dim]`.
    pub kv: Vec<LayerKv>,
}

struct Attention {
    /// q_proj, k_proj and v_proj stacked into one `[q + 2 kv, hidden]` matrix: one matmul instead of
    /// three small ones.
    qkv_proj: Linear,
    /// Views of `qkv_proj`'s rows: the queries alone, and keys and values together.
    q_proj: Linear,
    kv_proj: Linear,
    o_proj: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// The MLP block's output for the residual stream `mid` (post-attention norm included).
    fn forward(&self, mid: &Tensor, norm: &Tensor, eps: f32) -> Result<Tensor> {
        let normed = candle_nn::ops::rms_norm(mid, norm, eps)?;
        let gated = swiglu(
            &linear_fwd(&self.gate_proj, &normed)?,
            &linear_fwd(&self.up_proj, &normed)?,
        )?;
        linear_fwd(&self.down_proj, &gated)
    }
}

struct Layer {
    input_layernorm: Tensor,
    attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// A decoder-only transformer with hooks. Weights use the HF checkpoint names.
pub struct Transformer {
    cfg: ArchConfig,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    /// The unembedding, `[vocab, hidden]` (the embeddings when tied).
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
}

/// A linear layer with an optional bias: the bias is loaded when the checkpoint has one, which covers
/// Qwen2's qkv biases and Llama's `attention_bias`/`mlp_bias` without per-family switches.
fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if vb.contains_tensor("bias") {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// Several linear layers over the same input stacked into one (their rows concatenated, in order),
/// so one matmul computes all of them. Missing biases are zeros when any of them has one.
fn stacked_linear(in_dim: usize, parts: &[(usize, VarBuilder)]) -> Result<Linear> {
    let weights = parts
        .iter()
        .map(|(out_dim, vb)| Ok(vb.get((*out_dim, in_dim), "weight")?))
        .collect::<Result<Vec<_>>>()?;
    let any_bias = parts.iter().any(|(_, vb)| vb.contains_tensor("bias"));
    let bias = if any_bias {
        let biases = parts
            .iter()
            .map(|(out_dim, vb)| {
                Ok(if vb.contains_tensor("bias") {
                    vb.get(*out_dim, "bias")?
                } else {
                    Tensor::zeros(*out_dim, vb.dtype(), vb.device())?
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::cat(&biases, 0)?)
    } else {
        None
    };
    Ok(Linear::new(Tensor::cat(&weights, 0)?, bias))
}

/// Rows `start..start + len` of a linear layer's outputs, as a layer of its own (a view: the
/// weight rows are contiguous, nothing is copied).
fn rows_of(linear: &Linear, start: usize, len: usize) -> Result<Linear> {
    Ok(Linear::new(
        linear.weight().narrow(0, start, len)?,
        linear.bias().map(|b| b.narrow(0, start, len)).transpose()?,
    ))
}

/// silu(gate) · up, the SwiGLU MLP's activation. On the CPU in f32 one pass over both, spread over
/// the cores (candle's silu then multiply make two passes on one core).
fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fused = gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.shape() == up.shape()
        && gate.is_contiguous()
        && up.is_contiguous();
    if fused {
        Ok(gate.apply_op2_no_bwd(up, &SiluMul)?)
    } else {
        Ok((candle_nn::ops::silu(gate)? * up)?)
    }
}

/// The CPU kernel behind [`swiglu`].
struct SiluMul;

impl candle_core::CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &candle_core::CpuStorage,
        gate_layout: &candle_core::Layout,
        up: &candle_core::CpuStorage,
        up_layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        use rayon::prelude::*;
        let (CpuStorage::F32(gate), CpuStorage::F32(up)) = (gate, up) else {
            candle_core::bail!("silu-mul: f32 only");
        };
        let (Some((g0, g1)), Some((u0, u1))) = (gate_layout.contiguous_offsets(), up_layout.contiguous_offsets())
        else {
            candle_core::bail!("silu-mul: contiguous inputs only");
        };
        let (gate, up) = (&gate[g0..g1], &up[u0..u1]);
        if gate.len() != up.len() {
            candle_core::bail!("silu-mul: {} vs {} elements", gate.len(), up.len());
        }
        let mut out = vec![0f32; gate.len()];
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = super::fastmath::silu(g) * u;
                }
            });
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }
}

/// RoPE (HF's half-split rotation) on `x` `[1, tokens, heads, head_dim]` with per-token tables
/// `cos`/`sin` `[tokens, head_dim / 2]`. On the CPU in f32 spread over the tokens: candle's kernel
/// gives each batch row one thread, and a packed forward is a single row.
fn rope_thd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let own = x.device().is_cpu()
        && [x, cos, sin]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.is_contiguous())
        && x.dim(0)? == 1;
    if own {
        Ok(x.apply_op3_no_bwd(cos, sin, &RopeRows)?)
    } else {
        Ok(candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)?)
    }
}

/// The CPU kernel behind [`rope_thd`].
struct RopeRows;

impl candle_core::CustomOp3 for RopeRows {
    fn name(&self) -> &'static str {
        "rope-rows"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        x_layout: &candle_core::Layout,
        cos: &candle_core::CpuStorage,
        cos_layout: &candle_core::Layout,
        sin: &candle_core::CpuStorage,
        sin_layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        use rayon::prelude::*;
        let (CpuStorage::F32(x), CpuStorage::F32(cos), CpuStorage::F32(sin)) = (x, cos, sin) else {
            candle_core::bail!("rope-rows: f32 only");
        };
        let (Some((x0, x1)), Some((c0, c1)), Some((s0, s1))) = (
            x_layout.contiguous_offsets(),
            cos_layout.contiguous_offsets(),
            sin_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("rope-rows: contiguous inputs only");
        };
        let (x, cos, sin) = (&x[x0..x1], &cos[c0..c1], &sin[s0..s1]);
        let (_, tokens, heads, d) = x_layout.shape().dims4()?;
        let half = d / 2;
        let table = [tokens, half];
        if d % 2 != 0 || cos_layout.dims() != table || sin_layout.dims() != table {
            candle_core::bail!(
                "rope-rows: tables {:?} and {:?} for {tokens} tokens × head_dim {d}",
                cos_layout.dims(),
                sin_layout.dims()
            );
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(heads * d)
            .zip(x.par_chunks(heads * d))
            .zip(cos.par_chunks(half).zip(sin.par_chunks(half)))
            .with_min_len(16)
            .for_each(|((out, x), (cos, sin))| {
                for (out, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    let (o1, o2) = out.split_at_mut(half);
                    let (x1, x2) = x.split_at(half);
                    for i in 0..half {
                        o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                        o2[i] = x1[i] * sin[i] + x2[i] * cos[i];
                    }
                }
            });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
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
        let (cos, sin) = rope_tables(cfg, vb.device())?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head: Linear::new(lm_head, None),
            cos: cos.to_dtype(vb.dtype())?,
            sin: sin.to_dtype(vb.dtype())?,
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
        let cos = self.cos.narrow(0, span.offset, seq)?;
        let sin = self.sin.narrow(0, span.offset, seq)?;
        let mut kv_out = Vec::new();
        let mut x = hidden;
        for (l, layer) in self.layers.iter().enumerate().skip(span.start_layer) {
            x = hooks.visit(Site::ResidPre, l, span.offset, x)?;
            let prefix = span.prefix.map(|p| &p[l]);
            let normed = candle_nn::ops::rms_norm(&x, &layer.input_layernorm, self.cfg.rms_norm_eps as f32)?;
            let (attn, kv) = self.attention(&layer.attn, &normed, &cos, &sin, mask.as_ref(), prefix, batch)?;
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

    /// Runs equally long prompts that share their first `shared` tokens, computing those tokens
    /// once: the clean and corrupted baselines of a sweep, whose prompts agree up to the first
    /// difference. Every layer is one packed matmul over the shared tokens and each prompt's own
    /// ones (for IOI 9 + 2 × 7 rows rather than 2 × 16); each prompt's tokens attend to the shared
    /// keys and values, then causally to their own. Returns what the sweep caches: the activations at
    /// `sites`, every layer's keys and values, and the last position's final residual stream, per
    /// prompt, as an unpacked batch would.
    pub fn forward_shared_prefix(&self, prompts: &[&[u32]], shared: usize, sites: &[Site]) -> Result<PromptsForward> {
        let seq = prompts.first().map_or(0, |p| p.len());
        if seq == 0 || prompts.iter().any(|p| p.len() != seq) {
            return Err(Error::Input(
                "internal: a shared-prefix forward needs non-empty prompts of one length".into(),
            ));
        }
        if seq > self.cfg.max_position_embeddings.max(1) {
            return Err(Error::Input(format!(
                "the prompts are {seq} tokens long, more than this model's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        // At least the last token is each prompt's own: it gives that prompt's logits.
        let shared = shared.min(seq - 1);
        if prompts.iter().any(|p| p[..shared] != prompts[0][..shared]) {
            return Err(Error::Input(format!(
                "internal: the prompts do not share their first {shared} tokens"
            )));
        }
        let own = seq - shared;
        let mut ids: Vec<u32> = prompts[0][..shared].to_vec();
        let mut segments = Vec::with_capacity(prompts.len() + 1);
        if shared > 0 {
            segments.push(Segment {
                cone: 0,
                row: 0,
                len: shared,
                offset: 0,
            });
        }
        for (i, p) in prompts.iter().enumerate() {
            segments.push(Segment {
                cone: i + 1,
                row: shared + i * own,
                len: own,
                offset: shared,
            });
            ids.extend_from_slice(&p[shared..]);
        }
        let tokens = ids.len();
        let dev = &self.device;
        // Packed rows of each prompt's tokens in order, to unpack `[tokens, ..]` into `[prompts, seq, ..]`.
        let unpack_rows: Vec<u32> = (0..prompts.len())
            .flat_map(|i| (0..shared).chain((0..own).map(move |j| shared + i * own + j)))
            .map(|r| r as u32)
            .collect();
        let unpack_rows = Tensor::from_vec(unpack_rows, prompts.len() * seq, dev)?;
        let unpack = |t: &Tensor| -> Result<Tensor> {
            let mut dims = vec![prompts.len(), seq];
            dims.extend_from_slice(&t.dims()[1..]);
            Ok(t.index_select(&unpack_rows, 0)?.reshape(dims)?)
        };
        let mut acts = HashMap::new();
        let mut kv = Vec::with_capacity(self.layers.len());
        let mut x = self.embed_tokens.forward(&Tensor::from_vec(ids, tokens, dev)?)?;
        for l in 0..self.layers.len() {
            let layer = self.packed_layer(l, &x, &segments, Prefix::Packed(shared), false)?;
            for &site in sites {
                let act = match site {
                    Site::ResidPre => &x,
                    Site::AttnOut => &layer.attn_out,
                    Site::ResidMid => &layer.resid_mid,
                    Site::MlpOut => &layer.mlp_out,
                    Site::ResidPost => &layer.resid_post,
                };
                acts.insert((site, l), unpack(act)?);
            }
            // `[prompts, seq, kv_heads, hd]` → `[prompts, kv_heads, seq, hd]`, as `forward` keeps them.
            let heads_first = |t: &Tensor| -> Result<Tensor> { Ok(unpack(t)?.transpose(1, 2)?.contiguous()?) };
            kv.push(LayerKv {
                k: heads_first(&layer.k)?,
                v: heads_first(&layer.v)?,
            });
            x = layer.resid_post;
        }
        let last_rows: Vec<u32> = (0..prompts.len())
            .map(|i| (shared + (i + 1) * own - 1) as u32)
            .collect();
        Ok(PromptsForward {
            last_hidden: x.index_select(&Tensor::from_vec(last_rows, prompts.len(), dev)?, 0)?,
            acts,
            kv,
        })
    }

    /// resid_post of `layer` from its resid_mid (`[.., hidden]`): adds the MLP block's output. Lets a
    /// sweep patch attn_out at one position without rerunning the layer's attention.
    pub fn mlp_residual(&self, layer: usize, mid: &Tensor) -> Result<Tensor> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::Input(format!("internal: layer {layer} out of range")))?;
        let mlp = l
            .mlp
            .forward(mid, &l.post_attention_layernorm, self.cfg.rms_norm_eps as f32)?;
        Ok((mid + mlp)?)
    }

    /// Runs many [`Cone`]s in one packed forward and returns each one's last-position logits,
    /// `[cones, vocab]` f32, in the order given.
    ///
    /// The tokens of every cone are packed into one `[tokens, hidden]` matrix, so each projection and
    /// MLP is a single matmul for the whole batch; a cone joins when the forward reaches its start
    /// layer. Its tokens attend to `prefix` (the unpatched run's keys/values per layer, batch 1,
    /// after RoPE and QK-norm, covering at least every cone's positions before its offset) and,
    /// causally, to each other. The last layer runs queries, attention output and MLP only for each
    /// cone's last token: the other tokens are needed there only as keys and values.
    ///
    /// `cancel` is looked at before each layer: when it is set the forward stops with
    /// [`Error::Cancelled`], so a large block does not hold up a cancel. `on_layer` is told after
    /// each layer how many packed token rows it ran, so a large block shows its progress.
    pub fn forward_cones(
        &self,
        cones: &[Cone],
        prefix: &[LayerKv],
        cancel: &AtomicBool,
        on_layer: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        let n_layers = self.layers.len();
        let d = self.cfg.hidden_size;
        for (i, c) in cones.iter().enumerate() {
            let (seq, hidden) = c.hidden.dims2()?;
            let prefix_len = match prefix.get(c.start_layer.min(n_layers.saturating_sub(1))) {
                Some(kv) => kv.k.dim(2)?,
                None => 0,
            };
            let bad = c.start_layer > n_layers
                || seq == 0
                || hidden != d
                || c.offset + seq > self.cfg.max_position_embeddings.max(1)
                || (c.start_layer < n_layers && (prefix.len() != n_layers || prefix_len < c.offset));
            if bad {
                return Err(Error::Input(format!(
                    "internal: cone {i} (start layer {}, offset {}, hidden {:?}) does not fit the model or the \
                     {}-layer key/value prefix",
                    c.start_layer,
                    c.offset,
                    c.hidden.dims(),
                    prefix.len()
                )));
            }
        }
        // Cones join in order of their start layer; the packed rows keep that order.
        let mut order: Vec<usize> = (0..cones.len()).collect();
        order.sort_by_key(|&i| cones[i].start_layer);
        let first_layer = order.first().map_or(n_layers, |&i| cones[i].start_layer);
        let mut segments: Vec<Segment> = Vec::with_capacity(cones.len());
        let mut x: Option<Tensor> = None;
        let mut joined = 0;
        for (l, layer_prefix) in prefix.iter().enumerate().take(n_layers).skip(first_layer) {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled("cancelled".into()));
            }
            let mut parts: Vec<Tensor> = x.take().into_iter().collect();
            let mut rows = segments.last().map_or(0, |s| s.row + s.len);
            while let Some(&i) = order.get(joined).filter(|&&i| cones[i].start_layer == l) {
                let len = cones[i].hidden.dim(0)?;
                segments.push(Segment {
                    cone: i,
                    row: rows,
                    len,
                    offset: cones[i].offset,
                });
                rows += len;
                parts.push(cones[i].hidden.clone());
                joined += 1;
            }
            let packed = if parts.len() == 1 {
                parts.remove(0)
            } else {
                Tensor::cat(&parts, 0)?
            };
            let layer = self.packed_layer(l, &packed, &segments, Prefix::Cached(layer_prefix), l + 1 == n_layers)?;
            x = Some(layer.resid_post);
            on_layer(rows);
        }
        // After the last layer `x` holds one row per segment (its last token); cones that start
        // after the last layer contribute their input's last token unchanged.
        let mut finals: Vec<Tensor> = x.into_iter().collect();
        let mut final_cones: Vec<usize> = segments.iter().map(|s| s.cone).collect();
        for &i in &order[joined..] {
            let h = &cones[i].hidden;
            finals.push(h.narrow(0, h.dim(0)? - 1, 1)?);
            final_cones.push(i);
        }
        if finals.is_empty() {
            return Ok(Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?);
        }
        let finals = Tensor::cat(&finals, 0)?;
        let mut pick = vec![0u32; cones.len()];
        for (row, &cone) in final_cones.iter().enumerate() {
            pick[cone] = row as u32;
        }
        let finals = finals.index_select(&Tensor::from_vec(pick, cones.len(), &self.device)?, 0)?;
        self.final_logits(&finals)
    }

    /// Logits, `[rows, vocab]` f32, of last-layer residual streams `[rows, hidden]`: the final norm
    /// and the unembedding.
    pub fn final_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let normed = candle_nn::ops::rms_norm(hidden, &self.norm, self.cfg.rms_norm_eps as f32)?;
        self.unembed(&normed)
    }

    /// One decoder layer on the packed tokens `x` (`[tokens, hidden]`) of `segments`. With
    /// `last_only` its activations cover only each segment's last token, `[segments, hidden]`.
    fn packed_layer(
        &self,
        l: usize,
        x: &Tensor,
        segments: &[Segment],
        prefix: Prefix,
        last_only: bool,
    ) -> Result<PackedLayer> {
        let cfg = &self.cfg;
        let layer = &self.layers[l];
        let attn = &layer.attn;
        let eps = cfg.rms_norm_eps as f32;
        let (hd, heads, kv_heads) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (qd, kvd) = (heads * hd, kv_heads * hd);
        let dev = &self.device;
        let tokens = x.dim(0)?;

        // Every packed token's absolute position, for RoPE.
        let positions: Vec<u32> = segments
            .iter()
            .flat_map(|s| (s.offset..s.offset + s.len).map(|p| p as u32))
            .collect();
        let positions = Tensor::from_vec(positions, tokens, dev)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        let normed = candle_nn::ops::rms_norm(x, &layer.input_layernorm, eps)?;

        // Keys and values of every token; queries of every token, or in the last layer only of each
        // segment's last token (the others are needed there only as keys and values).
        let (q, k, v, x, q_cos, q_sin) = if last_only {
            let rows: Vec<u32> = segments.iter().map(|s| (s.row + s.len - 1) as u32).collect();
            let rows = Tensor::from_vec(rows, segments.len(), dev)?;
            let kv = linear_fwd(&attn.kv_proj, &normed)?;
            (
                linear_fwd(&attn.q_proj, &normed.index_select(&rows, 0)?)?,
                kv.narrow(1, 0, kvd)?,
                kv.narrow(1, kvd, kvd)?,
                x.index_select(&rows, 0)?,
                cos.index_select(&rows, 0)?,
                sin.index_select(&rows, 0)?,
            )
        } else {
            let qkv = linear_fwd(&attn.qkv_proj, &normed)?;
            (
                qkv.narrow(1, 0, qd)?,
                qkv.narrow(1, qd, kvd)?,
                qkv.narrow(1, qd + kvd, kvd)?,
                x.clone(),
                cos.clone(),
                sin.clone(),
            )
        };
        let n_queries = q.dim(0)?;
        let q = q.contiguous()?.reshape((1, n_queries, heads, hd))?;
        let q = match &attn.q_norm {
            Some(w) => candle_nn::ops::rms_norm(&q, w, eps)?,
            None => q,
        };
        let q = rope_thd(&q.contiguous()?, &q_cos, &q_sin)?.squeeze(0)?;
        let k = k.contiguous()?.reshape((1, tokens, kv_heads, hd))?;
        let k = match &attn.k_norm {
            Some(w) => candle_nn::ops::rms_norm(&k, w, eps)?,
            None => k,
        };
        let k = rope_thd(&k.contiguous()?, &cos, &sin)?.squeeze(0)?;
        let v = v.contiguous()?.reshape((tokens, kv_heads, hd))?;

        let shared;
        let prefix = match prefix {
            Prefix::Cached(kv) => kv,
            Prefix::Packed(len) => {
                debug_assert!(
                    segments
                        .iter()
                        .all(|s| (s.offset == 0 && s.row == 0 && s.len == len) || s.offset == len),
                    "a packed prefix of {len} rows must be the first segment, and every other one start after it"
                );
                // The first `len` packed rows, as a `[1, kv_heads, len, hd]` cache.
                let cache = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.narrow(0, 0, len)?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?)
                };
                shared = LayerKv {
                    k: cache(&k)?,
                    v: cache(&v)?,
                };
                &shared
            }
        };
        let cpu_f32 = dev.is_cpu() && self.dtype == DType::F32;
        let out = if cpu_f32 {
            cone_attention_cpu(&q, &k, &v, prefix, segments, last_only)?
        } else {
            cone_attention_tensors(&q, &k, &v, prefix, segments, last_only)?
        };
        let attn_out = linear_fwd(&attn.o_proj, &out)?;
        let mid = (x + &attn_out)?;
        let mlp_out = layer.mlp.forward(&mid, &layer.post_attention_layernorm, eps)?;
        Ok(PackedLayer {
            resid_post: (&mid + &mlp_out)?,
            attn_out,
            resid_mid: mid,
            mlp_out,
            k,
            v,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        prefix: Option<&LayerKv>,
        batch: usize,
    ) -> Result<(Tensor, LayerKv)> {
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let hd = cfg.head_dim;
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let qkv = linear_fwd(&attn.qkv_proj, x)?;
        let q = qkv.narrow(2, 0, qd)?.reshape((b, t, cfg.num_heads, hd))?;
        let k = qkv.narrow(2, qd, kvd)?.reshape((b, t, cfg.num_kv_heads, hd))?;
        let v = qkv.narrow(2, qd + kvd, kvd)?.reshape((b, t, cfg.num_kv_heads, hd))?;
        let eps = cfg.rms_norm_eps as f32;
        let q = match &attn.q_norm {
            Some(w) => candle_nn::ops::rms_norm(&q.contiguous()?, w, eps)?,
            None => q,
        };
        let k = match &attn.k_norm {
            Some(w) => candle_nn::ops::rms_norm(&k.contiguous()?, w, eps)?,
            None => k,
        };
        let q = candle_nn::rotary_emb::rope(&q.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = match prefix {
            Some(p) => {
                let expand = |t: &Tensor| -> Result<Tensor> {
                    let (pb, h, s, d) = t.dims4()?;
                    Ok(if pb == batch {
                        t.clone()
                    } else {
                        t.broadcast_as((batch, h, s, d))?.contiguous()?
                    })
                };
                (
                    Tensor::cat(&[&expand(&p.k)?, &k], 2)?,
                    Tensor::cat(&[&expand(&p.v)?, &v], 2)?,
                )
            }
            None => (k, v),
        };
        let n_rep = cfg.num_heads / cfg.num_kv_heads;
        let k_rep = candle_transformers::utils::repeat_kv(k.clone(), n_rep)?;
        let v_rep = candle_transformers::utils::repeat_kv(v.clone(), n_rep)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k_rep.t()?)? * scale)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v_rep)?; // [b, heads, t, hd]
        let out = out.transpose(1, 2)?.reshape((b, t, cfg.num_heads * hd))?;
        Ok((linear_fwd(&attn.o_proj, &out)?, LayerKv { k, v }))
    }
}

/// Attention of a cone forward's queries (`[queries, heads, head_dim]`, after RoPE) over their own
/// cone's keys and values: `prefix` (batch 1) before the cone's offset, the packed `k`/`v`
/// (`[tokens, kv_heads, head_dim]`) from it, causally. Returns `[queries, heads * head_dim]`.
///
/// Tensor ops, for any device and dtype: every cone padded to the longest, as one batched matmul.
fn cone_attention_tensors(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prefix: &LayerKv,
    segments: &[Segment],
    last_only: bool,
) -> Result<Tensor> {
    let (n_queries, heads, hd) = q.dims3()?;
    let kv_heads = k.dim(1)?;
    let rep = heads / kv_heads;
    let dev = q.device();
    // Queries `[cones, lmax]`, key slots `[cones, slots]` where slot s is absolute position s (the
    // prefix before the cone's offset, the cone's own tokens from it).
    let n = segments.len();
    let q_len = |s: &Segment| if last_only { 1 } else { s.len };
    let lmax = segments.iter().map(q_len).max().unwrap_or(1);
    let slots = segments.iter().map(|s| s.offset + s.len).max().unwrap_or(1);
    let prefix_len = prefix.k.dim(2)?;
    let mut q_rows = Vec::with_capacity(n * lmax);
    let mut k_rows = Vec::with_capacity(n * slots);
    let mut mask = Vec::with_capacity(n * lmax * slots);
    let mut back = Vec::with_capacity(n_queries);
    let mut first_query = 0;
    for (i, s) in segments.iter().enumerate() {
        let ql = q_len(s);
        let first_pos = s.offset + s.len - ql;
        for j in 0..lmax {
            let valid = j < ql;
            q_rows.push((first_query + if valid { j } else { 0 }) as u32);
            if valid {
                back.push((i * lmax + j) as u32);
            }
            // Padding queries see slot 0 only, so their (discarded) softmax stays finite.
            let pos = first_pos + j;
            mask.extend((0..slots).map(|slot| {
                let visible = if valid { slot <= pos } else { slot == 0 };
                if visible { 0.0 } else { f32::NEG_INFINITY }
            }));
        }
        first_query += ql;
        k_rows.extend((0..slots).map(|slot| {
            (if slot < s.offset {
                slot
            } else if slot < s.offset + s.len {
                prefix_len + s.row + (slot - s.offset)
            } else {
                0
            }) as u32
        }));
    }
    let gather = |packed: &Tensor, cached: &Tensor| -> Result<Tensor> {
        let cached = cached.squeeze(0)?.transpose(0, 1)?.contiguous()?; // [prefix, kv_heads, hd]
        let src = Tensor::cat(&[&cached, packed], 0)?;
        let rows = Tensor::from_vec(k_rows.clone(), n * slots, dev)?;
        Ok(src
            .index_select(&rows, 0)?
            .reshape((n, slots, kv_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let keys = gather(k, &prefix.k)?; // [n, kv_heads, slots, hd]
    let values = gather(v, &prefix.v)?;
    // Query heads sharing a key/value head sit together (head = kv * rep + r), so no repeat_kv.
    let q = q
        .index_select(&Tensor::from_vec(q_rows, n * lmax, dev)?, 0)?
        .reshape((n, lmax, kv_heads, rep, hd))?
        .permute((0, 2, 3, 1, 4))?
        .contiguous()?
        .reshape((n, kv_heads, rep * lmax, hd))?;
    let mask = Tensor::from_vec(mask, (n, 1, 1, lmax, slots), dev)?.to_dtype(q.dtype())?;
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&keys.t()?)? * scale)?
        .reshape((n, kv_heads, rep, lmax, slots))?
        .broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
        .to_dtype(q.dtype())?
        .reshape((n, kv_heads, rep * lmax, slots))?;
    Ok(probs
        .matmul(&values)?
        .reshape((n, kv_heads, rep, lmax, hd))?
        .permute((0, 3, 1, 2, 4))?
        .contiguous()?
        .reshape((n * lmax, heads * hd))?
        .index_select(&Tensor::from_vec(back, n_queries, dev)?, 0)?)
}

/// [`cone_attention_tensors`] for f32 on the CPU: a direct loop per query, spread over the cores.
/// A cone's attention is a few dozen keys per head, far too small for a matmul each: the batched
/// matmul of the tensor path spends most of its time launching hundreds of tiny ones.
fn cone_attention_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prefix: &LayerKv,
    segments: &[Segment],
    last_only: bool,
) -> Result<Tensor> {
    use rayon::prelude::*;
    let dev = q.device().clone();
    let (n_queries, heads, hd) = q.dims3()?;
    let kv_heads = k.dim(1)?;
    let rep = heads / kv_heads;
    let prefix_len = prefix.k.dim(2)?;
    let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let (q, k, v) = (flat(q)?, flat(k)?, flat(v)?); // [queries, heads, hd], [tokens, kv_heads, hd] ×2
    let (pk, pv) = (flat(&prefix.k)?, flat(&prefix.v)?); // [1, kv_heads, prefix, hd]
    // Each query: its segment and absolute position.
    let queries: Vec<(&Segment, usize)> = segments
        .iter()
        .flat_map(|s| {
            let ql = if last_only { 1 } else { s.len };
            (s.offset + s.len - ql..s.offset + s.len).map(move |pos| (s, pos))
        })
        .collect();
    if queries.len() != n_queries {
        return Err(Error::Input(format!(
            "internal: {} attention queries for {} segments' {n_queries} query rows",
            queries.len(),
            segments.len()
        )));
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; n_queries * heads * hd];
    out.par_chunks_mut(heads * hd)
        .zip(q.par_chunks(heads * hd))
        .zip(queries.par_iter())
        .for_each(|((out, q), &(s, pos))| {
            let (k, v, pk, pv) = (&k, &v, &pk, &pv);
            let key = |g: usize, slot: usize| -> (&[f32], &[f32]) {
                let (at, keys, values) = if slot < s.offset {
                    ((g * prefix_len + slot) * hd, pk, pv)
                } else {
                    (((s.row + slot - s.offset) * kv_heads + g) * hd, k, v)
                };
                (&keys[at..at + hd], &values[at..at + hd])
            };
            let mut scores = vec![0f32; pos + 1];
            for h in 0..heads {
                let g = h / rep;
                let qh = &q[h * hd..(h + 1) * hd];
                let mut max = f32::NEG_INFINITY;
                for (slot, score) in scores.iter_mut().enumerate() {
                    *score = dot(qh, key(g, slot).0) * scale;
                    max = max.max(*score);
                }
                let mut sum = 0f32;
                for score in scores.iter_mut() {
                    *score = (*score - max).exp();
                    sum += *score;
                }
                let oh = &mut out[h * hd..(h + 1) * hd];
                for (slot, &p) in scores.iter().enumerate() {
                    let w = p / sum;
                    for (o, &x) in oh.iter_mut().zip(key(g, slot).1) {
                        *o += w * x;
                    }
                }
            }
        });
    Ok(Tensor::from_vec(out, (n_queries, heads * hd), &dev)?)
}

/// a · b, in eight running sums: a plain sum of products is one long chain of dependent additions
/// the compiler may not reorder, so it runs one lane at a time.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    let mut lanes = [0f32; 8];
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Additive causal mask `[seq, offset + seq]` for queries at positions `offset..offset+seq`;
/// `None` when nothing needs masking (a single query sees everything before it).
fn causal_mask(seq: usize, offset: usize, device: &Device, dtype: DType) -> Result<Option<Tensor>> {
    if seq <= 1 {
        return Ok(None);
    }
    let total = offset + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (seq, total), device)?.to_dtype(dtype)?))
}

/// RoPE cos/sin tables `[max_positions, head_dim / 2]` for the half-split rotation HF uses.
fn rope_tables(cfg: &ArchConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let dim = cfg.head_dim;
    let inv_freq: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / dim as f64))
        .map(|f| scale_frequency(f, &cfg.rope_scaling))
        .collect();
    let positions = cfg.max_position_embeddings.max(1);
    let mut cos = Vec::with_capacity(positions * dim / 2);
    let mut sin = Vec::with_capacity(positions * dim / 2);
    for p in 0..positions {
        for f in &inv_freq {
            // HF computes angles in f32: match it so long prompts round the same way.
            let angle = (p as f32) * (*f as f32);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let shape = (positions, dim / 2);
    Ok((
        Tensor::from_vec(cos, shape, device)?,
        Tensor::from_vec(sin, shape, device)?,
    ))
}

/// Applies a checkpoint's rope scaling to one inverse frequency (HF `rope_init_fn`s).
fn scale_frequency(inv_freq: f64, scaling: &RopeScaling) -> f64 {
    match *scaling {
        RopeScaling::Default => inv_freq,
        RopeScaling::Linear { factor } => inv_freq / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let low_freq_wavelen = old_ctx / low_freq_factor;
            let high_freq_wavelen = old_ctx / high_freq_factor;
            let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
            if wavelen < high_freq_wavelen {
                inv_freq
            } else if wavelen > low_freq_wavelen {
                inv_freq / factor
            } else {
                let smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
            }
        }
    }
}

/// Indices of the `k` largest values of a 1-D f32 slice, largest first (earlier index first on ties).
pub fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    // One pass keeping the best k in order: O(n) with a tiny constant for the small k of an inspector.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (i, &v) in values.iter().enumerate() {
        if best.len() == k && v.total_cmp(&best[k - 1].1) != std::cmp::Ordering::Greater {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b.total_cmp(&v) != std::cmp::Ordering::Less);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    }
    best
}

/// Splits the last-position logits `[batch, vocab]` into per-row vectors.
pub fn logits_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;

    #[test]
    fn top_k_returns_the_largest_values_largest_first() {
        let values = [0.5, 3.0, -1.0, 3.0, 7.5, 2.0, f32::NEG_INFINITY];
        assert_eq!(top_k(&values, 3), vec![(4, 7.5), (1, 3.0), (3, 3.0)]);
        assert_eq!(top_k(&values, 0), vec![]);
        assert_eq!(top_k(&values, 10).len(), values.len());
        assert_eq!(top_k(&[], 2), vec![]);
    }

    #[test]
    fn the_cpu_cone_attention_matches_the_tensor_path() {
        let dev = Device::Cpu;
        let (heads, kv_heads, hd, seq) = (6, 2, 8, 12);
        let prefix = LayerKv {
            k: Tensor::randn(0f32, 1.0, (1, kv_heads, seq, hd), &dev).unwrap(),
            v: Tensor::randn(0f32, 1.0, (1, kv_heads, seq, hd), &dev).unwrap(),
        };
        // Cones of different offsets and lengths, one of a single token, packed in order.
        let shapes = [(3, 9), (7, 5), (11, 1), (0, 12)];
        let mut segments = Vec::new();
        let mut row = 0;
        for (cone, &(offset, len)) in shapes.iter().enumerate() {
            segments.push(Segment { cone, row, len, offset });
            row += len;
        }
        let k = Tensor::randn(0f32, 1.0, (row, kv_heads, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (row, kv_heads, hd), &dev).unwrap();
        for last_only in [false, true] {
            let queries = if last_only { segments.len() } else { row };
            let q = Tensor::randn(0f32, 1.0, (queries, heads, hd), &dev).unwrap();
            let fast = cone_attention_cpu(&q, &k, &v, &prefix, &segments, last_only).unwrap();
            let reference = cone_attention_tensors(&q, &k, &v, &prefix, &segments, last_only).unwrap();
            assert_eq!(fast.dims(), &[queries, heads * hd]);
            assert!(max_abs_diff(&fast, &reference) < 1e-5, "last_only={last_only}");
        }
    }

    /// Records every site's activation.
    struct Record(HashMap<(Site, usize), Tensor>);

    impl Hooks for Record {
        fn visit(&mut self, site: Site, layer: usize, _offset: usize, x: Tensor) -> Result<Tensor> {
            self.0.insert((site, layer), x.clone());
            Ok(x)
        }
    }

    #[test]
    fn a_shared_prefix_forward_matches_the_batched_one() {
        use crate::model::config::{Family, RopeScaling};
        let cfg = ArchConfig {
            family: Family::Qwen3,
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::Default,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
        };
        let sites = [
            Site::ResidPre,
            Site::AttnOut,
            Site::ResidMid,
            Site::MlpOut,
            Site::ResidPost,
        ];
        // f32 takes the CPU attention loop, bf16 the tensor path (as on a GPU).
        for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 0.02)] {
            let (t, _) = crate::model::synthetic::build(&cfg, 7, &Device::Cpu, dtype).unwrap();
            let a: Vec<u32> = vec![5, 9, 2, 33, 7, 1, 60, 12];
            for diff in [0, 1, 4, 7, 8] {
                let mut b = a.clone();
                for id in &mut b[diff..] {
                    *id = (*id + 11) % 64;
                }
                let mut reference = Record(HashMap::new());
                let batched = t
                    .forward(
                        t.embed(&[&a, &b]).unwrap(),
                        Span {
                            keep_kv: true,
                            ..Span::default()
                        },
                        &mut reference,
                    )
                    .unwrap();
                let packed = t.forward_shared_prefix(&[&a, &b], diff, &sites).unwrap();
                let what = format!("{dtype:?}, prompts differing from {diff}");
                let close = |x: &Tensor, y: &Tensor, name: &str| {
                    assert_eq!(x.dims(), y.dims(), "{name}, {what}");
                    let gap = max_abs_diff(&x.to_dtype(DType::F32).unwrap(), &y.to_dtype(DType::F32).unwrap());
                    assert!(gap < tolerance, "{name}, {what}: {gap}");
                };
                close(
                    &t.final_logits(&packed.last_hidden).unwrap(),
                    &batched.last_logits,
                    "logits",
                );
                for l in 0..cfg.num_layers {
                    for site in sites {
                        close(
                            &packed.acts[&(site, l)],
                            &reference.0[&(site, l)],
                            &format!("{site:?} {l}"),
                        );
                    }
                    close(&packed.kv[l].k, &batched.kv[l].k, &format!("keys {l}"));
                    close(&packed.kv[l].v, &batched.kv[l].v, &format!("values {l}"));
                }
            }
            // Prompts that do not share the tokens claimed are refused, not silently mixed.
            assert!(
                t.forward_shared_prefix(&[&a, &[1, 2, 3, 4, 5, 6, 7, 8]], 3, &sites)
                    .is_err()
            );
            assert!(t.forward_shared_prefix(&[&a, &a[..4]], 2, &sites).is_err());
        }
    }

    #[test]
    fn fused_swiglu_matches_silu_times_up() {
        let dev = Device::Cpu;
        let gate = Tensor::randn(0f32, 3.0, (37, 1000), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (37, 1000), &dev).unwrap();
        let reference = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        assert!(max_abs_diff(&swiglu(&gate, &up).unwrap(), &reference) < 1e-5);
        // Views that are not contiguous take candle's ops.
        let (gt, ut) = (gate.t().unwrap(), up.t().unwrap());
        assert!(max_abs_diff(&swiglu(&gt, &ut).unwrap(), &reference.t().unwrap()) < 1e-5);
    }

    #[test]
    fn the_cpu_rope_matches_candles() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 37, 6, 32), &dev).unwrap();
        let cos = Tensor::randn(0f32, 1.0, (37, 16), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (37, 16), &dev).unwrap();
        let reference = candle_nn::rotary_emb::rope_thd(&x, &cos, &sin).unwrap();
        let ours = x.apply_op3_no_bwd(&cos, &sin, &RopeRows).unwrap();
        assert_eq!(ours.dims(), reference.dims());
        assert!(max_abs_diff(&ours, &reference) < 1e-6);
        assert!(max_abs_diff(&rope_thd(&x, &cos, &sin).unwrap(), &reference) < 1e-6);
    }
}
