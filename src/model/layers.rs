//! The decoder's layers as loaded from a checkpoint: attention and MLP weights, linear layers with
//! optional biases, RoPE tables and the causal mask.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::{Activation, ArchConfig, NormKind, RopeScaling};
use super::kernels::fused::{Act, activation, gated};
use super::kernels::skinny::linear as linear_fwd;
use crate::error::Result;

pub(super) struct Attention {
    /// q_proj, k_proj and v_proj stacked into one `[q + 2 kv, hidden]` matrix: one matmul instead of
    /// three small ones.
    pub(super) qkv_proj: Linear,
    /// Views of `qkv_proj`'s rows: the queries alone, and keys and values together.
    pub(super) q_proj: Linear,
    pub(super) kv_proj: Linear,
    pub(super) o_proj: Linear,
    pub(super) q_norm: Option<Norm>,
    pub(super) k_norm: Option<Norm>,
    /// Gemma's norm on the attention output before it joins the residual stream.
    pub(super) post_norm: Option<Norm>,
}

/// A normalisation layer: RMSNorm (Gemma's `1 + w` folded into the weight at load) or LayerNorm.
pub(super) enum Norm {
    Rms { weight: Tensor, eps: f32 },
    Layer { weight: Tensor, bias: Tensor, eps: f32 },
}

impl Norm {
    /// Loads the norm `vb` points at (`weight`, and `bias` for LayerNorm), of width `dim`.
    pub(super) fn load(cfg: &ArchConfig, dim: usize, vb: VarBuilder) -> Result<Self> {
        let eps = cfg.norm_eps as f32;
        Ok(match cfg.norm {
            NormKind::Rms => Norm::Rms {
                weight: vb.get(dim, "weight")?,
                eps,
            },
            // HF computes (1 + w) in f32 whatever the model's dtype.
            NormKind::RmsOffset => {
                let w = vb.get(dim, "weight")?;
                let dtype = w.dtype();
                Norm::Rms {
                    weight: (w.to_dtype(DType::F32)? + 1.0)?.to_dtype(dtype)?,
                    eps,
                }
            }
            NormKind::Layer => Norm::Layer {
                weight: vb.get(dim, "weight")?,
                bias: vb.get(dim, "bias")?,
                eps,
            },
        })
    }

    /// The norm over the last dimension of `x`.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Norm::Rms { weight, eps } => candle_nn::ops::rms_norm(x, weight, *eps)?,
            Norm::Layer { weight, bias, eps } => candle_nn::ops::layer_norm(x, weight, bias, *eps)?,
        })
    }
}

pub(super) struct Mlp {
    /// The gate of a gated MLP (`act(gate) · up`); `None` for a plain `act(up)` MLP.
    pub(super) gate_proj: Option<Linear>,
    pub(super) up_proj: Linear,
    pub(super) down_proj: Linear,
    pub(super) activation: Activation,
    /// Gemma's norm on the MLP output before it joins the residual stream.
    pub(super) post_norm: Option<Norm>,
}

impl Mlp {
    /// The MLP block's output for its normed input.
    pub(super) fn forward(&self, normed: &Tensor) -> Result<Tensor> {
        let up = linear_fwd(&self.up_proj, normed)?;
        let hidden = match (&self.gate_proj, self.activation) {
            (Some(gate), Activation::Silu) => gated(&linear_fwd(gate, normed)?, &up, Act::Silu)?,
            (Some(gate), Activation::GeluTanh) => gated(&linear_fwd(gate, normed)?, &up, Act::GeluTanh)?,
            (Some(gate), act) => (activate(&linear_fwd(gate, normed)?, act)? * up)?,
            (None, act) => activate(&up, act)?,
        };
        let out = linear_fwd(&self.down_proj, &hidden)?;
        match &self.post_norm {
            Some(norm) => norm.forward(&out),
            None => Ok(out),
        }
    }
}

/// `act(x)`.
fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Silu => activation(x, Act::Silu),
        Activation::GeluTanh => activation(x, Act::GeluTanh),
        Activation::Gelu => Ok(x.gelu_erf()?),
    }
}

pub(super) struct Layer {
    /// The norm before attention (`input_layernorm`, GPT-2's `ln_1`).
    pub(super) attn_norm: Norm,
    pub(super) attn: Attention,
    /// The norm before the MLP (`post_attention_layernorm`; Gemma's `pre_feedforward_layernorm`).
    pub(super) mlp_norm: Norm,
    pub(super) mlp: Mlp,
}

/// A linear layer with an optional bias: the bias is loaded when the checkpoint has one, which covers
/// Qwen2's qkv biases and Llama's `attention_bias`/`mlp_bias` without per-family switches.
pub(super) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
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
pub(super) fn stacked_linear(in_dim: usize, parts: &[(usize, VarBuilder)]) -> Result<Linear> {
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
pub(super) fn rows_of(linear: &Linear, start: usize, len: usize) -> Result<Linear> {
    Ok(Linear::new(
        linear.weight().narrow(0, start, len)?,
        linear.bias().map(|b| b.narrow(0, start, len)).transpose()?,
    ))
}

/// Additive causal mask `[seq, offset + seq]` for queries at positions `offset..offset+seq`, hiding
/// keys more than `window − 1` positions back when the layer slides; `None` when nothing needs
/// masking (a single query that sees everything before it).
pub(super) fn causal_mask(
    seq: usize,
    offset: usize,
    window: Option<usize>,
    device: &Device,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let total = offset + seq;
    if seq <= 1 && window.is_none_or(|w| w >= total) {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if visible(offset + i, j, window) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (seq, total), device)?.to_dtype(dtype)?))
}

/// Whether a query at position `query` sees the key at position `key`: causally, and within the
/// last `window` positions (itself included) when the layer slides, as HF's sliding-window masks.
pub(super) fn visible(query: usize, key: usize, window: Option<usize>) -> bool {
    key <= query && window.is_none_or(|w| key + w > query)
}

/// RoPE on the first `rotary_dim` dimensions of each head of `x` (the last dimension); the rest
/// pass through (GPT-NeoX's partial rotary). `rope` rotates a contiguous tensor.
pub(super) fn rotate_partial(
    x: &Tensor,
    rotary_dim: usize,
    rope: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let last = x.rank() - 1;
    let hd = x.dim(last)?;
    if rotary_dim == 0 {
        return Ok(x.clone());
    }
    if rotary_dim == hd {
        return rope(&x.contiguous()?);
    }
    let rotated = rope(&x.narrow(last, 0, rotary_dim)?.contiguous()?)?;
    let kept = x.narrow(last, rotary_dim, hd - rotary_dim)?;
    Ok(Tensor::cat(&[&rotated, &kept], last)?.contiguous()?)
}

/// RoPE cos/sin tables `[positions, rotary_dim / 2]` for the half-split rotation HF uses, with base
/// `theta` and `scaling`.
pub(super) fn rope_tables(
    rotary_dim: usize,
    theta: f64,
    scaling: &RopeScaling,
    positions: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let dim = rotary_dim.max(2);
    let inv_freq: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
        .map(|f| scale_frequency(f, scaling))
        .collect();
    let positions = positions.max(1);
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
