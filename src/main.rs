//! `patchbay`: the desktop app, or a headless command. Process-wide set-up lives here, not in the
//! library: the thread count and the allocator's tuning suit a sweep, not every program that links
//! the engine.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    init_process();
    let cli = cli::Cli::parse();
    match cli::run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err @ patchbay::Error::Cancelled(_)) => {
            eprintln!("{err}");
            // As a shell reports a program stopped by Ctrl-C (128 + SIGINT).
            std::process::ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Process-wide settings that make CPU sweeps faster. Called first thing in `main`, before any
/// other thread exists.
///
/// - The thread count: candle looks it up on every matmul and, unless `RAYON_NUM_THREADS` is set,
///   re-reads /proc/cpuinfo each time (a few percent of a CPU sweep). We look it up once and set
///   the variable.
///   rayon's global pool (our CPU kernels) then also gets candle's count, one thread per physical
///   core, which suits these FMA-bound loops (SMT siblings share the FMA units).
/// - The allocator keeps large freed buffers for reuse. A sweep frees and reallocates activation
///   buffers of a few MiB in every layer; glibc's malloc serves those with fresh mmaps and returns
///   them on free, so each one costs page faults and zeroing (docs/BENCHMARKS.md has the share). The
///   price is that memory freed after a sweep stays with the process, up to the sweep's peak;
///   [`patchbay::release_free_memory`] hands it back (model loading calls it).
fn init_process() {
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
