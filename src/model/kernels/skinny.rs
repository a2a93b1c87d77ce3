//! `x · Wᵀ` for a few rows of `x` on the CPU, in f32.
//!
//! A baseline forward multiplies a few dozen rows by every weight matrix (the prompts' shared
//! prefix once, then each prompt's own tokens), and so do the first, small blocks of a fast sweep.
//! For so few rows the time goes into streaming the weights from memory, and candle's gemm first
//! copies each weight matrix into its packed layout, which costs as much again. This kernel reads
//! every weight row once, straight from the checkpoint's `[out, in]` layout, against all rows of
//! `x` (which stay in cache), with AVX2/FMA on x86-64 CPUs that have them (checked at run time),
//! and asks for the next weight rows while it works on the current ones (without that, much of a
//! 32-row product is spent waiting on memory).
//! Elsewhere, and for many rows, [`linear`] uses candle's matmul.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Shape, Tensor};
use candle_nn::Linear;

use crate::error::Result;

/// Up to this many rows go through the kernel; more take candle's gemm, which overtakes it a little
/// above this (docs/BENCHMARKS.md, "Measurements behind the code"). A baseline forward is 2 × seq
/// rows, so prompts of up to 16 tokens take the kernel.
pub const MAX_ROWS: usize = 32;

/// When [`linear`] may take the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelUse {
    /// Release builds take it, debug builds (the test suite by default) do not: unoptimized, the
    /// kernel is far slower than candle's gemm, which is compiled optimized even there.
    Default,
    /// Wherever it applies, in any build: what the tests of the release path ask for.
    Always,
    /// Never: candle's matmul only.
    Never,
}

static KERNEL_USE: AtomicU8 = AtomicU8::new(0);
static KERNEL_CALLS: AtomicUsize = AtomicUsize::new(0);

/// Sets when [`linear`] takes the kernel, for the whole process.
pub fn set_kernel_use(policy: KernelUse) {
    let code = match policy {
        KernelUse::Default => 0,
        KernelUse::Always => 1,
        KernelUse::Never => 2,
    };
    KERNEL_USE.store(code, Ordering::Relaxed);
}

/// How many products the kernel has computed in this process (tests check the path they mean to
/// exercise was taken).
pub fn kernel_calls() -> usize {
    KERNEL_CALLS.load(Ordering::Relaxed)
}

/// A linear layer applied to `x` (`[.., in]`): the skinny kernel when it applies (and
/// [`KernelUse`] allows it), else candle's. The kernel's own tests below check it against candle's
/// matmul; tests/release_kernels.rs runs whole sweeps through it against HF transformers' numbers.
pub fn linear(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let allow = match KERNEL_USE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => cfg!(not(debug_assertions)),
    };
    linear_with(layer, x, allow)
}

/// [`linear`], with the kernel allowed or not.
fn linear_with(layer: &Linear, x: &Tensor, allow_kernel: bool) -> Result<Tensor> {
    let w = layer.weight();
    let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
    let usable = allow_kernel
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && rows <= MAX_ROWS
        && x.is_contiguous()
        && w.is_contiguous()
        && available();
    if !usable {
        return Ok(layer.forward(x)?);
    }
    let (n, k) = w.dims2()?;
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    let x2 = x.reshape((rows, k))?;
    KERNEL_CALLS.fetch_add(1, Ordering::Relaxed);
    let y = x2.apply_op2_no_bwd(w, &SkinnyMatmul)?;
    let y = match layer.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    Ok(y.reshape(out_dims)?)
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `[m, k] · [n, k]ᵀ → [m, n]`, both operands contiguous f32.
struct SkinnyMatmul;

impl CustomOp2 for SkinnyMatmul {
    fn name(&self) -> &'static str {
        "skinny-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (x, w) else {
            candle_core::bail!("skinny-matmul: f32 only");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (x_layout.contiguous_offsets(), w_layout.contiguous_offsets()) else {
            candle_core::bail!("skinny-matmul: contiguous operands only");
        };
        let (m, k) = x_layout.shape().dims2()?;
        let (n, wk) = w_layout.shape().dims2()?;
        if wk != k {
            candle_core::bail!("skinny-matmul: [{m}, {k}] times [{n}, {wk}]ᵀ");
        }
        let out = multiply(&x[x0..x1], m, &w[w0..w1], n, k);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// Weight rows per parallel task.
const TASK_ROWS: usize = 32;

/// `x` `[m, k]` times `w` `[n, k]` transposed, as `[m, n]`.
fn multiply(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    use rayon::prelude::*;
    // Each task computes whole rows of the transposed product, `[n, m]`, then one pass transposes.
    let mut yt = vec![0f32; n * m];
    if m == 0 || n == 0 || k == 0 {
        return yt;
    }
    yt.par_chunks_mut(TASK_ROWS * m)
        .zip(w.par_chunks(TASK_ROWS * k))
        .for_each(|(yt, w)| block(x, m, w, yt.len() / m, k, yt));
    let mut y = vec![0f32; m * n];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            y[i * n + j] = v;
        }
    }
    y
}

