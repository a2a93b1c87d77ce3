//! The decoder's layers as loaded from a checkpoint: attention and MLP weights, linear layers with
//! optional biases, RoPE tables and the causal mask.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::{ArchConfig, RopeScaling};
use super::kernels::fused::swiglu;
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
    pub(super) q_norm: Option<Tensor>,
    pub(super) k_norm: Option<Tensor>,
}

pub(super) struct Mlp {
    pub(super) gate_proj: Linear,
    pub(super) up_proj: Linear,
    pub(super) down_proj: Linear,
}

impl Mlp {
    /// The MLP block's output for the residual stream `mid` (post-attention norm included).
    pub(super) fn forward(&self, mid: &Tensor, norm: &Tensor, eps: f32) -> Result<Tensor> {
        let normed = candle_nn::ops::rms_norm(mid, norm, eps)?;
        let gated = swiglu(
            &linear_fwd(&self.gate_proj, &normed)?,
            &linear_fwd(&self.up_proj, &normed)?,
        )?;
        linear_fwd(&self.down_proj, &gated)
    }
}

pub(super) struct Layer {
    pub(super) input_layernorm: Tensor,
    pub(super) attn: Attention,
    pub(super) post_attention_layernorm: Tensor,
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

/// Additive causal mask `[seq, offset + seq]` for queries at positions `offset..offset+seq`;
/// `None` when nothing needs masking (a single query sees everything before it).
pub(super) fn causal_mask(seq: usize, offset: usize, device: &Device, dtype: DType) -> Result<Option<Tensor>> {
    if seq <= 1 {
        return Ok(None);
    }
    let total = offset + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (seq, total), device)?.to_dtype(dtype)?))
}

/// RoPE cos/sin tables `[positions, head_dim / 2]` for the half-split rotation HF uses.
pub(super) fn rope_tables(cfg: &ArchConfig, positions: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let dim = cfg.head_dim;
    let inv_freq: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / dim as f64))
        .map(|f| scale_frequency(f, &cfg.rope_scaling))
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
