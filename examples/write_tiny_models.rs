//! Writes the tiny random-weight reference models of tests/fixtures/tiny_reference.json as model
//! folders (`<out>/<name>/` with config.json, model.safetensors and tokenizer.json), the same
//! weights the tests build and HF transformers ran on. `scripts/gpu-check.sh prepare` calls it, for
//! a GPU machine that has no Rust toolchain:
//!
//!     cargo run --example write_tiny_models -- <out>

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: cargo run --example write_tiny_models -- <output folder>");
        return ExitCode::FAILURE;
    };
    for (name, config) in common::tiny_configs() {
        let dir = out.join(&name);
        common::write_tiny_model(&dir, &config);
        println!("{}", dir.display());
    }
    ExitCode::SUCCESS
}