/// `yt[r, i] = w[r] · x[i]` for `rows` weight rows.
fn block(x: &[f32], m: usize, w: &[f32], rows: usize, k: usize, yt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { avx2::block(x, m, w, rows, k, yt) };
            return;
        }
    }
    for r in 0..rows {
        for i in 0..m {
            yt[r * m + i] = dot(&w[r * k..(r + 1) * k], &x[i * k..(i + 1) * k]);
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 8 floats from `s` at `at` (`at + 8 <= s.len()`).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn load(s: &[f32], at: usize) -> __m256 {
        debug_assert!(at + 8 <= s.len());
        // SAFETY: in bounds (callers step `at` by 8 up to `k8 <= len`).
        unsafe { _mm256_loadu_ps(s.as_ptr().add(at)) }
    }

    /// [`super::block`]: tiles of 4 weight rows × 3 input rows (12 accumulators, which keep both
    /// FMA pipes busy through their latency and, with the 3 inputs and a weight vector, fit the 16
    /// vector registers; 3 × 4 spilled one to the stack), then narrower tiles for what is left over.
    /// (Splitting the inner dimension so that `x`'s slice stays in L1 was slower: the weights are
    /// then read in short strided pieces.)
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block(x: &[f32], m: usize, w: &[f32], rows: usize, k: usize, yt: &mut [f32]) {
        let mut r = 0;
        while r + 4 <= rows {
            row_tiles::<4>(x, m, w, r, k, yt);
            r += 4;
        }
        while r < rows {
            row_tiles::<1>(x, m, w, r, k, yt);
            r += 1;
        }
    }

    /// Weight rows `r..r + R` against every input row.
    #[target_feature(enable = "avx2,fma")]
    fn row_tiles<const R: usize>(x: &[f32], m: usize, w: &[f32], r: usize, k: usize, yt: &mut [f32]) {
        // The next weight rows, fetched from memory a slice per tile while these rows compute.
        let next = &w[((r + R) * k).min(w.len())..((r + 2 * R) * k).min(w.len())];
        let lines = next.len().div_ceil(16);
        let per_tile = lines.div_ceil(m.div_ceil(3).max(1));
        let mut fetched = 0;
        let mut i = 0;
        while i + 3 <= m {
            prefetch(next, &mut fetched, per_tile, lines);
            tile::<R, 3>(x, m, w, r, i, k, yt);
            i += 3;
        }
        prefetch(next, &mut fetched, lines, lines);
        match m - i {
            2 => tile::<R, 2>(x, m, w, r, i, k, yt),
            1 => tile::<R, 1>(x, m, w, r, i, k, yt),
            _ => {}
        }
    }

    /// Asks for the next `count` 64-byte lines of `s` (of `lines`) to be brought into cache.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn prefetch(s: &[f32], fetched: &mut usize, count: usize, lines: usize) {
        let end = (*fetched + count).min(lines);
        for line in *fetched..end {
            // SAFETY: `line * 16 < s.len()` (lines = ceil(len / 16)); prefetching never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().add(line * 16).cast::<i8>()) };
        }
        *fetched = end;
    }

    /// `yt[r + q, i + j] = w[r + q] · x[i + j]` for `q < R`, `j < C`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn tile<const R: usize, const C: usize>(
        x: &[f32],
        m: usize,
        w: &[f32],
        r: usize,
        i: usize,
        k: usize,
        yt: &mut [f32],
    ) {
        let k8 = k - k % 8;
        // Plain loops over the const-sized arrays (not `array::from_fn`, whose closures were not
        // always inlined into this AVX2 function); the compiler unrolls them.
        let mut ws: [&[f32]; R] = [&[]; R];
        for (q, row) in ws.iter_mut().enumerate() {
            *row = &w[(r + q) * k..(r + q + 1) * k];
        }
        let mut xs: [&[f32]; C] = [&[]; C];
        for (j, row) in xs.iter_mut().enumerate() {
            *row = &x[(i + j) * k..(i + j + 1) * k];
        }
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut c = 0;
        while c < k8 {
            let mut xv = [_mm256_setzero_ps(); C];
            for j in 0..C {
                xv[j] = load(xs[j], c);
            }
            for q in 0..R {
                let wv = load(ws[q], c);
                for j in 0..C {
                    acc[q][j] = _mm256_fmadd_ps(wv, xv[j], acc[q][j]);
                }
            }
            c += 8;
        }
        for q in 0..R {
            for j in 0..C {
                let tail: f32 = ws[q][k8..].iter().zip(&xs[j][k8..]).map(|(a, b)| a * b).sum();
                yt[(r + q) * m + i + j] = hsum(acc[q][j]) + tail;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn matches_candles_matmul_for_every_shape_edge() {
        let dev = Device::Cpu;
        // Rows, outputs and inputs off the kernel's 3 / 4 / 8 steps, and a task-sized output count.
        for &(m, n, k) in &[
            (1, 1, 1),
            (2, 4, 8),
            (3, 7, 13),
            (4, 9, 24),
            (5, 33, 576),
            (32, 70, 72),
            (16, 64, 40),
            (48, 70, 129),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let layer = Linear::new(w.clone(), Some(b.clone()));
            let reference = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
            let got = linear_with(&layer, &x, true).unwrap();
            assert_eq!(got.dims(), &[m, n]);
            let gap = max_abs_diff(&got, &reference);
            assert!(gap < 1e-4 * (k as f32).sqrt(), "m={m} n={n} k={k}: {gap}");
        }
    }

    #[test]
    fn keeps_leading_dimensions_and_views_of_weights() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 16), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (12, 16), &dev).unwrap();
        // Rows 4.. of a weight, as the stacked q/k/v views are.
        let layer = Linear::new(w.narrow(0, 4, 8).unwrap(), None);
        let got = linear_with(&layer, &x, true).unwrap();
        let reference = layer.forward(&x).unwrap();
        assert_eq!(got.dims(), &[2, 3, 8]);
        assert!(max_abs_diff(&got, &reference) < 1e-5);
    }
}
