//! One architecture description for every supported checkpoint, read from an HF `config.json`
//! or from GGUF metadata.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `architectures` names (HF) and their GGUF `general.architecture` spellings we can run.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "Qwen3ForCausalLM (gguf: qwen3)",
    "Qwen2ForCausalLM (gguf: qwen2)",
    "LlamaForCausalLM (gguf: llama; SmolLM, SmolLM2, Llama 2/3.x)",
];

/// A config.json larger than this is not a model configuration (they are a few KiB).
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The decoder families the one hookable decoder implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    /// Llama, Llama 3.x, SmolLM/SmolLM2: no QK-norm, no qkv bias.
    Llama,
    /// Qwen2 / Qwen2.5: bias on q, k, v projections.
    Qwen2,
    /// Qwen3 (dense): RMS QK-norm per head, head_dim independent of hidden size.
    Qwen3,
}

impl Family {
    /// The HF class name, as written in `config.json`'s `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    fn from_hf_class(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Family::Llama),
            "Qwen2ForCausalLM" => Some(Family::Qwen2),
            "Qwen3ForCausalLM" => Some(Family::Qwen3),
            _ => None,
        }
    }

    fn from_model_type(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            _ => None,
        }
    }
}

/// How rotary position frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1+ frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Everything the decoder needs to know about a checkpoint's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

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
    /// Whether each attention head has RMS norms on queries and keys (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.family == Family::Qwen3
    }

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
        if let Some(act) = hf.hidden_act.as_deref().filter(|a| !matches!(*a, "silu" | "swish")) {
            return Err(Error::ModelConfig(format!(
                "config.json's hidden_act is '{act}'; Patchbay implements SwiGLU MLPs with silu only"
            )));
        }
        if hf.use_sliding_window == Some(true) {
            return Err(Error::ModelConfig(
                "config.json turns sliding-window attention on (use_sliding_window); Patchbay's attention \
                 is full causal attention only"
                    .into(),
            ));
        }
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
        let required = |value: Option<usize>, key: &str| {
            value.ok_or_else(|| Error::ModelConfig(format!("config.json lacks the integer field '{key}'")))
        };
        let hidden_size = required(hf.hidden_size, "hidden_size")?;
        let num_heads = required(hf.num_attention_heads, "num_attention_heads")?;
        // transformers 5 moves rope settings into `rope_parameters`; 4.x uses rope_theta + rope_scaling.
        // A file with both must not say two things.
        if let (Some(new), Some(old)) = (&hf.rope_parameters, &hf.rope_scaling)
            && new.scaling()? != old.scaling()?
        {
            return Err(Error::ModelConfig(
                "config.json's rope_parameters and rope_scaling describe different RoPE scalings".into(),
            ));
        }
        let rope = hf.rope_parameters.as_ref().or(hf.rope_scaling.as_ref());
        let config = ArchConfig {
            family,
            vocab_size: required(hf.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: required(hf.intermediate_size, "intermediate_size")?,
            num_layers: required(hf.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(num_heads),
            head_dim: hf.head_dim.unwrap_or(hidden_size / num_heads.max(1)),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: hf
                .rope_parameters
                .as_ref()
                .and_then(|r| r.rope_theta)
                .or(hf.rope_theta)
                .unwrap_or(10_000.0),
            rope_scaling: rope.map_or(Ok(RopeScaling::Default), HfRope::scaling)?,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the architecture from GGUF metadata (`general.architecture` and `{arch}.*` keys).
    pub fn from_gguf(content: &gguf_file::Content, has_output_weight: bool) -> Result<Self> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let family = Family::from_model_type(&arch).ok_or_else(|| unsupported(format!("{arch} (gguf)")))?;
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
        let config = ArchConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: get_u("feed_forward_length")?,
            num_layers: get_u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_theta: opt_f("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: opt_u("context_length")?.unwrap_or(4096),
            tie_word_embeddings: !has_output_weight,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::ModelConfig(msg));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 || self.num_layers == 0 {
            return bad(format!(
                "config has zero heads, head_dim or layers (heads {}, kv heads {}, head_dim {}, layers {})",
                self.num_heads, self.num_kv_heads, self.head_dim, self.num_layers
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} is odd; rotary embeddings need it even",
                self.head_dim
            ));
        }
        Ok(())
    }

    /// A short human description: "Qwen3ForCausalLM, 28 layers, d=1024, 16 heads (8 kv) × 128".
    pub fn summary(&self) -> String {
        format!(
            "{}, {} layers, d={}, {} heads ({} kv) × {}, vocab {}",
            self.family.hf_class(),
            self.num_layers,
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size
        )
    }
}

/// The fields of an HF `config.json` the decoder reads; the rest are ignored. Optional where
/// transformers has a default (applied in [`ArchConfig::from_hf_config`]); required ones are
/// `Option`s too, so a missing one is named in the error.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: String,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    /// transformers 4.x: the scaling alone (null when none).
    rope_scaling: Option<HfRope>,
    /// transformers 5: theta and scaling together.
    rope_parameters: Option<HfRope>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    /// The MLP's activation: silu (SwiGLU) is what the decoder implements.
    hidden_act: Option<String>,
    /// Qwen2/3: sliding-window attention, which the decoder does not implement, when true.
    use_sliding_window: Option<bool>,
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

/// The error for an architecture the decoder does not implement.
fn unsupported(found: String) -> Error {
    Error::UnsupportedArchitecture {
        found,
        supported: SUPPORTED_ARCHITECTURES.join(", "),
    }
}
