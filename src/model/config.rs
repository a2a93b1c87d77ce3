//! One architecture description for every supported checkpoint: the families the hookable decoder
//! implements and what sets them apart (norms, MLP, positions, attention variants). It is read from
//! an HF `config.json` ([`super::hf_config`]) or from GGUF metadata ([`super::gguf_config`]).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `architectures` names (HF) and their GGUF `general.architecture` spellings we can run.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "Qwen3ForCausalLM (gguf: qwen3)",
    "Qwen2ForCausalLM (gguf: qwen2)",
    "LlamaForCausalLM (gguf: llama; SmolLM, SmolLM2, Llama 2/3.x)",
    "MistralForCausalLM",
    "Gemma3ForCausalLM (gguf: gemma3; text only)",
    "Gemma2ForCausalLM (gguf: gemma2)",
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM (Pythia)",
];

/// More layers than any checkpoint has: a configuration saying so is refused before per-layer
/// settings are built.
pub(super) const MAX_LAYERS: usize = 1 << 16;

/// The decoder families the one hookable decoder implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    /// Llama, Llama 3.x, SmolLM/SmolLM2: no QK-norm, no qkv bias.
    Llama,
    /// Qwen2 / Qwen2.5: bias on q, k, v projections.
    Qwen2,
    /// Qwen3 (dense): RMS QK-norm per head, head_dim independent of hidden size.
    Qwen3,
    /// Mistral: Llama with sliding-window attention.
    Mistral,
    /// Gemma 2: (1 + w) RMS norms around both blocks, GELU-tanh GeGLU, √hidden-scaled embeddings,
    /// softcapped attention and final logits, sliding window on alternate layers.
    Gemma2,
    /// Gemma 3 (text): Gemma 2's layout with QK-norm instead of softcapping, local sliding-window
    /// layers with their own RoPE base and a global layer every sixth.
    Gemma3,
    /// GPT-2: LayerNorm with bias, learned positions, fused Conv1D qkv, GELU (tanh) MLP.
    Gpt2,
    /// GPT-NeoX / Pythia: LayerNorm with bias, partial rotary, fused per-head qkv, parallel residual.
    GptNeoX,
}

impl Family {
    /// The HF class name, as written in `config.json`'s `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Gpt2 => "GPT2LMHeadModel",
            Family::GptNeoX => "GPTNeoXForCausalLM",
        }
    }

    pub(super) fn from_hf_class(name: &str) -> Option<Self> {
        [
            Family::Llama,
            Family::Qwen2,
            Family::Qwen3,
            Family::Mistral,
            Family::Gemma2,
            Family::Gemma3,
            Family::Gpt2,
            Family::GptNeoX,
        ]
        .into_iter()
        .find(|f| f.hf_class() == name)
    }

    /// A `config.json` `model_type` or a GGUF `general.architecture`.
    pub(super) fn from_model_type(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            "mistral" => Some(Family::Mistral),
            "gemma2" => Some(Family::Gemma2),
            "gemma3_text" | "gemma3" => Some(Family::Gemma3),
            "gpt2" => Some(Family::Gpt2),
            "gpt_neox" | "gptneox" => Some(Family::GptNeoX),
            _ => None,
        }
    }

    /// Gemma's RMS norms scale by (1 + w), its embeddings by √hidden.
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
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

/// The normalisation before (and, in Gemma, after) each block and before the unembedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormKind {
    /// RMSNorm scaling by `w` (Llama, Qwen, Mistral).
    Rms,
    /// RMSNorm scaling by `1 + w` (Gemma; GGUF files store `1 + w` already).
    RmsOffset,
    /// LayerNorm with weight and bias (GPT-2, GPT-NeoX).
    Layer,
}

/// The MLP's nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// SiLU (SwiGLU when gated).
    Silu,
    /// GELU, tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// GELU, exact (erf).
    Gelu,
}

