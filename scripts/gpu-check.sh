#!/usr/bin/env bash
# The GPU check (issue 4) as one prepared run, for a session that is lent a GPU machine. That
# machine has no Rust toolchain and nothing can be fetched there, so everything is built here first.
#
#   scripts/gpu-check.sh prepare    # here: the CUDA binary and the tiny reference models, in .gpu/
#   # then one call of the device tool:
#   #   run(command="scripts/gpu-check.sh run", carry=[".gpu"], timeout_s=480)
#   scripts/gpu-check.sh run cpu    # here, to try the script itself on the CPU build (f32 only)
#
# `run` writes to $OUT (or .gpu/out): log (everything), check.txt (the comparison), bench-*.txt,
# sweeps.tgz (every sweep's JSON and output); it exits non-zero if any check or bench failed.
# 1. Correctness: the tiny random-weight Qwen3, Qwen2, Llama and Llama 3 models of
#    tests/fixtures/tiny_reference.json, every component, swept on the device in f32 with the fast
#    schedule (and naive for Qwen3), each cell compared with HF transformers' numbers (≤ 2e-4 in raw
#    logit difference, as tests/tiny_models.rs asks on the CPU); bf16 runs reported beside them.
# 2. Speed: `patchbay bench --synthetic qwen3-0.6b` (28 layers, hidden 1024, random weights), naive
#    and fast alternated: bf16 three rounds, f32 one; GPU memory sampled with nvidia-smi meanwhile.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode="${1:-}"

if [ "$mode" = prepare ]; then
  set -e
  scripts/build-cuda.sh "${CUDA_COMPUTE_CAP:-90}" >/dev/null
  rm -rf .gpu/models
  mkdir -p .gpu
  cp target/cuda/patchbay.gz .gpu/patchbay.gz
  cargo run --locked --quiet --example write_tiny_models -- "$PWD/.gpu/models" >&2
  du -sh .gpu/patchbay.gz .gpu/models
  echo "ready: run(command=\"scripts/gpu-check.sh run\", carry=[\".gpu\"], timeout_s=480)"
  exit 0
fi
if [ "$mode" != run ]; then
  echo "usage: scripts/gpu-check.sh prepare | run [cuda|cpu]" >&2
  exit 2
fi

device="${2:-cuda}"
out="${OUT:-.gpu/out}"
work="$(mktemp -d)"
mkdir -p "$out" "$work/sweeps" "$work/logs"
exec > >(tee "$out/log") 2>&1
tee_pid=$!
status=0
finish() {
  tar -czf "$out/sweeps.tgz" -C "$work" sweeps logs 2>/dev/null
  rm -rf "$work"
  echo "== gpu-check exit status: $status"
  exec >&- 2>&-
  wait "$tee_pid"
  exit "$status"
}
if [ ! -d .gpu/models ]; then
  echo "no .gpu/models: run 'scripts/gpu-check.sh prepare' first (and carry .gpu)"
  exit 2
fi

if [ "$device" = cpu ]; then
  bin=target/release/patchbay
  dtypes=(f32)
else
  bin="$work/patchbay"
  gunzip -c .gpu/patchbay.gz > "$bin" && chmod +x "$bin"
  # The CUDA 13 user-space libraries (cuBLAS, cuRAND, NVRTC) of PyTorch's wheels; the driver's
  # libcuda.so.1 is already on the loader's path.
  site="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || echo /opt/torch/.venv/lib/python3.12/site-packages/nvidia)"
  LD_LIBRARY_PATH="$(find "$site" -maxdepth 3 -type d -name lib | grep -v /stubs | tr '\n' ':')${LD_LIBRARY_PATH:-}"
  # Where driver libraries live on NVIDIA's images, after PyTorch's, in case the loader's cache
  # does not name them.
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64; do
    if [ -d "$d" ]; then LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; fi
  done
  # No empty entries: the loader reads one as the current folder.
  LD_LIBRARY_PATH="$(printf '%s' "$LD_LIBRARY_PATH" | tr -s ':' | sed 's/^://; s/:$//')"
  export LD_LIBRARY_PATH
  dtypes=(f32 bf16)
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  # Fail at once, saying where the libraries are, rather than once per sweep.
  missing="$(ldd "$bin" | grep 'not found' || true)"
  if [ -n "$missing" ]; then
    echo "FAIL: the CUDA binary cannot find its libraries:"
    echo "$missing"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "candidates on this machine:"
    find /usr /opt /lib /lib64 \( -name 'libcuda.so*' -o -name 'libcublas.so*' -o -name 'libcudart.so*' -o -name 'libcurand.so*' \) \
      2>/dev/null | head -20
    status=1
    finish
  fi
fi
echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $device"
"$bin" --version

echo "== correctness against HF transformers (tests/fixtures/tiny_reference.json)"
prompts=(--clean "After John and Mary went to the store, Mary gave a bottle of milk to"
  --corrupted "After John and Mary went to the store, John gave a bottle of milk to"
  --correct " John" --incorrect " Mary")
"$bin" info --model .gpu/models/tiny-qwen3 --device "$device" --dtype f32 || { echo "FAIL: the tiny model does not load on $device"; status=1; }
expected=()
for dir in .gpu/models/*/; do
  model="$(basename "$dir")"
  for component in resid_pre resid_post attn_out mlp_out; do
    schedules=(fast)
    if [ "$model" = tiny-qwen3 ]; then schedules=(fast naive); fi
    for schedule in "${schedules[@]}"; do
      for dtype in "${dtypes[@]}"; do
        if [ "$dtype" != f32 ] && [ "$model" != tiny-qwen3 ]; then continue; fi
        name="$model-$component-$schedule-$dtype"
        expected+=("$work/sweeps/$name.json")
        "$bin" sweep --model "$dir" --device "$device" --dtype "$dtype" --component "$component" \
          --schedule "$schedule" "${prompts[@]}" --quiet --out "$work/sweeps/$name.json" > "$work/logs/$name.txt" 2>&1 \
          || { echo "FAIL: $name"; tail -5 "$work/logs/$name.txt"; }
      done
    done
  done
done
python3 scripts/compare-sweeps.py tests/fixtures/tiny_reference.json 2e-4 "$device" "${expected[@]}" | tee "$out/check.txt"
check="${PIPESTATUS[0]}"
echo "correctness check exit status: $check"
[ "$check" = 0 ] || status=1

# Peak GPU memory while `bench` runs, above what was in use before it.
sample() {
  if [ "$device" = cpu ]; then "$@"; return; fi
  local before
  before="$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)"
  # nvidia-smi's own -f writes each sample as it comes (a redirect may be block-buffered and
  # lose the last samples, the largest blocks', to the kill).
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 -f "$work/mem.csv" &
  local smi=$!
  "$@"
  local rc=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  local peak
  peak="$(sort -n "$work/mem.csv" 2>/dev/null | tail -1)"
  echo "gpu memory: peak ${peak:-n/a} MiB in use (nvidia-smi, every 20 ms), $before MiB before the run"
  return "$rc"
}
for dtype in "${dtypes[@]}"; do
  rounds=1
  if [ "$device" != cpu ] && [ "$dtype" = bf16 ]; then rounds=3; fi
  echo "== bench: synthetic qwen3-0.6b, $dtype, $rounds round(s)"
  sample "$bin" bench --synthetic qwen3-0.6b --device "$device" --dtype "$dtype" --rounds "$rounds" \
    | tee "$out/bench-$dtype.txt" || { echo "FAIL: bench $dtype"; status=1; }
done
finish
