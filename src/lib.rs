//! Patchbay: activation patching on language models.
//!
//! The engine is a library: the desktop app, the `patchbay` CLI, tests and benchmarks all drive it.
//! - [`model`]: load Qwen3 / Qwen2 / Llama-family checkpoints (Hub, folder, GGUF) into one hookable decoder;
//! - [`patching`]: sweeps over layers × positions with the normalized logit-difference metric;
//! - [`export`]: results as JSON, CSV and NPY, figures as PNG and SVG;
//! - [`worker`]: the thread that owns the model and runs loads and sweeps for the app;
//! - `app` (feature `gui`, on by default): the egui desktop app.
//!
//! `cargo build --no-default-features` builds the engine and the CLI without any GUI crate.

#[cfg(feature = "gui")]
pub mod app;
pub mod dataset;
pub mod error;
pub mod export;
pub mod model;
pub mod patching;
pub mod worker;

pub use error::{Error, Result};

/// Returns the allocator's free memory to the operating system (after a model load, whose
/// temporary buffers the binary's allocator tuning would otherwise keep).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
