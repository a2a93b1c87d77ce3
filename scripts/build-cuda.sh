#!/usr/bin/env bash
# Builds a CUDA release binary on a machine without a CUDA toolkit or GPU, from NVIDIA's PyPI wheels.
#   scripts/build-cuda.sh [COMPUTE_CAP]        # default 90 (H100/H200); prints the binary's path
# The binary (copied to target/cuda/patchbay, and stripped and gzipped to target/cuda/patchbay.gz;
# the next plain `cargo build --release` rebuilds target/release/patchbay without CUDA) runs where an NVIDIA driver for CUDA >= 13.0 is installed and
# the CUDA 13 cuBLAS, cuRAND and NVRTC libraries are on LD_LIBRARY_PATH (PyTorch's cu13 wheels carry
# them). With a real toolkit installed, `cargo build --release --features cuda` is all it takes.
#
# What it sets up under $PATCHBAY_CACHE/cuda-13.0 (default .cache/cuda-13.0):
# - nvcc, nvvm, the runtime, CCCL headers, cuBLAS, cuRAND and NVRTC from PyPI (~700 MB);
# - unversioned .so links, which the linker looks for;
# - a stub libcuda.so (soname libcuda.so.1) to link against: the driver library only exists where a
#   driver is installed, and at run time the real one is loaded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cap="${1:-90}"
cache="${PATCHBAY_CACHE:-.cache}"
root="$(mkdir -p "$cache" && cd "$cache" && pwd)/cuda-13.0"
cuda="$root/nvidia/cu13"

if [ ! -x "$cuda/bin/nvcc" ] || [ ! -d "$cuda/include/nv" ] || [ ! -e "$cuda/lib/libcublas.so" ]; then
  wheels="$root/wheels"
  mkdir -p "$wheels"
  python3 -m pip download --quiet --no-deps -d "$wheels" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand==10.*" >&2
  for w in "$wheels"/*.whl; do unzip -q -o "$w" -d "$root"; done
  chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/*
  (
    cd "$cuda/lib"
    for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done
    ln -sf libcurand.so.10 libcurand.so
  )
fi

if [ ! -e "$cuda/lib/libcuda.so" ]; then
  # Every driver entry point cudarc declares, as a do-nothing function: enough to link.
  cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1)"
  if [ -z "$cudarc" ]; then
    cargo fetch --locked >&2
    cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)"
  fi
  grep -ohE '^\s+fn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" \
    | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/int \1(void) { return 0; }/' | sort -u > "$root/cuda_stub.c"
  cc -shared -fPIC -o "$cuda/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$root/cuda_stub.c"
fi

export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_HOME="$cuda" CUDA_PATH="$cuda" CUDA_COMPUTE_CAP="$cap"
cargo build --release --locked --features cuda --bin patchbay >&2
mkdir -p target/cuda
cp target/release/patchbay target/cuda/patchbay
# Stripped and compressed (~22 MB): small enough to carry to a machine that cannot build it.
strip -o target/cuda/patchbay.stripped target/cuda/patchbay
gzip -6 -c target/cuda/patchbay.stripped > target/cuda/patchbay.gz
rm target/cuda/patchbay.stripped
echo "target/cuda/patchbay"
