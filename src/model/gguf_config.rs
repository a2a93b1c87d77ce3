//! Reads the architecture from GGUF metadata (`general.architecture` and `{arch}.*` keys).

use candle_core::quantized::gguf_file;

use super::config::{ArchConfig, AttentionKind, Family, MAX_LAYERS, RopeScaling, unsupported};
use crate::error::{Error, Result};

/// GGUF architectures the decoder runs (GPT-2 and GPT-NeoX load from safetensors folders).
const GGUF_FAMILIES: &[Family] = &[
    Family::Llama,
    Family::Qwen2,
    Family::Qwen3,
    Family::Gemma2,
    Family::Gemma3,
];

/// Gemma 3's local layers' RoPE base: GGUF files carry no key for it (HF's default).
const GEMMA3_LOCAL_ROPE_THETA: f64 = 10_000.0;

/// Gemma 3: every sixth layer is global (GGUF files carry no key for the pattern).
const GEMMA3_GLOBAL_EVERY: usize = 6;

impl ArchConfig {
    /// Reads the architecture from GGUF metadata.
    pub fn from_gguf(content: &gguf_file::Content, has_output_weight: bool) -> Result<Self> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let family = Family::from_model_type(&arch)
            .filter(|f| GGUF_FAMILIES.contains(f))
            .ok_or_else(|| unsupported(format!("{arch} (gguf)")))?;
        // A key that is present with the wrong type is an error naming it, never a silent default.
        let wrong_type = |full: &str, v: &gguf_file::Value, expected: &str| {
            Error::ModelConfig(format!(
                "GGUF metadata '{full}' is {:?}; expected {expected}",
                v.value_type()
            ))
        };
        let opt_u = |key: &str| -> Result<Option<usize>> {
            let full = format!("{arch}.{key}");
            let Some(v) = md.get(&full) else { return Ok(None) };
            v.to_u64()
                .ok()
                .or_else(|| v.to_u32().ok().map(u64::from))
                .map(|n| Some(n as usize))
                .ok_or_else(|| wrong_type(&full, v, "an unsigned integer"))
        };
        let get_u = |key: &str| -> Result<usize> {
            opt_u(key)?.ok_or_else(|| Error::ModelConfig(format!("GGUF metadata lacks '{arch}.{key}'")))
        };
        let opt_f = |key: &str| -> Result<Option<f64>> {
            let full = format!("{arch}.{key}");
            let Some(v) = md.get(&full) else { return Ok(None) };
            v.to_f32()
                .map(f64::from)
                .ok()
                .or_else(|| v.to_f64().ok())
                .map(Some)
                .ok_or_else(|| wrong_type(&full, v, "a float"))
        };
        let hidden_size = get_u("embedding_length")?;
        let num_heads = get_u("attention.head_count")?;
        let num_kv_heads = opt_u("attention.head_count_kv")?.unwrap_or(num_heads);
        let head_dim = opt_u("attention.key_length")?.unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match md.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()) {
            Some(tokens) => tokens.len(),
            None => get_u("vocab_size")?,
        };
        let rope_scaling = match md
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            None | Some("none") => RopeScaling::Default,
            Some("linear") => RopeScaling::Linear {
                factor: opt_f("rope.scaling.factor")?.unwrap_or(1.0),
            },
            Some(other) => {
                return Err(Error::ModelConfig(format!(
                    "GGUF rope scaling '{other}' is not supported (supported: none, linear)"
                )));
            }
        };
        let num_layers = get_u("block_count")?;
        if num_layers > MAX_LAYERS {
            return Err(Error::ModelConfig(format!(
                "GGUF metadata says {num_layers} layers, far more than any checkpoint holds"
            )));
        }
        let sliding_window = opt_u("attention.sliding_window")?;
        let layer_kinds = (0..num_layers)
            .map(|l| {
                let local = match family {
                    Family::Gemma2 => l % 2 == 0,
                    Family::Gemma3 => (l + 1) % GEMMA3_GLOBAL_EVERY != 0,
                    _ => false,
                };
                if local {
                    AttentionKind::Local
                } else {
                    AttentionKind::Global
                }
            })
            .collect::<Vec<_>>();
        if layer_kinds.contains(&AttentionKind::Local) && sliding_window.is_none() {
            return Err(Error::ModelConfig(format!(
                "GGUF metadata lacks '{arch}.attention.sliding_window'"
            )));
        }
        let mut cfg = ArchConfig {
            vocab_size,
            hidden_size,
            intermediate_size: get_u("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            norm_eps: opt_f("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_theta: opt_f("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: opt_u("context_length")?.unwrap_or(4096),
            tie_word_embeddings: !has_output_weight,
            attn_softcap: opt_f("attn_logit_softcapping")?,
            final_softcap: opt_f("final_logit_softcapping")?,
            sliding_window,
            layer_kinds,
            local_rope_theta: (family == Family::Gemma3).then_some(GEMMA3_LOCAL_ROPE_THETA),
            ..ArchConfig::base(family)
        };
        cfg.apply_family_defaults();
        cfg.validate()?;
        Ok(cfg)
    }
}
