//! Random-weight models built in memory with the shape of a real checkpoint, for benchmarks where
//! the real weights are not at hand: nothing is read from disk, and the tokenizer just numbers
//! tokens (`<0>`, `<1>`, …), so sweeps on them take token ids.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::{ArchConfig, AttentionKind, Family};
use super::decoder::Transformer;
pub use super::families::tensor_shapes;
use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};

/// The shapes [`build`] knows, by the name used on the command line.
pub const SHAPES: &[&str] = &["qwen3-0.6b", "gpt2-small", "pythia-160m", "gemma3-270m"];

/// The architecture of a known shape, as its published config.json describes it.
pub fn shape(name: &str) -> Result<ArchConfig> {
    let mut cfg = match name.trim().to_ascii_lowercase().as_str() {
        // Qwen/Qwen3-0.6B.
        "qwen3-0.6b" => ArchConfig {
            rope_theta: 1_000_000.0,
            max_position_embeddings: 40_960,
            tie_word_embeddings: true,
            ..ArchConfig::sized(Family::Qwen3, 151_936, 1024, 3072, 28, 16, 8, 128)
        },
        // openai-community/gpt2.
        "gpt2-small" => ArchConfig {
            norm_eps: 1e-5,
            bos_token_id: Some(50_256),
            max_position_embeddings: 1024,
            tie_word_embeddings: true,
            ..ArchConfig::sized(Family::Gpt2, 50_257, 768, 3072, 12, 12, 12, 64)
        },
        // EleutherAI/pythia-160m: a quarter of each head rotates, parallel residual, untied.
        "pythia-160m" => ArchConfig {
            norm_eps: 1e-5,
            max_position_embeddings: 2048,
            parallel_residual: true,
            rotary_dim: 16,
            bos_token_id: Some(0),
            ..ArchConfig::sized(Family::GptNeoX, 50_304, 768, 3072, 12, 12, 12, 64)
        },
        // google/gemma-3-270m: every sixth layer global, the rest slide over 512 positions.
        "gemma3-270m" => ArchConfig {
            rope_theta: 1_000_000.0,
            local_rope_theta: Some(10_000.0),
            sliding_window: Some(512),
            layer_kinds: (0..18)
                .map(|l| {
                    if (l + 1) % 6 == 0 {
                        AttentionKind::Global
                    } else {
                        AttentionKind::Local
                    }
                })
                .collect(),
            max_position_embeddings: 32_768,
            tie_word_embeddings: true,
            ..ArchConfig::sized(Family::Gemma3, 262_144, 640, 2048, 18, 4, 1, 256)
        },
        other => {
            return Err(Error::Input(format!(
                "unknown synthetic model '{other}': use one of {}",
                SHAPES.join(", ")
            )));
        }
    };
    cfg.apply_family_defaults();
    Ok(cfg)
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

/// The token embeddings' names, in every family's layout.
pub const EMBEDDINGS: &[&str] = &[
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
];

/// Whether a 1-D tensor is a norm's weight (centred on 1 in random models).
pub fn is_norm_weight(name: &str) -> bool {
    ["norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Deterministic values for one tensor: a splitmix64 stream seeded by the name and `seed`.
fn random_values(name: &str, dims: &[usize], seed: u64) -> Vec<f32> {
    let numel: usize = dims.iter().product();
    let (center, scale) = if dims.len() == 1 && is_norm_weight(name) {
        (1.0, 0.1)
    } else if dims.len() == 1 {
        (0.0, 0.1)
    } else if EMBEDDINGS.contains(&name) {
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
    fn every_shape_has_its_published_parameter_count() {
        for (name, published) in [
            ("gpt2-small", 124_439_808),
            ("pythia-160m", 162_322_944),
            ("gemma3-270m", 268_098_176),
        ] {
            let cfg = shape(name).unwrap();
            let params: usize = tensor_shapes(&cfg)
                .iter()
                .map(|(_, d)| d.iter().product::<usize>())
                .sum();
            assert_eq!(params, published, "{name}");
        }
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
