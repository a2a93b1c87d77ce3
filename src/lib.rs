//! Patchbay: activation patching on language models.
//!
//! The engine is a library: the desktop app, the `patchbay` CLI, tests and benchmarks all drive it.
//! - [`model`]: load Qwen3 / Qwen2 / Llama-family checkpoints (Hub, folder, GGUF) into one hookable decoder;
//! - [`patching`]: sweeps over layers × positions with the normalized logit-difference metric;
//! - [`export`]: results as JSON, CSV and NPY.

pub mod app;
pub mod cli;
pub mod error;
pub mod export;
pub mod model;
pub mod patching;
pub mod worker;

pub use error::{Error, Result};
