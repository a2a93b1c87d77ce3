//! Where each family keeps its weights: the HF tensor names and shapes of a checkpoint, and how
//! they become the decoder's layers. Three layouts cover every family:
//! - `model.layers.N.*` (Llama, Qwen, Mistral, Gemma): separate q/k/v projections;
//! - GPT-2's `transformer.h.N.*`: fused Conv1D `c_attn` (`[in, out]`, transposed against Linear);
//! - GPT-NeoX's `gpt_neox.layers.N.*`: fused `query_key_value` laid out per head (q, k, v of head 0,
//!   then head 1, …), reordered here to all queries, then keys, then values.

use candle_core::Tensor;
use candle_nn::{Linear, VarBuilder};

use super::config::{ArchConfig, Family};
use super::layers::{Attention, Layer, Mlp, Norm, linear, rows_of, stacked_linear};
use crate::error::Result;

/// The weights the decoder runs on, whatever the family's names.
pub(super) struct Weights {
    /// Token embeddings, `[vocab, hidden]`.
    pub(super) embed: Tensor,
    /// Learned position embeddings, `[positions, hidden]` (GPT-2).
    pub(super) positions: Option<Tensor>,
    pub(super) layers: Vec<Layer>,
    pub(super) final_norm: Norm,
    /// The unembedding, `[vocab, hidden]`.
    pub(super) lm_head: Tensor,
}

/// The prefix of layer `N`'s tensors in a family's checkpoints ("model.layers.", …).
pub fn layer_prefix(family: Family) -> &'static str {
    match family {
        Family::Gpt2 => "transformer.h.",
        Family::GptNeoX => "gpt_neox.layers.",
        _ => "model.layers.",
    }
}

/// A checkpoint tensor's name as [`tensor_shapes`] spells it: GPT-2 checkpoints saved from the base
/// model (as openai-community/gpt2 is) lack the `transformer.` prefix.
pub fn canonical_name(family: Family, name: &str) -> String {
    if family == Family::Gpt2 && !name.starts_with("transformer.") && name != "lm_head.weight" {
        format!("transformer.{name}")
    } else {
        name.to_owned()
    }
}

/// Buffers some checkpoints carry that are not weights (causal masks, RoPE frequencies).
pub fn is_buffer(name: &str) -> bool {
    [
        ".attn.bias",
        ".attn.masked_bias",
        ".attention.bias",
        ".attention.masked_bias",
        "rotary_emb.inv_freq",
    ]
    .iter()
    .any(|suffix| name.ends_with(suffix))
}

/// HF tensor names and shapes of a checkpoint with this architecture (the tests write their
/// random-weight checkpoints from it too).
pub fn tensor_shapes(cfg: &ArchConfig) -> Vec<(String, Vec<usize>)> {
    match cfg.family {
        Family::Gpt2 => gpt2_shapes(cfg),
        Family::GptNeoX => neox_shapes(cfg),
        _ => llama_shapes(cfg),
    }
}