/// Which attention a layer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttentionKind {
    /// Full causal attention, with the global RoPE base.
    Global,
    /// Sliding-window attention (a query sees the last `sliding_window` positions, itself included),
    /// with the local RoPE base where the family has one.
    Local,
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
    /// The norms' epsilon (RMSNorm or LayerNorm).
    #[serde(alias = "rms_norm_eps")]
    pub norm_eps: f64,
    /// The RoPE base of global layers.
    pub rope_theta: f64,
    /// The scaling of global layers' RoPE.
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub norm: NormKind,
    pub activation: Activation,
    /// gate · act(up) MLP (Llama, Qwen, Gemma) rather than act(fc) (GPT-2, NeoX).
    pub gated_mlp: bool,
    /// RMS norms on each head's queries and keys (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Attention and MLP both read the layer's input (GPT-NeoX); their outputs are added to it.
    pub parallel_residual: bool,
    /// Norms on the attention and MLP outputs before they join the residual stream (Gemma).
    pub sandwich_norms: bool,
    /// Embeddings are multiplied by this (Gemma: √hidden, rounded to the model's dtype).
    pub embedding_scale: Option<f64>,
    /// Learned absolute position embeddings added to the token embeddings (GPT-2).
    pub learned_positions: bool,
    /// How many of each head's dimensions RoPE rotates (head_dim; NeoX a fraction; 0 for none).
    pub rotary_dim: usize,
    /// Attention scores are `q·k × attention_scale` (1/√head_dim unless the family says otherwise).
    pub attention_scale: f64,
    /// Attention scores become `cap · tanh(score / cap)` (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Final logits become `cap · tanh(logit / cap)` (Gemma 2).
    pub final_softcap: Option<f64>,
    /// The window of [`AttentionKind::Local`] layers.
    pub sliding_window: Option<usize>,
    /// Each layer's attention.
    pub layer_kinds: Vec<AttentionKind>,
    /// The RoPE base of local layers, when it differs from `rope_theta` (Gemma 3); their RoPE is
    /// never scaled.
    pub local_rope_theta: Option<f64>,
    /// config.json's `bos_token_id`: the BOS a prompt may be given when its tokenizer adds none.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
}

impl ArchConfig {
    /// A Llama-shaped starting point for `family`, sizes zero: the parsers fill in the rest.
    pub fn base(family: Family) -> Self {
        Self {
            family,
            vocab_size: 0,
            hidden_size: 0,
            intermediate_size: 0,
            num_layers: 0,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim: 0,
            norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::Default,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            norm: NormKind::Rms,
            activation: Activation::Silu,
            gated_mlp: true,
            qk_norm: family == Family::Qwen3,
            parallel_residual: false,
            sandwich_norms: false,
            embedding_scale: None,
            learned_positions: false,
            rotary_dim: 0,
            attention_scale: 0.0,
            attn_softcap: None,
            final_softcap: None,
            sliding_window: None,
            layer_kinds: Vec::new(),
            local_rope_theta: None,
            bos_token_id: None,
        }
    }

