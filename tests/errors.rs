//! Bad input gets a clear message, never a panic, through the library: sweep inputs, model files
//! and folders, strict loading. tests/cli.rs has the command line's.

mod common;

use common::{IOI_CLEAN, IOI_CORRUPTED, TempDir, fixture_json, load_folder, write_tiny, write_tiny_model};
use patchbay::model::{DeviceChoice, DtypeChoice, Model, ModelSource};
use patchbay::patching::Component;
use patchbay::patching::{Sweep, SweepRequest};

fn request(clean: &str, corrupted: &str, correct: &str, incorrect: &str) -> SweepRequest {
    SweepRequest {
        clean: clean.into(),
        corrupted: corrupted.into(),
        correct: correct.into(),
        incorrect: incorrect.into(),
        component: Component::ResidPost,
        direction: Default::default(),
        by_position: false,
        prepend_bos: false,
    }
}

fn refusal(model: &Model, req: SweepRequest) -> String {
    match Sweep::prepare(model, &req, 10) {
        Ok(_) => panic!("expected a refusal for {req:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sweep_input_refusals_explain_themselves() {
    let dir = TempDir::new("refusals");
    let model = load_folder(std::path::Path::new(&write_tiny(&dir, "tiny-qwen3")));

    let msg = refusal(&model, request("", IOI_CORRUPTED, " John", " Mary"));
    assert!(msg.contains("clean prompt is empty"), "{msg}");
    let msg = refusal(&model, request(IOI_CLEAN, "   ", " John", " Mary"));
    assert!(msg.contains("corrupted prompt is empty"), "{msg}");

    let msg = refusal(
        &model,
        request(
            IOI_CLEAN,
            "After John and Mary went to the big store, John gave a bottle of milk to",
            " John",
            " Mary",
        ),
    );
    assert!(msg.contains("different token lengths"), "{msg}");
    assert!(msg.contains("clean 16"), "{msg}");
    assert!(msg.contains("[9]\" Mary\""), "shows the clean tokens: {msg}");

    let msg = refusal(&model, request(IOI_CLEAN, IOI_CORRUPTED, " Johnathan", " Mary"));
    assert!(
        msg.contains("correct answer \" Johnathan\" is") && msg.contains("exactly one token"),
        "{msg}"
    );
    assert!(msg.contains("\" John\" + "), "shows how it tokenizes: {msg}");

    let msg = refusal(&model, request(IOI_CLEAN, IOI_CORRUPTED, " John", ""));
    assert!(msg.contains("incorrect answer is empty"), "{msg}");

    let msg = refusal(&model, request(IOI_CLEAN, IOI_CORRUPTED, " John", " John"));
    assert!(msg.contains("same token"), "{msg}");
}

#[test]
fn equal_logit_differences_are_reported_not_divided_by() {
    let dir = TempDir::new("equal-ld");
    let model = load_folder(std::path::Path::new(&write_tiny(&dir, "tiny-qwen3")));
    let sweep = Sweep::prepare(&model, &request(IOI_CLEAN, IOI_CLEAN, " John", " Mary"), 10).unwrap();
    assert_eq!(sweep.result().clean_logit_diff, sweep.result().corrupted_logit_diff);
    assert!(sweep.result().warnings.iter().any(|w| w.contains("undefined")));
    let result = sweep
        .run(
            &Default::default(),
            &std::sync::atomic::AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap();
    assert!(result.values.flat().iter().all(|v| v.is_none()));
    assert!(result.patched_logit_diff.flat().iter().all(|v| v.is_some()));
}

fn load_error(source: ModelSource) -> String {
    match Model::load(&source, DeviceChoice::Cpu, DtypeChoice::Auto, &mut |_| {}) {
        Ok(_) => panic!("expected {source:?} to fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_and_corrupt_model_files_are_reported_with_their_path() {
    let msg = ModelSource::parse("/nonexistent/model.gguf").unwrap_err().to_string();
    assert!(
        msg.contains("model not found") && msg.contains("/nonexistent/model.gguf"),
        "{msg}"
    );

    let dir = TempDir::new("corrupt");
    let model_dir = dir.0.join("m");
    let reference = fixture_json("tiny_reference.json");
    write_tiny_model(&model_dir, &reference["models"][0]["config"]);

    // Truncated weights.
    let weights = model_dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_error(ModelSource::Folder(model_dir.clone()));
    assert!(
        msg.contains("truncated or corrupt") && msg.contains("model.safetensors"),
        "{msg}"
    );

    // Missing tokenizer.
    std::fs::write(&weights, &bytes).unwrap();
    std::fs::remove_file(model_dir.join("tokenizer.json")).unwrap();
    let msg = load_error(ModelSource::Folder(model_dir.clone()));
    assert!(msg.contains("tokenizer.json is missing"), "{msg}");

    // Unsupported architecture.
    let mut config = reference["models"][0]["config"].clone();
    config["architectures"] = serde_json::json!(["MambaForCausalLM"]);
    std::fs::write(model_dir.join("config.json"), config.to_string()).unwrap();
    let msg = load_error(ModelSource::Folder(model_dir.clone()));
    assert!(
        msg.contains("MambaForCausalLM")
            && msg.contains("Qwen3ForCausalLM")
            && msg.contains("GPT2LMHeadModel")
            && msg.contains("Gemma3ForCausalLM"),
        "{msg}"
    );

    // No architecture named at all.
    std::fs::write(model_dir.join("config.json"), "{}").unwrap();
    let msg = load_error(ModelSource::Folder(model_dir.clone()));
    assert!(msg.contains("config.json names no architecture"), "{msg}");

    // A folder that is no model folder.
    let empty = dir.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let msg = load_error(ModelSource::Folder(empty));
    assert!(
        msg.contains("not a model folder: it has no config.json") && msg.ends_with("empty"),
        "{msg}"
    );

    // A folder holding a GGUF file: give the file.
    let gguf_folder = dir.0.join("gguf-folder");
    std::fs::create_dir_all(&gguf_folder).unwrap();
    std::fs::write(gguf_folder.join("model.gguf"), b"GGUF").unwrap();
    let msg = load_error(ModelSource::Folder(gguf_folder));
    assert!(
        msg.contains("give the file itself") && msg.contains("model.gguf"),
        "{msg}"
    );

    // Not a GGUF file.
    let fake = dir.0.join("fake.gguf");
    std::fs::write(&fake, b"this is not a gguf file at all").unwrap();
    let msg = load_error(ModelSource::Gguf(fake));
    assert!(
        msg.contains("not a readable GGUF file") && msg.contains("fake.gguf"),
        "{msg}"
    );
}

/// Loaders refuse what they do not understand, naming the file and the field, and validate sizes
/// against the tensors present before allocating anything; nothing panics or aborts.
#[test]
fn strict_loaders_refuse_what_they_do_not_understand() {
    let dir = TempDir::new("strict");
    let qwen3 = fixture_json("tiny_reference.json")["models"][0]["config"].clone();
    // Writes the tiny Qwen3 model with its config.json changed by `edit`; returns the load's error.
    let refusal = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> String {
        let folder = dir.0.join(name);
        let mut config = qwen3.clone();
        write_tiny_model(&folder, &config);
        edit(&mut config);
        std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
        let msg = load_error(ModelSource::Folder(folder));
        assert!(msg.ends_with("config.json") || msg.contains(name), "{name}: {msg}");
        msg
    };
    let msg = refusal("theta-string", &|c| c["rope_theta"] = "1e6".into());
    assert!(
        msg.contains("'rope_theta'") && msg.contains("invalid type: string"),
        "{msg}"
    );
    let msg = refusal("relu2", &|c| c["hidden_act"] = "relu2".into());
    assert!(msg.contains("hidden_act is 'relu2'") && msg.contains("gelu"), "{msg}");
    // A family's field that is missing is named.
    let msg = refusal("gemma-window", &|c| {
        c["architectures"] = serde_json::json!(["Gemma3ForCausalLM"]);
        c["model_type"] = "gemma3_text".into();
        c["layer_types"] = serde_json::json!(["sliding_attention", "sliding_attention", "full_attention"]);
        c.as_object_mut().unwrap().remove("sliding_window");
    });
    assert!(msg.contains("'sliding_window'"), "{msg}");
    let msg = refusal("sliding", &|c| c["use_sliding_window"] = true.into());
    assert!(msg.contains("sliding-window"), "{msg}");
    let msg = refusal("yarn", &|c| {
        // transformers 4's layout.
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["rope_theta"] = 1e6.into();
        c["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
    });
    assert!(msg.contains("rope scaling 'yarn' is not supported"), "{msg}");
    let msg = refusal("two-ropes", &|c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 4.0})
    });
    assert!(msg.contains("describe different RoPE scalings"), "{msg}");
    // Qwen3 weights called Llama: the QK-norm tensors would be dropped without a word.
    let msg = refusal("wrong-arch", &|c| {
        c["architectures"] = serde_json::json!(["LlamaForCausalLM"])
    });
    assert!(msg.contains("does not use") && msg.contains("q_norm"), "{msg}");
    // A layer count far beyond the weights: refused from the tensors, nothing allocated.
    let msg = refusal("layers", &|c| c["num_hidden_layers"] = (1u64 << 62).into());
    assert!(
        msg.contains("the configuration says 4611686018427387904 layers"),
        "{msg}"
    );
    let msg = refusal("fewer-layers", &|c| c["num_hidden_layers"] = 2.into());
    assert!(
        msg.contains("the configuration says 2 layers, the weights have 3"),
        "{msg}"
    );
    let msg = refusal("kv-heads", &|c| c["num_key_value_heads"] = 4.into());
    assert!(msg.contains("has shape") && msg.contains("k_proj"), "{msg}");

    // A huge context length costs nothing until a prompt uses it (RoPE tables grow on demand).
    let folder = dir.0.join("long-context");
    let mut config = qwen3.clone();
    config["max_position_embeddings"] = 100_000_000.into();
    write_tiny_model(&folder, &config);
    let model = load_folder(&folder);
    let sweep = Sweep::prepare(&model, &request(IOI_CLEAN, IOI_CORRUPTED, " John", " Mary"), 10).unwrap();
    assert_eq!(sweep.result().positions(), 16);

    // A tokenizer.json that truncates: sweeps still see every token.
    let folder = dir.0.join("truncating");
    write_tiny_model(&folder, &qwen3);
    let path = folder.join("tokenizer.json");
    let mut tokenizer: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tokenizer["truncation"] =
        serde_json::json!({"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0});
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let model = load_folder(&folder);
    let sweep = Sweep::prepare(&model, &request(IOI_CLEAN, IOI_CORRUPTED, " John", " Mary"), 10).unwrap();
    assert_eq!(sweep.result().positions(), 16);

    // config.json that is not a regular file (a FIFO would block a plain read forever).
    let folder = dir.0.join("fifo-config");
    write_tiny_model(&folder, &qwen3);
    std::fs::remove_file(folder.join("config.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", folder.join("config.json")).unwrap();
    let msg = load_error(ModelSource::Folder(folder));
    assert!(msg.contains("config.json is not a regular file"), "{msg}");

    // A weight relabelled as integers in the safetensors header (same size, so the file is valid).
    let folder = dir.0.join("relabelled");
    write_tiny_model(&folder, &qwen3);
    let weights = folder.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    let relabelled = header.replacen("\"F32\"", "\"I32\"", 1);
    assert_ne!(header, relabelled);
    bytes.splice(8..8 + header_len, relabelled.into_bytes());
    std::fs::write(&weights, bytes).unwrap();
    let msg = load_error(ModelSource::Folder(folder));
    assert!(
        msg.contains("is stored as I32; weights must be floating point") && msg.ends_with("model.safetensors"),
        "{msg}"
    );

    // A GGUF key given twice (candle would keep the last).
    let twice = dir.0.join("twice.gguf");
    let (llama, qwen3) = (
        candle_core::quantized::gguf_file::Value::String("llama".into()),
        candle_core::quantized::gguf_file::Value::String("qwen3".into()),
    );
    let mut file = std::fs::File::create(&twice).unwrap();
    candle_core::quantized::gguf_file::write(
        &mut file,
        &[("general.architecture", &llama), ("general.architecture", &qwen3)],
        &[],
    )
    .unwrap();
    drop(file);
    let msg = load_error(ModelSource::Gguf(twice));
    assert!(msg.contains("has the key 'general.architecture' twice"), "{msg}");

    // A tensor in a quantization candle cannot dequantize (IQ2_XXS, ggml type 16).
    let iq = dir.0.join("iq2.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes()); // version
    bytes.extend(1u64.to_le_bytes()); // tensors
    bytes.extend(1u64.to_le_bytes()); // metadata entries
    let (key, value) = (b"general.architecture", b"gemma3");
    bytes.extend((key.len() as u64).to_le_bytes());
    bytes.extend(key);
    bytes.extend(8u32.to_le_bytes()); // string
    bytes.extend((value.len() as u64).to_le_bytes());
    bytes.extend(value);
    let name = b"blk.0.attn_q.weight";
    bytes.extend((name.len() as u64).to_le_bytes());
    bytes.extend(name);
    bytes.extend(2u32.to_le_bytes()); // dimensions
    bytes.extend(256u64.to_le_bytes());
    bytes.extend(4u64.to_le_bytes());
    bytes.extend(16u32.to_le_bytes()); // IQ2_XXS
    bytes.extend(0u64.to_le_bytes()); // offset
    bytes.resize(bytes.len().next_multiple_of(32) + 1024, 0);
    std::fs::write(&iq, bytes).unwrap();
    let msg = load_error(ModelSource::Gguf(iq));
    assert!(
        msg.contains("ggml type 16 (IQ2_XXS)") && msg.contains("Q4_K") && msg.ends_with("iq2.gguf"),
        "{msg}"
    );
    // A GGUF of an architecture the decoder does not implement names it and what is supported.
    let mamba = dir.0.join("mamba.gguf");
    let arch = candle_core::quantized::gguf_file::Value::String("mamba".into());
    let mut file = std::fs::File::create(&mamba).unwrap();
    candle_core::quantized::gguf_file::write(&mut file, &[("general.architecture", &arch)], &[]).unwrap();
    drop(file);
    let msg = load_error(ModelSource::Gguf(mamba));
    assert!(
        msg.contains("mamba (gguf)") && msg.contains("gemma3") && msg.contains("GPT2LMHeadModel"),
        "{msg}"
    );

    // A GGUF header with general.alignment = 0 (candle's reader divides by it).
    let gguf = dir.0.join("zero-alignment.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes()); // version
    bytes.extend(0u64.to_le_bytes()); // tensors
    bytes.extend(1u64.to_le_bytes()); // metadata entries
    let key = b"general.alignment";
    bytes.extend((key.len() as u64).to_le_bytes());
    bytes.extend(key);
    bytes.extend(4u32.to_le_bytes()); // u32
    bytes.extend(0u32.to_le_bytes());
    std::fs::write(&gguf, bytes).unwrap();
    let msg = load_error(ModelSource::Gguf(gguf));
    assert!(
        msg.contains("not a readable GGUF file") && msg.ends_with("zero-alignment.gguf"),
        "{msg}"
    );
}

/// A GGUF file cut short is reported as truncated from its header, naming a tensor and the file,
/// before any tensor is read.
#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn truncated_gguf_is_reported_as_truncated() {
    let dir = TempDir::new("truncated-gguf");
    let bytes = std::fs::read(common::smollm2_gguf()).unwrap();
    let cut = dir.0.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 3 / 4]).unwrap();
    let msg = load_error(ModelSource::Gguf(cut));
    assert!(
        msg.contains("lies outside the file (truncated") && msg.ends_with("cut.gguf"),
        "{msg}"
    );
}
