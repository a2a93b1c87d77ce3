//! Real-sized checkpoints in the layouts the Hub serves: GPT-2 small (openai-community/gpt2's
//! config.json, tensors without the `transformer.` prefix, with its causal-mask buffers) and
//! Pythia-160m (EleutherAI's 4.x config with rotary_pct, rotary_emb_base and inv_freq buffers),
//! random weights written to a folder, loaded and swept with both schedules.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{TempDir, fixture, load_folder, sweep_with, tiny_request};
use patchbay::model::ArchConfig;
use patchbay::model::synthetic::{shape, tensor_shapes};
use patchbay::patching::{Component, Schedule};

/// Writes `config` and random weights named by `rename` (plus `extra` buffers) into `dir`.
fn write_folder(
    dir: &std::path::Path,
    config: &serde_json::Value,
    rename: impl Fn(&str) -> String,
    extra: &[(String, Vec<usize>)],
) {
    let cfg = ArchConfig::from_hf_config(config).unwrap();
    let mut tensors = HashMap::new();
    for (name, dims) in tensor_shapes(&cfg).into_iter().chain(extra.iter().cloned()) {
        let values = common::weight_values(&name, &dims);
        tensors.insert(rename(&name), Tensor::from_vec(values, dims, &Device::Cpu).unwrap());
    }
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(fixture("tiny_tokenizer.json"), dir.join("tokenizer.json")).unwrap();
}

/// Sweeps attn_out with both schedules and checks they agree, and that patching the last layer's
/// resid_post at the last position restores the clean logit difference.
fn sweeps_agree(dir: &std::path::Path) {
    let model = load_folder(dir);
    let mut results = Vec::new();
    for component in [Component::AttnOut, Component::ResidPost] {
        for schedule in Schedule::ALL {
            let result = sweep_with(&model, &tiny_request(component), schedule, 5);
            assert!(result.complete);
            results.push(result);
        }
    }
    for pair in results.chunks(2) {
        for (a, b) in pair[0]
            .patched_logit_diff
            .flat()
            .iter()
            .zip(pair[1].patched_logit_diff.flat())
        {
            assert!((a.unwrap() - b.unwrap()).abs() < 2e-4, "fast {a:?} vs naive {b:?}");
        }
    }
    let post = &results[2];
    let last = post.patched_logit_diff[post.layers() - 1][post.positions() - 1].unwrap();
    assert!((last - post.clean_logit_diff).abs() < 1e-4);
}

#[test]
fn a_gpt2_small_checkpoint_as_the_hub_serves_it_loads_and_sweeps() {
    let config = serde_json::json!({
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
        "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": null,
        "summary_first_dropout": 0.1, "summary_proj_to_labels": true, "summary_type": "cls_index",
        "summary_use_proj": true, "vocab_size": 50257
    });
    let cfg = ArchConfig::from_hf_config(&config).unwrap();
    assert_eq!(
        cfg,
        shape("gpt2-small").unwrap(),
        "the bench's synthetic shape is GPT-2 small"
    );
    let buffers: Vec<(String, Vec<usize>)> = (0..12)
        .map(|l| (format!("transformer.h.{l}.attn.bias"), vec![1, 1, 64, 64]))
        .collect();
    let dir = TempDir::new("gpt2-small");
    write_folder(
        &dir.0,
        &config,
        |n| n.strip_prefix("transformer.").unwrap_or(n).to_owned(),
        &buffers,
    );
    sweeps_agree(&dir.0);
}

#[test]
fn a_pythia_160m_checkpoint_loads_and_sweeps() {
    let config = serde_json::json!({
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
        "hidden_act": "gelu", "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "gpt_neox",
        "num_attention_heads": 12, "num_hidden_layers": 12, "rotary_emb_base": 10000, "rotary_pct": 0.25,
        "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.24.0",
        "use_cache": true, "use_parallel_residual": true, "vocab_size": 50304
    });
    let cfg = ArchConfig::from_hf_config(&config).unwrap();
    assert_eq!(
        cfg,
        shape("pythia-160m").unwrap(),
        "the bench's synthetic shape is Pythia-160m"
    );
    let buffers: Vec<(String, Vec<usize>)> = (0..12)
        .map(|l| (format!("gpt_neox.layers.{l}.attention.rotary_emb.inv_freq"), vec![8, 1]))
        .collect();
    let dir = TempDir::new("pythia-160m");
    write_folder(&dir.0, &config, str::to_owned, &buffers);
    sweeps_agree(&dir.0);
}