    /// A config for `family` with these sizes and that family's defaults (full rotary, 1/√head_dim
    /// scaling, global attention everywhere, Gemma's norms and embedding scale): what tests and the
    /// synthetic shapes build.
    #[allow(clippy::too_many_arguments)]
    pub fn sized(
        family: Family,
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_layers: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let mut cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            ..Self::base(family)
        };
        cfg.apply_family_defaults();
        cfg
    }

    /// Fills what follows from the family and the sizes, where a parser left it unset.
    pub(super) fn apply_family_defaults(&mut self) {
        let f = self.family;
        if f.is_gemma() {
            self.norm = NormKind::RmsOffset;
            self.activation = Activation::GeluTanh;
            self.sandwich_norms = true;
            // HF multiplies by a tensor of √hidden in the model's dtype: f32 here, the decoder
            // rounds it again to its own dtype.
            self.embedding_scale = Some(f64::from((self.hidden_size as f32).sqrt()));
            self.qk_norm = f == Family::Gemma3;
        }
        if matches!(f, Family::Gpt2 | Family::GptNeoX) {
            // GPT-2's gelu_new, NeoX's exact gelu (config.json may say otherwise; its parser
            // sets the activation after these defaults).
            self.activation = if f == Family::Gpt2 {
                Activation::GeluTanh
            } else {
                Activation::Gelu
            };
            self.norm = NormKind::Layer;
            self.gated_mlp = false;
            self.parallel_residual = f == Family::GptNeoX && self.parallel_residual;
            self.learned_positions = f == Family::Gpt2;
        }
        if f == Family::Gpt2 {
            self.rotary_dim = 0;
        } else if self.rotary_dim == 0 {
            self.rotary_dim = self.head_dim;
        }
        if self.attention_scale == 0.0 {
            self.attention_scale = 1.0 / (self.head_dim.max(1) as f64).sqrt();
        }
        if self.layer_kinds.len() != self.num_layers {
            self.layer_kinds = vec![AttentionKind::Global; self.num_layers];
        }
    }

    /// Whether each attention head has RMS norms on queries and keys.
    pub fn qk_norm(&self) -> bool {
        self.qk_norm
    }

    /// Layer `layer`'s sliding window, if it has one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        match self.layer_kinds.get(layer) {
            Some(AttentionKind::Local) => self.sliding_window,
            _ => None,
        }
    }

    /// Whether `resid_mid` is a point the forward passes through: with a parallel residual the MLP
    /// reads the layer's input, and nothing reads the attention's sum alone.
    pub fn has_resid_mid(&self) -> bool {
        !self.parallel_residual
    }

    pub(super) fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::ModelConfig(msg));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 || self.num_layers == 0 {
            return bad(format!(
                "config has zero heads, head_dim or layers (heads {}, kv heads {}, head_dim {}, layers {})",
                self.num_heads, self.num_kv_heads, self.head_dim, self.num_layers
            ));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            return bad(format!(
                "config has a zero size (hidden {}, vocab {}, intermediate {})",
                self.hidden_size, self.vocab_size, self.intermediate_size
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > self.head_dim {
            return bad(format!(
                "RoPE would rotate {} of head_dim {} dimensions; it needs an even number, at most head_dim",
                self.rotary_dim, self.head_dim
            ));
        }
        if self.layer_kinds.len() != self.num_layers {
            return bad(format!(
                "config lists {} layer types for {} layers",
                self.layer_kinds.len(),
                self.num_layers
            ));
        }
        if self.layer_kinds.contains(&AttentionKind::Local) && self.sliding_window.is_none_or(|w| w == 0) {
            return bad("config has sliding-window layers but no (or a zero) sliding_window".into());
        }
        if !(self.attention_scale.is_finite() && self.attention_scale > 0.0) {
            return bad(format!(
                "attention scale {} is not a positive number",
                self.attention_scale
            ));
        }
        for (name, cap) in [
            ("attn_logit_softcapping", self.attn_softcap),
            ("final_logit_softcapping", self.final_softcap),
        ] {
            if cap.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
                return bad(format!("{name} must be a positive number"));
            }
        }
        Ok(())
    }

    /// A short human description: "Qwen3ForCausalLM, 28 layers, d=1024, 16 heads (8 kv) × 128".
    pub fn summary(&self) -> String {
        let window = match (
            self.sliding_window,
            self.layer_kinds.iter().filter(|k| **k == AttentionKind::Local).count(),
        ) {
            (Some(w), n) if n > 0 => format!(", window {w} on {n}/{} layers", self.num_layers),
            _ => String::new(),
        };
        format!(
            "{}, {} layers, d={}, {} heads ({} kv) × {}, vocab {}{window}",
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

/// The error for an architecture the decoder does not implement.
pub(super) fn unsupported(found: String) -> Error {
    Error::UnsupportedArchitecture {
        found,
        supported: SUPPORTED_ARCHITECTURES.join(", "),
    }
}
