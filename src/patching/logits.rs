//! From logits to what a cell shows: softmax probabilities and the top-k next tokens.

use candle_core::{DType, Tensor};

use super::result::TopToken;
use crate::error::Result;
use crate::model::Model;
use crate::model::kernels::fastmath;

/// A logits row's softmax normalizer: its largest logit and Σ exp(l − max). Computed once per
/// row, it serves the top-k probabilities and every metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Softmax {
    pub max: f32,
    pub sum: f64,
}

impl Softmax {
    /// The normalizer of `logits`.
    pub fn of(logits: &[f32]) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        Self {
            max,
            sum: sum_exp(logits, max),
        }
    }

    /// `ln Σ exp(logits)`.
    pub fn log_sum_exp(&self) -> f64 {
        f64::from(self.max) + self.sum.ln()
    }
}

/// The most likely next tokens of one logits row, with softmax probabilities.
pub fn top_tokens(model: &Model, logits: &[f32], k: usize) -> Vec<TopToken> {
    top_tokens_with(model, logits, k, Softmax::of(logits))
}

/// [`top_tokens`] with the row's [`Softmax`] already computed.
pub fn top_tokens_with(model: &Model, logits: &[f32], k: usize, softmax: Softmax) -> Vec<TopToken> {
    let Softmax { max, sum } = softmax;
    top_k(logits, k)
        .into_iter()
        .map(|(id, logit)| TopToken {
            id,
            token: model.tokenizer.token_text(id),
            logit,
            prob: (f64::from(logit - max).exp() / sum) as f32,
        })
        .collect()
}

/// Indices of the `k` largest values of a 1-D f32 slice, largest first (earlier index first on ties).
pub fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    // One pass keeping the best k in order: O(n) with a tiny constant for the small k of an inspector.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (i, &v) in values.iter().enumerate() {
        if best.len() == k && v.total_cmp(&best[k - 1].1) != std::cmp::Ordering::Greater {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b.total_cmp(&v) != std::cmp::Ordering::Less);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    }
    best
}

/// Splits the last-position logits `[batch, vocab]` into per-row vectors.
pub fn logits_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Σ exp(l − max) over `logits` (all ≤ `max`), the softmax denominator of every cell's top-k.
///
/// With the branch-free [`fastmath::exp`], which the compiler vectorizes, rather than libm's
/// `expf` one value at a time: about 5× faster over a 49k vocabulary (docs/BENCHMARKS.md).
pub(crate) fn sum_exp(logits: &[f32], max: f32) -> f64 {
    // The exponentials of a chunk first, a plain map the compiler vectorizes; then eight running
    // sums, so the additions (which it may not reorder) vectorize too. Each lane adds at most 32
    // terms ≤ 1 in f32 before they are folded into the f64 total.
    let mut total = 0f64;
    let mut terms = [0f32; 256];
    for chunk in logits.chunks(terms.len()) {
        let terms = &mut terms[..chunk.len()];
        for (t, &l) in terms.iter_mut().zip(chunk) {
            *t = fastmath::exp(l - max);
        }
        let groups = terms.chunks_exact(8);
        let rest: f64 = groups.remainder().iter().map(|&t| f64::from(t)).sum();
        let mut lanes = [0f32; 8];
        for group in groups {
            for (lane, &t) in lanes.iter_mut().zip(group) {
                *lane += t;
            }
        }
        total += lanes.iter().map(|&s| f64::from(s)).sum::<f64>() + rest;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_returns_the_largest_values_largest_first() {
        let values = [0.5, 3.0, -1.0, 3.0, 7.5, 2.0, f32::NEG_INFINITY];
        assert_eq!(top_k(&values, 3), vec![(4, 7.5), (1, 3.0), (3, 3.0)]);
        assert_eq!(top_k(&values, 0), vec![]);
        assert_eq!(top_k(&values, 10).len(), values.len());
        assert_eq!(top_k(&[], 2), vec![]);
    }

    #[test]
    fn the_fast_softmax_denominator_matches_f64_exp() {
        // Logits spread like a real vocabulary's, plus the edges: 0, the underflow clamp, −∞.
        let mut logits: Vec<f32> = (0..50_000u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) % 10_000) as f32 / 10_000.0 - 0.8) * 30.0)
            .collect();
        logits.extend([0.0, -86.9, -87.5, -200.0, f32::NEG_INFINITY]);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exact: f64 = logits.iter().map(|&l| (f64::from(l) - f64::from(max)).exp()).sum();
        let fast = sum_exp(&logits, max);
        assert!((fast - exact).abs() / exact < 1e-6, "{fast} vs {exact}");
    }
}
