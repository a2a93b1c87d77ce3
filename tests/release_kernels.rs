//! The CPU path a release build takes, run in the test suite: the few-row matmul kernel (which
//! debug builds skip, see `kernels::skinny::KernelUse`) forced on for whole sweeps of the tiny
//! reference models, both schedules, every cell checked against HF transformers.

mod common;

use common::reference::{check_model, entry};
use patchbay::model::kernels::skinny::{self, KernelUse};
use patchbay::patching::Schedule;

#[test]
fn sweeps_through_the_release_matmul_kernel_match_transformers() {
    if !skinny::available() {
        eprintln!("this CPU has no AVX2/FMA: the kernel never runs here, candle's matmul is the release path");
        return;
    }
    // Every test in this binary wants the kernel; the setting is process-wide.
    skinny::set_kernel_use(KernelUse::Always);
    let before = skinny::kernel_calls();
    for name in ["tiny-qwen3", "tiny-qwen2", "tiny-llama", "tiny-llama3"] {
        for schedule in Schedule::ALL {
            check_model(&entry(name), "config", schedule);
        }
    }
    assert!(skinny::kernel_calls() > before, "the sweeps never reached the kernel");
}
