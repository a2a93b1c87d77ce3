//! Loading models: where the files come from, their architecture, weights and tokenizer.

pub mod attention;
pub mod cones;
pub mod config;
pub mod decoder;
pub mod device;
pub mod families;
pub mod gguf;
pub mod gguf_config;
pub mod gguf_sentencepiece;
pub mod grad;
pub mod hf_config;
pub mod hub;
pub mod kernels;
pub mod layers;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

/// The largest absolute difference between two tensors of the same shape (f32), for tests.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

pub use cones::{Cone, PromptsForward};
pub use config::{ArchConfig, Family};
pub use decoder::{Forward, HeadActivations, Hooks, LayerKv, NoHooks, Site, Span, Transformer};
pub use device::{DeviceChoice, DeviceKind, DtypeChoice};
pub use grad::SiteGradients;
pub use hub::DownloadProgress;
pub use tokenizer::TextTokenizer;

use crate::error::{Error, Result, candle_text};

/// The model Patchbay opens when the user has not chosen one.
pub const DEFAULT_MODEL: &str = "Qwen/Qwen3-0.6B";

/// Where a model's files come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelSource {
    /// A Hugging Face Hub repo id, fetched through the shared HF cache.
    Hub { repo_id: String, revision: String },
    /// A folder with config.json, *.safetensors and tokenizer.json (transformers' `save_pretrained`).
    Folder(PathBuf),
    /// A single GGUF file (weights dequantized at load, tokenizer from its metadata).
    Gguf(PathBuf),
    /// Random weights in the shape of a known model, built in memory ([`synthetic::SHAPES`]).
    Synthetic { shape: String, seed: u64 },
}

impl ModelSource {
    /// Interprets what a user typed: an existing `.gguf` file, an existing folder, or `owner/name`.
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(Error::Input(
                "no model given: name a Hub repo id, a model folder or a .gguf file".into(),
            ));
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(ModelSource::Folder(path.to_owned()));
        }
        if path.is_file() {
            return if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                Ok(ModelSource::Gguf(path.to_owned()))
            } else {
                Err(Error::model_file(
                    "expected a .gguf file or a folder with config.json, *.safetensors and tokenizer.json",
                    path,
                ))
            };
        }
        let looks_like_path = spec.starts_with('/')
            || spec.starts_with('.')
            || spec.starts_with('~')
            || spec.ends_with(".gguf")
            || spec.contains('\\');
        if !looks_like_path && hub::is_repo_id(spec) {
            let (repo_id, revision) = match spec.split_once('@') {
                Some((r, rev)) => (r.to_owned(), rev.to_owned()),
                None => (spec.to_owned(), "main".to_owned()),
            };
            return Ok(ModelSource::Hub { repo_id, revision });
        }
        Err(Error::model_file(
            "model not found (no such file or folder, and not a Hub repo id like 'Qwen/Qwen3-0.6B')",
            path,
        ))
    }

    /// The files the model is read from, where they are known before loading (a GGUF file, a
    /// folder's config, tokenizer and weights): what results must never be written over.
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            ModelSource::Gguf(path) => vec![path.clone()],
            ModelSource::Folder(dir) => {
                let mut files: Vec<PathBuf> = ["config.json", "tokenizer.json", "model.safetensors.index.json"]
                    .iter()
                    .map(|name| dir.join(name))
                    .collect();
                if let Ok(entries) = std::fs::read_dir(dir) {
                    files.extend(
                        entries
                            .flatten()
                            .map(|e| e.path())
                            .filter(|p| p.extension().is_some_and(|x| x == "safetensors")),
                    );
                }
                files
            }
            ModelSource::Hub { .. } | ModelSource::Synthetic { .. } => Vec::new(),
        }
    }

    /// A short name for titles and exports: the repo id or the file/folder name.
    pub fn display_name(&self) -> String {
        match self {
            ModelSource::Hub { repo_id, .. } => repo_id.clone(),
            ModelSource::Synthetic { shape, seed } => format!("synthetic {shape} (random weights, seed {seed})"),
            ModelSource::Folder(p) | ModelSource::Gguf(p) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
        }
    }
}

/// Progress of a model load, for status lines.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadProgress {
    /// Bytes of a file arriving from the Hub.
    Download(DownloadProgress),
    /// A loading stage ("reading weights", "building tokenizer").
    Stage(String),
}