fn llama_shapes(cfg: &ArchConfig) -> Vec<(String, Vec<usize>)> {
    let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let mut out = vec![("model.embed_tokens.weight".to_owned(), vec![cfg.vocab_size, d])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        if cfg.sandwich_norms {
            out.push((format!("{p}.pre_feedforward_layernorm.weight"), vec![d]));
            out.push((format!("{p}.post_feedforward_layernorm.weight"), vec![d]));
        }
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, d]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q]));
        if cfg.family == Family::Qwen2 {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        if cfg.qk_norm {
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

fn gpt2_shapes(cfg: &ArchConfig) -> Vec<(String, Vec<usize>)> {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let mut out = vec![
        ("transformer.wte.weight".to_owned(), vec![cfg.vocab_size, d]),
        (
            "transformer.wpe.weight".to_owned(),
            vec![cfg.max_position_embeddings, d],
        ),
    ];
    for l in 0..cfg.num_layers {
        let p = format!("transformer.h.{l}");
        for (name, shape) in [
            ("ln_1.weight", vec![d]),
            ("ln_1.bias", vec![d]),
            ("attn.c_attn.weight", vec![d, 3 * d]),
            ("attn.c_attn.bias", vec![3 * d]),
            ("attn.c_proj.weight", vec![d, d]),
            ("attn.c_proj.bias", vec![d]),
            ("ln_2.weight", vec![d]),
            ("ln_2.bias", vec![d]),
            ("mlp.c_fc.weight", vec![d, i]),
            ("mlp.c_fc.bias", vec![i]),
            ("mlp.c_proj.weight", vec![i, d]),
            ("mlp.c_proj.bias", vec![d]),
        ] {
            out.push((format!("{p}.{name}"), shape));
        }
    }
    out.push(("transformer.ln_f.weight".to_owned(), vec![d]));
    out.push(("transformer.ln_f.bias".to_owned(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_owned(), vec![cfg.vocab_size, d]));
    }
    out
}

fn neox_shapes(cfg: &ArchConfig) -> Vec<(String, Vec<usize>)> {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let qkv = 3 * cfg.num_heads * cfg.head_dim;
    let mut out = vec![("gpt_neox.embed_in.weight".to_owned(), vec![cfg.vocab_size, d])];
    for l in 0..cfg.num_layers {
        let p = format!("gpt_neox.layers.{l}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![d]),
            ("input_layernorm.bias", vec![d]),
            ("post_attention_layernorm.weight", vec![d]),
            ("post_attention_layernorm.bias", vec![d]),
            ("attention.query_key_value.weight", vec![qkv, d]),
            ("attention.query_key_value.bias", vec![qkv]),
            ("attention.dense.weight", vec![d, qkv / 3]),
            ("attention.dense.bias", vec![d]),
            ("mlp.dense_h_to_4h.weight", vec![i, d]),
            ("mlp.dense_h_to_4h.bias", vec![i]),
            ("mlp.dense_4h_to_h.weight", vec![d, i]),
            ("mlp.dense_4h_to_h.bias", vec![d]),
        ] {
            out.push((format!("{p}.{name}"), shape));
        }
    }
    out.push(("gpt_neox.final_layer_norm.weight".to_owned(), vec![d]));
    out.push(("gpt_neox.final_layer_norm.bias".to_owned(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("embed_out.weight".to_owned(), vec![cfg.vocab_size, d]));
    }
    out
}

/// Loads the decoder's weights from a checkpoint with the family's names.
pub(super) fn load(cfg: &ArchConfig, vb: VarBuilder) -> Result<Weights> {
    match cfg.family {
        Family::Gpt2 => load_gpt2(cfg, vb),
        Family::GptNeoX => load_neox(cfg, vb),
        _ => load_llama(cfg, vb),
    }
}

/// The query, key/value and whole qkv views of a stacked `[q + 2 kv, hidden]` projection.
fn attention(cfg: &ArchConfig, qkv_proj: Linear, o_proj: Linear, norms: [Option<Norm>; 3]) -> Result<Attention> {
    let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let [q_norm, k_norm, post_norm] = norms;
    Ok(Attention {
        q_proj: rows_of(&qkv_proj, 0, q)?,
        kv_proj: rows_of(&qkv_proj, q, 2 * kv)?,
        qkv_proj,
        o_proj,
        q_norm,
        k_norm,
        post_norm,
    })
}

fn load_llama(cfg: &ArchConfig, vb: VarBuilder) -> Result<Weights> {
    let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let vbm = vb.pp("model");
    let embed = vbm.get((cfg.vocab_size, d), "embed_tokens.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let vbl = vbm.pp(format!("layers.{l}"));
        let va = vbl.pp("self_attn");
        let qkv_proj = stacked_linear(
            d,
            &[
                (cfg.num_heads * hd, va.pp("q_proj")),
                (cfg.num_kv_heads * hd, va.pp("k_proj")),
                (cfg.num_kv_heads * hd, va.pp("v_proj")),
            ],
        )?;
        let qk_norm =
            |name: &str| -> Result<Option<Norm>> { cfg.qk_norm.then(|| Norm::load(cfg, hd, va.pp(name))).transpose() };
        // Gemma's post_attention_layernorm normalises the attention output; its MLP's input norm is
        // pre_feedforward_layernorm. Elsewhere post_attention_layernorm is the MLP's input norm.
        let (post_attn, mlp_norm, post_mlp) = if cfg.sandwich_norms {
            (
                Some(Norm::load(cfg, d, vbl.pp("post_attention_layernorm"))?),
                Norm::load(cfg, d, vbl.pp("pre_feedforward_layernorm"))?,
                Some(Norm::load(cfg, d, vbl.pp("post_feedforward_layernorm"))?),
            )
        } else {
            (None, Norm::load(cfg, d, vbl.pp("post_attention_layernorm"))?, None)
        };
        let attn = attention(
            cfg,
            qkv_proj,
            linear(cfg.num_heads * hd, d, va.pp("o_proj"))?,
            [qk_norm("q_norm")?, qk_norm("k_norm")?, post_attn],
        )?;
        let vm = vbl.pp("mlp");
        layers.push(Layer {
            attn_norm: Norm::load(cfg, d, vbl.pp("input_layernorm"))?,
            attn,
            mlp_norm,
            mlp: Mlp {
                gate_proj: Some(linear(d, i, vm.pp("gate_proj"))?),
                up_proj: linear(d, i, vm.pp("up_proj"))?,
                down_proj: linear(i, d, vm.pp("down_proj"))?,
                activation: cfg.activation,
                post_norm: post_mlp,
            },
        });
    }
    let lm_head = lm_head(cfg, &vb, &embed)?;
    Ok(Weights {
        embed,
        positions: None,
        layers,
        final_norm: Norm::load(cfg, d, vbm.pp("norm"))?,
        lm_head,
    })
}

/// The unembedding of a checkpoint named `lm_head.weight`: tied checkpoints usually omit it, and
/// use the embeddings then.
fn lm_head(cfg: &ArchConfig, vb: &VarBuilder, embed: &Tensor) -> Result<Tensor> {
    Ok(if !cfg.tie_word_embeddings && vb.contains_tensor("lm_head.weight") {
        vb.get((cfg.vocab_size, cfg.hidden_size), "lm_head.weight")?
    } else {
        embed.clone()
    })
}

/// A Conv1D layer (`weight` `[in, out]`) as a Linear (`[out, in]`).
fn conv1d(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((in_dim, out_dim), "weight")?.t()?.contiguous()?;
    Ok(Linear::new(weight, Some(vb.get(out_dim, "bias")?)))
}

fn load_gpt2(cfg: &ArchConfig, vb: VarBuilder) -> Result<Weights> {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let vbt = if vb.contains_tensor("transformer.wte.weight") {
        vb.pp("transformer")
    } else {
        vb.clone()
    };
    let embed = vbt.get((cfg.vocab_size, d), "wte.weight")?;
    let positions = vbt.get((cfg.max_position_embeddings, d), "wpe.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let vbl = vbt.pp(format!("h.{l}"));
        let attn = attention(
            cfg,
            conv1d(d, 3 * d, vbl.pp("attn.c_attn"))?,
            conv1d(d, d, vbl.pp("attn.c_proj"))?,
            [None, None, None],
        )?;
        layers.push(Layer {
            attn_norm: Norm::load(cfg, d, vbl.pp("ln_1"))?,
            attn,
            mlp_norm: Norm::load(cfg, d, vbl.pp("ln_2"))?,
            mlp: Mlp {
                gate_proj: None,
                up_proj: conv1d(d, i, vbl.pp("mlp.c_fc"))?,
                down_proj: conv1d(i, d, vbl.pp("mlp.c_proj"))?,
                activation: cfg.activation,
                post_norm: None,
            },
        });
    }
    let lm_head = lm_head(cfg, &vb, &embed)?;
    Ok(Weights {
        embed,
        positions: Some(positions),
        layers,
        final_norm: Norm::load(cfg, d, vbt.pp("ln_f"))?,
        lm_head,
    })
}

/// GPT-NeoX's per-head `[heads × (q, k, v) × head_dim, ..]` rows as `[q of every head, k…, v…]`.
fn neox_qkv_rows(t: &Tensor, heads: usize, hd: usize) -> Result<Tensor> {
    let rest: usize = t.dims()[1..].iter().product();
    let dims = t.dims().to_vec();
    Ok(t.reshape((heads, 3, hd, rest))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape(dims)?)
}

fn load_neox(cfg: &ArchConfig, vb: VarBuilder) -> Result<Weights> {
    let (d, i, heads, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim);
    let vbn = vb.pp("gpt_neox");
    let embed = vbn.get((cfg.vocab_size, d), "embed_in.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let vbl = vbn.pp(format!("layers.{l}"));
        let vq = vbl.pp("attention.query_key_value");
        let qkv = Linear::new(
            neox_qkv_rows(&vq.get((3 * heads * hd, d), "weight")?, heads, hd)?,
            Some(neox_qkv_rows(&vq.get(3 * heads * hd, "bias")?, heads, hd)?),
        );
        let attn = attention(
            cfg,
            qkv,
            linear(heads * hd, d, vbl.pp("attention.dense"))?,
            [None, None, None],
        )?;
        layers.push(Layer {
            attn_norm: Norm::load(cfg, d, vbl.pp("input_layernorm"))?,
            attn,
            mlp_norm: Norm::load(cfg, d, vbl.pp("post_attention_layernorm"))?,
            mlp: Mlp {
                gate_proj: None,
                up_proj: linear(d, i, vbl.pp("mlp.dense_h_to_4h"))?,
                down_proj: linear(i, d, vbl.pp("mlp.dense_4h_to_h"))?,
                activation: cfg.activation,
                post_norm: None,
            },
        });
    }
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        vb.get((cfg.vocab_size, d), "embed_out.weight")?
    };
    Ok(Weights {
        embed,
        positions: None,
        layers,
        final_norm: Norm::load(cfg, d, vbn.pp("final_layer_norm"))?,
        lm_head,
    })
}
