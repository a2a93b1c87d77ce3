//! Random-weight models built in memory with the shape of a real checkpoint, for benchmarks where
//! the real weights are not at hand: nothing is read from disk, and the tokenizer just numbers
//! tokens (`<0>`, `<1>`, …), so sweeps on them take token ids.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::{ArchConfig, Family, RopeScaling};
use super::decoder::Transformer;
use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};

/// The shapes [`build`] knows, by the name used on the command line.
pub const SHAPES: &[&str] = &["qwen3-0.6b"];

/// The architecture of a known shape ("qwen3-0.6b": Qwen/Qwen3-0.6B's config.json).
pub fn shape(name: &str) -> Result<ArchConfig> {
    match name.trim().to_ascii_lowercase().as_str() {
        "qwen3-0.6b" => Ok(ArchConfig {
            family: Family::Qwen3,
            vocab_size: 151_936,
            hidden_size: 1024,
            intermediate_size: 3072,
            num_layers: 28,
            num_heads: 16,
            num_kv_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_scaling: RopeScaling::Default,
            max_position_embeddings: 40_960,
            tie_word_embeddings: true,
        }),
        other => Err(Error::Input(format!(
            "unknown synthetic model '{other}': use one of {}",
            SHAPES.join(", ")
        ))),
    }
}

/// Builds a decoder with deterministic random weights (`seed`) and a numbering tokenizer.
///
/// Matrices are uniform in ±sqrt(3 / fan_in) (unit-variance outputs), norm weights near 1, the
/// embedding uniform in ±1: activations stay in a realistic range through every layer.
pub fn build(cfg: &ArchConfig, seed: u64, device: &Device, dtype: DType) -> Result<(Transformer, TextTokenizer)> {
    let mut tensors = HashMap::new();
    for (name, dims) in tensor_shapes(cfg) {
        let values = random_values(&name, &dims, seed);
        let t = Tensor::from_vec(values, dims, device)?;
        let t = if dtype == DType::F32 { t } else { t.to_dtype(dtype)? };
        tensors.insert(name, t);
    }
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let transformer = Transformer::new(cfg, vb)?;
    Ok((transformer, TextTokenizer::numbered(cfg.vocab_size)?))
}

/// HF tensor names and shapes of a checkpoint with this architecture (the tests write their
/// random-weight checkpoints from it too).
pub fn tensor_shapes(cfg: &ArchConfig) -> Vec<(String, Vec<usize>)> {
    let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let mut out = vec![("model.embed_tokens.weight".to_owned(), vec![cfg.vocab_size, d])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, d]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q]));
        if cfg.family == Family::Qwen2 {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        if cfg.qk_norm() {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
        }
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, d]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, d]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![d, i]));
    }
    out.push(("model.norm.weight".to_owned(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_owned(), vec![cfg.vocab_size, d]));
    }
    out
}

/// Deterministic values for one tensor: a splitmix64 stream seeded by the name and `seed`.
fn random_values(name: &str, dims: &[usize], seed: u64) -> Vec<f32> {
    let numel: usize = dims.iter().product();
    let (center, scale) = if dims.len() == 1 && name.ends_with("norm.weight") {
        (1.0, 0.1)
    } else if dims.len() == 1 {
        (0.0, 0.1)
    } else if name == "model.embed_tokens.weight" {
        (0.0, 1.0)
    } else {
        (0.0, (3.0 / dims[1] as f32).sqrt())
    };
    let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ seed, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (0..numel)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / 16_777_216.0; // [0, 1)
            center + scale * (2.0 * unit - 1.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_shape_has_the_published_parameter_count() {
        let cfg = shape("qwen3-0.6b").unwrap();
        let params: usize = tensor_shapes(&cfg)
            .iter()
            .map(|(_, d)| d.iter().product::<usize>())
            .sum();
        // Qwen3-0.6B: 0.6B parameters with tied embeddings (596,049,920 in its safetensors).
        assert_eq!(params, 596_049_920);
    }

    #[test]
    fn random_values_are_deterministic_and_scaled() {
        let a = random_values("model.layers.0.mlp.up_proj.weight", &[4, 300], 7);
        assert_eq!(a, random_values("model.layers.0.mlp.up_proj.weight", &[4, 300], 7));
        assert_ne!(a, random_values("model.layers.0.mlp.up_proj.weight", &[4, 300], 8));
        let bound = (3.0f32 / 300.0).sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.02, "mean {mean}");
    }
}
