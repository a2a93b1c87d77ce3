//! Reads an HF `config.json` (transformers 4.x and 5.x spellings) into an [`ArchConfig`].

use std::path::Path;

use serde::Deserialize;

use super::config::{Activation, ArchConfig, AttentionKind, Family, MAX_LAYERS, RopeScaling, unsupported};
use crate::error::{Error, Result};

/// A config.json larger than this is not a model configuration (they are a few KiB).
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Gemma 3's default: every sixth layer is global, the others slide.
const GEMMA3_SLIDING_WINDOW_PATTERN: usize = 6;

/// A folder given as a model that has no `config.json`; when it holds GGUF files, the way to
/// open one of them.
fn no_config_json(dir: &Path) -> Error {
    let gguf = std::fs::read_dir(dir).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf")))
    });
    let message = match gguf {
        Some(file) => format!(
            "not a model folder: it has no config.json. To open the GGUF file in it, give the file \
             itself: {}",
            file.display()
        ),
        None => "not a model folder: it has no config.json (a Hugging Face model folder, as save_pretrained \
                 writes it, holds config.json, the .safetensors weights and tokenizer.json)"
            .into(),
    };
    Error::model_file(message, dir)
}

impl ArchConfig {
    /// Reads an HF `config.json`.
    pub fn from_hf_config_file(path: &Path) -> Result<Self> {
        if let Ok(meta) = std::fs::metadata(path) {
            if !meta.is_file() {
                return Err(Error::model_file("config.json is not a regular file", path));
            }
            if meta.len() > MAX_CONFIG_BYTES {
                return Err(Error::model_file(
                    format!(
                        "config.json is {} bytes, far more than a model configuration",
                        meta.len()
                    ),
                    path,
                ));
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => no_config_json(path.parent().unwrap_or(path)),
            _ => Error::io("reading config.json", e, path),
        })?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::model_file(format!("config.json is not valid JSON ({e})"), path))?;
        Self::from_hf_config(&raw).map_err(|e| match e {
            Error::ModelConfig(msg) => Error::model_file(msg, path),
            other => other,
        })
    }

    /// Interprets a parsed HF `config.json` (transformers 4.x and 5.x spellings).
    pub fn from_hf_config(raw: &serde_json::Value) -> Result<Self> {
        let hf: HfConfig = serde_path_to_error::deserialize(raw)
            .map_err(|e| Error::ModelConfig(format!("config.json's '{}' cannot be read: {}", e.path(), e.inner())))?;
        let class = hf.architectures.first().cloned();
        let family = match &class {
            Some(c) => Family::from_hf_class(c),
            None => Family::from_model_type(&hf.model_type),
        }
        .ok_or_else(|| match (&class, hf.model_type.as_str()) {
            (None, "") => Error::ModelConfig(
                "config.json names no architecture (neither \"architectures\" nor \"model_type\")".into(),
            ),
            _ => unsupported(class.clone().unwrap_or_else(|| hf.model_type.clone())),
        })?;
        if matches!(family, Family::Qwen2 | Family::Qwen3 | Family::Llama) && hf.use_sliding_window == Some(true) {
            return Err(Error::ModelConfig(
                "config.json turns sliding-window attention on (use_sliding_window) for a family that Patchbay \
                 runs with full causal attention only"
                    .into(),
            ));
        }
        if hf.scale_attn_by_inverse_layer_idx == Some(true) {
            return Err(Error::ModelConfig(
                "config.json sets scale_attn_by_inverse_layer_idx, which Patchbay does not implement".into(),
            ));
        }
        let required = |value: Option<usize>, key: &str| {
            value.ok_or_else(|| Error::ModelConfig(format!("config.json lacks the integer field '{key}'")))
        };
        let hidden_size = required(hf.hidden_size, "hidden_size")?;
        let num_heads = required(hf.num_attention_heads, "num_attention_heads")?;
        let head_dim = hf.head_dim.unwrap_or(hidden_size / num_heads.max(1));
        let intermediate_size = match (hf.intermediate_size, family) {
            (Some(i), _) => i,
            (None, Family::Gpt2) => 4 * hidden_size,
            (None, _) => required(None, "intermediate_size")?,
        };
        let num_layers = required(hf.num_hidden_layers, "num_hidden_layers")?;
        if num_layers > MAX_LAYERS {
            return Err(Error::ModelConfig(format!(
                "the configuration says {num_layers} layers, far more than any checkpoint holds"
            )));
        }
        let rope = Rope::of(&hf)?;
        let mut cfg = ArchConfig {
            vocab_size: required(hf.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            norm_eps: hf
                .rms_norm_eps
                .or(hf.layer_norm_eps)
                .or(hf.layer_norm_epsilon)
                .unwrap_or(match family {
                    Family::Gpt2 | Family::GptNeoX => 1e-5,
                    _ => 1e-6,
                }),
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(match family {
                Family::GptNeoX => false,
                Family::Gpt2 | Family::Gemma2 | Family::Gemma3 => true,
                _ => false,
            }),
            parallel_residual: family == Family::GptNeoX && hf.use_parallel_residual.unwrap_or(true),
            rotary_dim: match rope.partial_factor {
                Some(f) if family == Family::GptNeoX => (head_dim as f64 * f) as usize,
                _ => 0,
            },
            attention_scale: hf.query_pre_attn_scalar.map_or(0.0, |s| 1.0 / s.sqrt()),
            attn_softcap: hf.attn_logit_softcapping,
            final_softcap: hf.final_logit_softcapping,
            sliding_window: hf.sliding_window,
            local_rope_theta: rope.local_theta,
            bos_token_id: hf
                .bos_token_id
                .as_ref()
                .and_then(serde_json::Value::as_u64)
                .map(|id| id as u32),
            ..ArchConfig::base(family)
        };
        cfg.activation = activation(&hf, family)?;
        cfg.layer_kinds = layer_kinds(&hf, family, cfg.num_layers)?;
        if cfg.layer_kinds.contains(&AttentionKind::Local) && hf.sliding_window.is_none() {
            return Err(Error::ModelConfig(
                "config.json has sliding-window layers but lacks the integer field 'sliding_window'".into(),
            ));
        }
        let activation = cfg.activation;
        cfg.apply_family_defaults();
        cfg.activation = activation;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The MLP activation a config names (`hidden_activation` for Gemma, `activation_function` for
/// GPT-2, `hidden_act` otherwise).
fn activation(hf: &HfConfig, family: Family) -> Result<Activation> {
    let (key, name) = match family {
        Family::Gemma2 | Family::Gemma3 => (
            "hidden_activation",
            hf.hidden_activation
                .as_deref()
                .or(hf.hidden_act.as_deref())
                .unwrap_or("gelu_pytorch_tanh"),
        ),
        Family::Gpt2 => (
            "activation_function",
            hf.activation_function.as_deref().unwrap_or("gelu_new"),
        ),
        Family::GptNeoX => ("hidden_act", hf.hidden_act.as_deref().unwrap_or("gelu")),
        _ => ("hidden_act", hf.hidden_act.as_deref().unwrap_or("silu")),
    };
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::Gelu),
        other => Err(Error::ModelConfig(format!(
            "config.json's {key} is '{other}'; Patchbay implements silu, gelu and gelu with the tanh approximation \
             (gelu_new, gelu_pytorch_tanh)"
        ))),
    }
}

/// Each layer's attention: `layer_types` where the config lists them (transformers 5), else the
/// family's rule (Gemma 2 alternates starting with a sliding layer, Gemma 3 makes every
/// `sliding_window_pattern`-th layer global, Mistral slides everywhere when it has a window).
fn layer_kinds(hf: &HfConfig, family: Family, layers: usize) -> Result<Vec<AttentionKind>> {
    // Other families save layer_types too (all full attention): only Gemma's choose by them.
    if let Some(types) = &hf.layer_types
        && family.is_gemma()
    {
        if types.len() != layers {
            return Err(Error::ModelConfig(format!(
                "config.json's layer_types lists {} layers; num_hidden_layers is {layers}",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(AttentionKind::Global),
                "sliding_attention" => Ok(AttentionKind::Local),
                other => Err(Error::ModelConfig(format!(
                    "config.json's layer_types has '{other}'; Patchbay knows full_attention and sliding_attention"
                ))),
            })
            .collect();
    }
    Ok((0..layers)
        .map(|l| {
            let local = match family {
                Family::Gemma2 => l % 2 == 0,
                Family::Gemma3 => {
                    let pattern = hf
                        .sliding_window_pattern
                        .unwrap_or(GEMMA3_SLIDING_WINDOW_PATTERN)
                        .max(1);
                    (l + 1) % pattern != 0
                }
                Family::Mistral => hf.sliding_window.is_some(),
                _ => false,
            };
            if local {
                AttentionKind::Local
            } else {
                AttentionKind::Global
            }
        })
        .collect())
}

/// The RoPE settings a config describes, wherever it puts them.
struct Rope {
    theta: f64,
    scaling: RopeScaling,
    /// Gemma 3's local layers' base.
    local_theta: Option<f64>,
    /// GPT-NeoX's share of each head that rotates.
    partial_factor: Option<f64>,
}

impl Rope {
    fn of(hf: &HfConfig) -> Result<Self> {
        // transformers 5 moves rope settings into `rope_parameters`, per layer type for Gemma 3;
        // 4.x uses rope_theta + rope_scaling (+ rope_local_base_freq, rotary_pct, rotary_emb_base).
        let params = hf.rope_parameters.as_ref();
        let per_kind = |kind: &str| -> Result<Option<HfRope>> {
            params
                .and_then(|p| p.get(kind))
                .map(|v| {
                    serde_json::from_value(v.clone()).map_err(|e| {
                        Error::ModelConfig(format!("config.json's rope_parameters.{kind} cannot be read: {e}"))
                    })
                })
                .transpose()
        };
        let (global, local) = match (per_kind("full_attention")?, per_kind("sliding_attention")?) {
            (None, None) => {
                let flat: Option<HfRope> = params
                    .map(|p| {
                        serde_json::from_value(p.clone()).map_err(|e| {
                            Error::ModelConfig(format!("config.json's rope_parameters cannot be read: {e}"))
                        })
                    })
                    .transpose()?;
                (flat, None)
            }
            (g, l) => (g, l),
        };
        if let (Some(new), Some(old)) = (&global, &hf.rope_scaling)
            && new.scaling()? != old.scaling()?
        {
            return Err(Error::ModelConfig(
                "config.json's rope_parameters and rope_scaling describe different RoPE scalings".into(),
            ));
        }
        let scaling_source = global
            .as_ref()
            .filter(|g| g.rope_type.is_some())
            .or(hf.rope_scaling.as_ref());
        Ok(Rope {
            theta: global
                .as_ref()
                .and_then(|r| r.rope_theta)
                .or(hf.rope_theta)
                .or(hf.rotary_emb_base)
                .unwrap_or(10_000.0),
            scaling: scaling_source.map_or(Ok(RopeScaling::Default), HfRope::scaling)?,
            local_theta: local.as_ref().and_then(|r| r.rope_theta).or(hf.rope_local_base_freq),
            partial_factor: global
                .as_ref()
                .and_then(|r| r.partial_rotary_factor)
                .or(hf.partial_rotary_factor)
                .or(hf.rotary_pct),
        })
    }
}

/// The fields of an HF `config.json` the decoder reads; the rest are ignored. Optional where
/// transformers has a default (applied in [`ArchConfig::from_hf_config`]); required ones are
/// `Option`s too, so a missing one is named in the error. GPT-2's own spellings are aliases.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: String,
    vocab_size: Option<usize>,
    #[serde(alias = "n_embd")]
    hidden_size: Option<usize>,
    #[serde(alias = "n_inner")]
    intermediate_size: Option<usize>,
    #[serde(alias = "n_layer")]
    num_hidden_layers: Option<usize>,
    #[serde(alias = "n_head")]
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    layer_norm_eps: Option<f64>,
    layer_norm_epsilon: Option<f64>,
    rope_theta: Option<f64>,
    /// transformers 4.x: the scaling alone (null when none).
    rope_scaling: Option<HfRope>,
    /// transformers 5: theta and scaling together, or per layer type (Gemma 3).
    rope_parameters: Option<serde_json::Value>,
    rope_local_base_freq: Option<f64>,
    rotary_pct: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rotary_emb_base: Option<f64>,
    #[serde(alias = "n_positions")]
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    activation_function: Option<String>,
    /// Qwen2/3: sliding-window attention, which Patchbay does not run for them, when true.
    use_sliding_window: Option<bool>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    use_parallel_residual: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    /// An id, or (rarely) a list or null.
    bos_token_id: Option<serde_json::Value>,
}

/// `rope_scaling` / `rope_parameters` of an HF `config.json`.
#[derive(Debug, Deserialize)]
struct HfRope {
    /// "default", "linear", "llama3" (older files spell the key `type`).
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    partial_rotary_factor: Option<f64>,
}

impl HfRope {
    fn scaling(&self) -> Result<RopeScaling> {
        match self.rope_type.as_deref().unwrap_or("default") {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear {
                factor: self.factor.unwrap_or(1.0),
            }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: self.factor.unwrap_or(8.0),
                low_freq_factor: self.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: self.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: self.original_max_position_embeddings.unwrap_or(8192.0),
            }),
            other => Err(Error::ModelConfig(format!(
                "rope scaling '{other}' is not supported (supported: default, linear, llama3)"
            ))),
        }
    }
}