/// A loaded model: the hookable decoder, its tokenizer and where it came from.
pub struct Model {
    /// What the user asked for.
    pub source: ModelSource,
    /// The architecture read from the checkpoint.
    pub config: ArchConfig,
    /// The decoder.
    pub transformer: Transformer,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// Seconds spent loading (download excluded).
    pub load_seconds: f64,
}

impl Model {
    /// Loads a model on `device` in `dtype` ([`DtypeChoice::Auto`]: the device's default).
    pub fn load(
        source: &ModelSource,
        device: DeviceChoice,
        dtype: DtypeChoice,
        on_progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let dev = device.open()?;
        let dtype = dtype.resolve(device);
        if dev.is_cpu() && dtype == DType::F16 {
            return Err(Error::Input(
                "f16 is not supported on the CPU: use f32 (or bf16)".into(),
            ));
        }
        let mut start = Instant::now();
        let (config, transformer, tokenizer) = match source {
            ModelSource::Gguf(path) => load_gguf(path, dtype, &dev, on_progress)?,
            ModelSource::Folder(dir) => load_folder(dir, dtype, &dev, on_progress)?,
            ModelSource::Synthetic { shape, seed } => {
                on_progress(LoadProgress::Stage(format!(
                    "building random weights shaped like {shape}"
                )));
                let config = synthetic::shape(shape)?;
                let (transformer, tokenizer) = synthetic::build(&config, *seed, &dev, dtype)?;
                (config, transformer, tokenizer)
            }
            ModelSource::Hub { repo_id, revision } => {
                let dir = hub::fetch_model(repo_id, revision, &mut |p| {
                    on_progress(LoadProgress::Download(p.clone()))
                })?;
                start = Instant::now(); // the download is not load time
                load_folder(&dir, dtype, &dev, on_progress)?
            }
        };
        // Dequantizing and converting left large freed buffers behind; hand them back now (see
        // `crate::init_process`, which otherwise keeps freed memory for the sweeps to reuse).
        crate::release_free_memory();
        Ok(Self {
            source: source.clone(),
            config,
            transformer,
            tokenizer,
            load_seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.transformer.dtype()
    }

    /// The kind of device the model runs on.
    pub fn device_kind(&self) -> DeviceKind {
        DeviceKind::of(self.transformer.device())
    }
}

type Loaded = (ArchConfig, Transformer, TextTokenizer);

fn load_gguf(path: &Path, dtype: DType, dev: &Device, on_progress: &mut dyn FnMut(LoadProgress)) -> Result<Loaded> {
    on_progress(LoadProgress::Stage("reading GGUF".into()));
    let mut file = gguf::GgufFile::open(path)?;
    let config = ArchConfig::from_gguf(&file.content, file.has_output_weight()).map_err(|e| in_file(e, path))?;
    weights::check_checkpoint(&config, &file.tensors(config.family)).map_err(|e| in_file(e, path))?;
    let tokenizer = TextTokenizer::from_gguf(&file.content)?;
    on_progress(LoadProgress::Stage("dequantizing weights".into()));
    let vb = file.var_builder(&config, dtype, dev)?;
    let transformer = Transformer::new(&config, vb).map_err(|e| in_file(e, path))?;
    Ok((config, transformer, tokenizer))
}

fn load_folder(dir: &Path, dtype: DType, dev: &Device, on_progress: &mut dyn FnMut(LoadProgress)) -> Result<Loaded> {
    if !dir.is_dir() {
        return Err(Error::model_file("model folder not found", dir));
    }
    let config = ArchConfig::from_hf_config_file(&dir.join("config.json"))?;
    let mut tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
    tokenizer.set_bos_if_unknown(config.bos_token_id);
    on_progress(LoadProgress::Stage("reading weights".into()));
    let files = weights::safetensors_files(dir)?;
    weights::check_checkpoint(&config, &weights::safetensors_tensors(&files)?).map_err(|e| in_file(e, dir))?;
    let vb = weights::safetensors_var_builder(&files, dtype, dev)?;
    let transformer = Transformer::new(&config, vb).map_err(|e| in_file(e, dir))?;
    Ok((config, transformer, tokenizer))
}

/// Attaches the file's path to errors that come from its contents (missing tensors, bad metadata).
fn in_file(err: Error, path: &Path) -> Error {
    match err {
        Error::ModelConfig(msg) => Error::model_file(msg, path),
        Error::Candle(e) => Error::model_file(
            format!("weights do not match the architecture ({})", candle_text(&e)),
            path,
        ),
        other => other,
    }
}
