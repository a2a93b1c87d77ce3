//! Hand-written CPU kernels for f32, each measured against candle's op it stands in for (see
//! docs/BENCHMARKS.md): a few-row matmul, a branch-free exp, fused SwiGLU and RoPE. Every one falls
//! back to candle's ops on other devices and dtypes, so the GPU path is candle's throughout.

pub mod fastmath;
pub mod fused;
pub mod skinny;
