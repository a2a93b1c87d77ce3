//! Branch-free f32 math for the CPU kernels, written so the compiler vectorizes loops over it.

/// exp(x), relative error ~1e-7: Cody–Waite range reduction, Cephes' degree-6 polynomial, 2ⁿ from
/// the exponent bits. x is clamped to [−87, 88], f32's normal range (exp(−87) ≈ 1.6e-38,
/// exp(88) ≈ 1.7e38); NaN gives exp(−87). libm's `expf` is a call per value, which no loop
/// vectorizes.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer in the low bits.
    // max/min rather than clamp, which keeps NaN: NaN becomes −87 here.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // ln 2 in two parts: 0.693_359_4 is 0.693359375 exactly in f32, so n · it is exact.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n is in [−126, 127]: the exponent field n + 127 is a normal float's.
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    e * f32::from_bits(((n_int + 127) << 23) as u32)
}

/// silu(x) = x · sigmoid(x), with [`exp`].
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`):
/// 0.5·x·(1 + tanh(u)) = x − x / (e^{2u} + 1), u = √(2/π)·(x + 0.044715·x³), with [`exp`].
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x);
    x - x / (exp(2.0 * u) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_tanh_matches_the_tanh_formula() {
        for i in -4000..=4000 {
            let x = i as f32 / 200.0;
            let want = 0.5
                * f64::from(x)
                * (1.0 + (0.797_884_560_802_865_4 * (f64::from(x) + 0.044_715 * f64::from(x).powi(3))).tanh());
            let got = f64::from(gelu_tanh(x));
            assert!((got - want).abs() <= 2e-6 * want.abs().max(1.0), "{x}: {got} vs {want}");
        }
    }

    #[test]
    fn exp_matches_f64_over_f32s_range_and_clamps_outside_it() {
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            assert!((got - want).abs() / want < 1e-6, "exp({x}) = {got}, not {want}");
            x += 0.0137;
        }
        assert_eq!(exp(-200.0), exp(-87.0));
        assert_eq!(exp(f32::NEG_INFINITY), exp(-87.0));
        assert_eq!(exp(f32::NAN), exp(-87.0));
        assert_eq!(exp(500.0), exp(88.0));
        assert!(exp(88.0).is_finite());
    }

    #[test]
    fn silu_matches_its_definition() {
        for x in [-100.0f32, -20.0, -3.5, -1.0, -0.1, 0.0, 0.1, 1.0, 3.5, 20.0, 100.0] {
            let want = f64::from(x) / (1.0 + (-f64::from(x)).exp());
            assert!(
                (f64::from(silu(x)) - want).abs() <= 1e-6 * want.abs().max(1e-30),
                "silu({x})"
            );
        }
    }
}
