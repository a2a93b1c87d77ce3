//! Writes the seed corpus of tests/fuzz.rs into `tests/fuzz/corpus/<target>/`: small valid inputs
//! for each loader (a one-layer Llama GGUF with its tokenizer, the tiny models' config.json files,
//! a safetensors file, a small tokenizer.json) and the malformed cases issue reports found.
//!
//!     cargo run --example write_fuzz_corpus

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn main() -> candle_core::Result<()> {
    let root = common::root().join("tests").join("fuzz").join("corpus");
    let dir = |target: &str| -> PathBuf {
        let d = root.join(target);
        std::fs::create_dir_all(&d).expect("corpus folder");
        d
    };

    // GGUF: a one-layer Llama (hidden 8, 2 heads, vocab 6) with a byte-level BPE tokenizer.
    let gguf = tiny_gguf(GGUF_ALIGNMENT)?;
    write(&dir("gguf"), "tiny-llama.gguf", &gguf);
    write(&dir("gguf"), "truncated.gguf", &gguf[..gguf.len() * 2 / 3]);
    write(&dir("gguf"), "zero-alignment.gguf", &tiny_gguf(0)?);
    let arch = Value::String("llama".into());
    let mut twice = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(
        &mut twice,
        &[("general.architecture", &arch), ("general.architecture", &arch)],
        &[],
    )?;
    write(&dir("gguf"), "duplicate-key.gguf", &twice.into_inner());

    // config.json: the tiny reference models, both layouts, and the reported type confusions.
    let config = dir("config");
    let reference = common::fixture_json("tiny_reference.json");
    for model in reference["models"].as_array().expect("models") {
        let name = model["name"].as_str().expect("name");
        for key in ["config", "config_legacy"] {
            if let Some(c) = model.get(key) {
                write(&config, &format!("{name}-{key}.json"), c.to_string().as_bytes());
            }
        }
    }
    let mut c = reference["models"][0]["config"].clone();
    c["rope_theta"] = "1e6".into();
    c["num_hidden_layers"] = (1u64 << 62).into();
    write(&config, "type-confusion.json", c.to_string().as_bytes());

    // safetensors: every tensor of a one-layer Qwen3 of hidden size 4 (a header-sized file).
    let scratch = std::env::temp_dir().join(format!("patchbay-corpus-{}.safetensors", std::process::id()));
    let tensors: std::collections::HashMap<String, Tensor> =
        patchbay::model::synthetic::tensor_shapes(&common::fuzz_arch())
            .into_iter()
            .map(|(name, dims)| {
                let n: usize = dims.iter().product();
                let t = Tensor::from_vec((0..n).map(|i| i as f32 / 8.0).collect::<Vec<f32>>(), dims, &Device::Cpu)?;
                Ok((name, t))
            })
            .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&tensors, &scratch)?;
    write(
        &dir("safetensors"),
        "qwen3-1-layer.safetensors",
        &std::fs::read(&scratch).expect("weights"),
    );
    let _ = std::fs::remove_file(&scratch);

    // tokenizer.json: a small byte-level BPE, and one that truncates.
    let tokenizer = dir("tokenizer");
    write(&tokenizer, "small-bpe.json", SMALL_TOKENIZER.as_bytes());
    let mut truncating: serde_json::Value = serde_json::from_str(SMALL_TOKENIZER).expect("JSON");
    truncating["truncation"] =
        serde_json::json!({"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0});
    write(&tokenizer, "truncating.json", truncating.to_string().as_bytes());
    println!("{}", root.display());
    Ok(())
}

/// GGUF's usual alignment.
const GGUF_ALIGNMENT: u32 = 32;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("corpus file written");
}

/// A one-layer Llama GGUF with `general.alignment` = `alignment`, its tensors in f32.
fn tiny_gguf(alignment: u32) -> candle_core::Result<Vec<u8>> {
    let (d, heads, ff, vocab) = (8usize, 2usize, 16usize, 6usize);
    let tokens = ["a", "b", "ab", "Ġ", "Ġa", "<s>"];
    let strings = |xs: &[&str]| Value::Array(xs.iter().map(|s| Value::String((*s).to_owned())).collect());
    let u32v = |v: usize| Value::U32(v as u32);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.alignment", Value::U32(alignment)),
        ("llama.embedding_length", u32v(d)),
        ("llama.block_count", u32v(1)),
        ("llama.feed_forward_length", u32v(ff)),
        ("llama.attention.head_count", u32v(heads)),
        ("llama.attention.head_count_kv", u32v(heads)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.context_length", u32v(64)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.merges", strings(&["a b", "Ġ a"])),
        (
            "tokenizer.ggml.token_type",
            Value::Array([1, 1, 1, 1, 1, 3].iter().map(|&t| Value::I32(t)).collect()),
        ),
    ];
    let tensor = |dims: &[usize]| -> candle_core::Result<QTensor> {
        let n: usize = dims.iter().product();
        let values: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) / 10.0).collect();
        QTensor::quantize(&Tensor::from_vec(values, dims, &Device::Cpu)?, GgmlDType::F32)
    };
    // GGUF names; shapes in candle's order ([out, in]).
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("token_embd.weight", vec![vocab, d]),
        ("blk.0.attn_norm.weight", vec![d]),
        ("blk.0.ffn_norm.weight", vec![d]),
        ("blk.0.attn_q.weight", vec![d, d]),
        ("blk.0.attn_k.weight", vec![d, d]),
        ("blk.0.attn_v.weight", vec![d, d]),
        ("blk.0.attn_output.weight", vec![d, d]),
        ("blk.0.ffn_gate.weight", vec![ff, d]),
        ("blk.0.ffn_up.weight", vec![ff, d]),
        ("blk.0.ffn_down.weight", vec![d, ff]),
        ("output_norm.weight", vec![d]),
    ];
    let tensors: Vec<(&str, QTensor)> = shapes
        .iter()
        .map(|(name, dims)| Ok((*name, tensor(dims)?)))
        .collect::<candle_core::Result<_>>()?;
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut out, &md, &ts)?;
    Ok(out.into_inner())
}

/// A byte-level BPE tokenizer.json with a handful of tokens and merges.
const SMALL_TOKENIZER: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [{"id": 5, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "post_processor": null,
  "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
  "model": {
    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġa": 4, "<s>": 5},
    "merges": ["a b", "Ġ a"]
  }
}"#;
