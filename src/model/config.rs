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
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => no_config_json(path.parent().unwrap_or(path)),
            _ => Error::io("reading config.json", e, path),
        })?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::model_file(format!("config.json is not valid JSON ({e})"), path))?;
        Self::from_hf_config(&raw).map_err(|e| match e {
            Error::Input(msg) => Error::model_file(msg, path),
            other => other,
        })
    }

    /// Interprets a parsed HF `config.json` (transformers 4.x and 5.x spellings).
    pub fn from_hf_config(raw: &serde_json::Value) -> Result<Self> {
        let class = raw["architectures"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let model_type = raw["model_type"].as_str().unwrap_or_default();
        let family = match &class {
            Some(c) => Family::from_hf_class(c),
            None => Family::from_model_type(model_type),
        }
        .ok_or_else(|| match (&class, model_type) {
            (None, "") => {
                Error::Input("config.json names no architecture (neither \"architectures\" nor \"model_type\")".into())
            }
            _ => Error::UnsupportedArchitecture {
                found: class.clone().unwrap_or_else(|| model_type.to_owned()),
            },
        })?;

        let usize_field = |key: &str| -> Result<usize> {
            raw[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::Input(format!("config.json lacks the integer field '{key}'")))
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_heads = usize_field("num_attention_heads")?;
        let num_kv_heads = raw["num_key_value_heads"].as_u64().map_or(num_heads, |v| v as usize);
        let head_dim = raw["head_dim"]
            .as_u64()
            .map_or(hidden_size / num_heads.max(1), |v| v as usize);
        // transformers 5 moves rope settings into `rope_parameters`; 4.x uses rope_theta + rope_scaling.
        let rope = raw.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = rope
            .and_then(|r| r["rope_theta"].as_f64())
            .or_else(|| raw["rope_theta"].as_f64())
            .unwrap_or(10_000.0);
        let scaling = rope
            .or_else(|| raw.get("rope_scaling").filter(|v| v.is_object()))
            .cloned();
        let rope_scaling = parse_rope_scaling(scaling.as_ref())?;
        let config = ArchConfig {
            family,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_layers: usize_field("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw["max_position_embeddings"].as_u64().unwrap_or(4096) as usize,
            tie_word_embeddings: raw["tie_word_embeddings"].as_bool().unwrap_or(false),
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
        let family = Family::from_model_type(&arch).ok_or_else(|| Error::UnsupportedArchitecture {
            found: format!("{arch} (gguf)"),
        })?;
        let get_u = |key: &str| -> Result<usize> {
            let full = format!("{arch}.{key}");
            md.get(&full)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
                .ok_or_else(|| Error::Input(format!("GGUF metadata lacks '{full}'")))
        };
        let get_f = |key: &str| -> Option<f64> {
            md.get(&format!("{arch}.{key}"))
                .and_then(|v| v.to_f32().map(f64::from).ok().or_else(|| v.to_f64().ok()))
        };
        let hidden_size = get_u("embedding_length")?;
        let num_heads = get_u("attention.head_count")?;
        let num_kv_heads = get_u("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = get_u("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
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
                factor: get_f("rope.scaling.factor").unwrap_or(1.0),
            },
            Some(other) => {
                return Err(Error::Input(format!(
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
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: get_f("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: get_u("context_length").unwrap_or(4096),
            tie_word_embeddings: !has_output_weight,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Input(msg));
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

fn parse_rope_scaling(scaling: Option<&serde_json::Value>) -> Result<RopeScaling> {
    let Some(s) = scaling else {
        return Ok(RopeScaling::Default);
    };
    let kind = s["rope_type"]
        .as_str()
        .or_else(|| s["type"].as_str())
        .unwrap_or("default");
    let num = |key: &str, default: f64| s[key].as_f64().unwrap_or(default);
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor", 1.0),
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor", 8.0),
            low_freq_factor: num("low_freq_factor", 1.0),
            high_freq_factor: num("high_freq_factor", 4.0),
            original_max_position_embeddings: num("original_max_position_embeddings", 8192.0),
        }),
        other => Err(Error::Input(format!(
            "rope scaling '{other}' is not supported (supported: default, linear, llama3)"
        ))),
    }
}
