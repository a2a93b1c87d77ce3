//! One switch for the test suite: `PATCHBAY_SKIP_MODEL_TESTS=1` marks the tests that need the
//! SmolLM2 test model as ignored (they show so in `cargo test`'s summary) instead of failing with
//! the command that fetches it. Nothing in the library or the binary depends on it.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=PATCHBAY_SKIP_MODEL_TESTS");
    println!("cargo::rustc-check-cfg=cfg(skip_model_tests)");
    if std::env::var_os("PATCHBAY_SKIP_MODEL_TESTS").is_some_and(|v| !v.is_empty() && v != "0") {
        println!("cargo::rustc-cfg=skip_model_tests");
    }
}
