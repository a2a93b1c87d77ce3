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

/// Process-wide settings that make CPU sweeps faster. Call once, first thing in `main`, before any
/// other thread exists.
///
/// - The thread count: candle looks it up on every matmul and, unless `RAYON_NUM_THREADS` is set,
///   re-reads /proc/cpuinfo each time (~5% of a CPU sweep). We look it up once and set the variable.
///   rayon's global pool (our CPU kernels) then also gets candle's count, one thread per physical
///   core, which suits these FMA-bound loops (SMT siblings share the FMA units).
/// - The allocator keeps large freed buffers for reuse. A sweep frees and reallocates activation
///   buffers of a few MiB in every layer; glibc's malloc serves those with fresh mmaps and returns
///   them on free, so each one costs page faults and zeroing (~15% of a CPU sweep on 2 cores). The
///   price is that memory freed after a sweep stays with the process, up to the sweep's peak;
///   [`release_free_memory`] hands it back (model loading calls it).
pub fn init_process() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: called at the start of `main`, while no other thread reads the environment.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts malloc's tuning parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Returns the allocator's free memory to the operating system (after a model load, whose
/// temporary buffers [`init_process`]'s settings would otherwise keep).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
