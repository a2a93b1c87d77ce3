//! Colour scales, shared by the live heatmap and saved figures: the diverging map researchers know
//! from plotly's `RdBu` (red below 0, white at 0, blue above: blue = clean behaviour recovered) for
//! differences, and viridis for the metrics that run one way from a floor (prob, KL, rank).

use crate::patching::{Metric, SweepResult};

/// plotly.colors.diverging.RdBu (ColorBrewer), from the low end to the high end, joined by straight
/// lines as plotly and matplotlib join them. Kept by hand: the colour crates' RdBu (colorous,
/// colorgrad) are d3's B-spline through these colours, up to 10/255 off matplotlib's and grey at 0.
const RDBU: [[u8; 3]; 11] = [
    [103, 0, 31],
    [178, 24, 43],
    [214, 96, 77],
    [244, 165, 130],
    [253, 219, 199],
    [247, 247, 247],
    [209, 229, 240],
    [146, 197, 222],
    [67, 147, 195],
    [33, 102, 172],
    [5, 48, 97],
];

/// The default colour range: the normalized metric's natural scale, fixed and symmetric.
pub const DEFAULT_RANGE: f64 = 1.0;

/// Colour of `value` on a symmetric scale `[-range, range]` centred at 0; values outside clamp.
pub fn rdbu(value: f64, range: f64) -> [u8; 3] {
    let range = if range > 0.0 && range.is_finite() {
        range
    } else {
        DEFAULT_RANGE
    };
    let t = ((value / range + 1.0) / 2.0).clamp(0.0, 1.0);
    if !t.is_finite() {
        return RDBU[5];
    }
    let x = t * (RDBU.len() - 1) as f64;
    let i = (x.floor() as usize).min(RDBU.len() - 2);
    let f = x - i as f64;
    let (a, b) = (RDBU[i], RDBU[i + 1]);
    let mix = |k: usize| (f64::from(a[k]) + (f64::from(b[k]) - f64::from(a[k])) * f).round() as u8;
    [mix(0), mix(1), mix(2)]
}

/// A symmetric range covering every finite value (at least `DEFAULT_RANGE`'s scale when all are tiny).
pub fn auto_range<'a>(values: impl IntoIterator<Item = &'a Option<f64>>) -> f64 {
    let max = values
        .into_iter()
        .flatten()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    if max > 1e-9 { max } else { DEFAULT_RANGE }
}

/// How a metric's values map to colours.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    /// The value at the low end and at the high end.
    pub lo: f64,
    pub hi: f64,
    /// RdBu centred at 0 (then `lo == -hi`), else viridis from `lo` to `hi`.
    pub diverging: bool,
}

impl Scale {
    /// A symmetric diverging scale `[-range, range]`.
    pub fn diverging(range: f64) -> Self {
        Self {
            lo: -range,
            hi: range,
            diverging: true,
        }
    }

    /// The colour of `value`; values outside the scale clamp.
    pub fn color(&self, value: f64) -> [u8; 3] {
        if self.diverging {
            return rdbu(value, self.hi);
        }
        let span = self.hi - self.lo;
        let t = if span > 0.0 { (value - self.lo) / span } else { 0.5 };
        let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
        let c = colorous::VIRIDIS.eval_continuous(t);
        [c.r, c.g, c.b]
    }

    /// The scale for `metric` in `result`. Fixed by default, so sweeps compare at a glance:
    /// normalized ±1; logit_diff ± the larger baseline |LD|; prob 0 to 1; logprob, KL and rank
    /// from their floor to the largest value seen. `auto` fits the diverging ones to the data too.
    pub fn for_metric(result: &SweepResult, metric: Metric, auto: bool) -> Self {
        let values = result.metric_grid(metric).map_or(&[][..], |g| g.flat());
        let finite: Vec<f64> = values.iter().flatten().copied().filter(|v| v.is_finite()).collect();
        let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let sequential = |lo: f64, hi: f64| Self {
            lo,
            hi: if hi > lo { hi } else { lo + 1.0 },
            diverging: false,
        };
        match metric {
            Metric::Normalized if auto => {
                let data = max.abs().max(min.abs());
                Self::diverging(if data.is_finite() && data > 1e-9 {
                    data
                } else {
                    DEFAULT_RANGE
                })
            }
            Metric::Normalized => Self::diverging(DEFAULT_RANGE),
            Metric::LogitDiff => {
                let baselines = result.clean_logit_diff.abs().max(result.corrupted_logit_diff.abs());
                let data = if auto && max.is_finite() {
                    max.abs().max(min.abs())
                } else {
                    baselines
                };
                Self::diverging(if data > 1e-9 { data } else { DEFAULT_RANGE })
            }
            Metric::Prob if !auto => sequential(0.0, 1.0),
            Metric::Prob => sequential(min.max(0.0), max.min(1.0)),
            Metric::Logprob => sequential(if min.is_finite() { min } else { -1.0 }, 0.0),
            Metric::Kl | Metric::Rank => sequential(0.0, if max.is_finite() { max } else { 1.0 }),
        }
    }

    /// Five evenly spaced tick values, from the high end down.
    pub fn ticks(&self) -> [f64; 5] {
        std::array::from_fn(|k| self.hi - (self.hi - self.lo) * k as f64 / 4.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_white_and_ends_are_red_and_blue() {
        assert_eq!(rdbu(0.0, 1.0), [247, 247, 247]);
        assert_eq!(rdbu(1.0, 1.0), [5, 48, 97]);
        assert_eq!(rdbu(-1.0, 1.0), [103, 0, 31]);
        assert_eq!(rdbu(5.0, 1.0), [5, 48, 97], "clamped");
        assert_eq!(rdbu(f64::NAN, 1.0), [247, 247, 247]);
    }

    #[test]
    fn matches_matplotlib_rdbu() {
        // matplotlib 3.11's `colormaps["RdBu"](t)` × 255 (a 256-entry table of the same lines, so
        // within 3/255 of the exact interpolation).
        let reference = [
            (0.1, [176.5, 23.5, 42.8]),
            (0.25, [229.3, 131.2, 104.0]),
            (0.4, [253.0, 219.0, 199.0]),
            (0.5, [246.3, 246.7, 246.9]),
            (0.6, [209.0, 229.0, 240.0]),
            (0.75, [104.2, 170.5, 207.7]),
            (0.9, [32.5, 100.9, 170.5]),
        ];
        for (t, expected) in reference {
            let ours = rdbu(2.0 * t - 1.0, 1.0);
            for (channel, (&got, want)) in ours.iter().zip(expected).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() <= 3.0,
                    "t = {t}, channel {channel}: {got} vs matplotlib's {want}"
                );
            }
        }
    }

    #[test]
    fn sequential_scales_run_from_floor_to_top_and_clamp() {
        let s = Scale {
            lo: 0.0,
            hi: 2.0,
            diverging: false,
        };
        let dark = s.color(0.0);
        let bright = s.color(2.0);
        // viridis: dark purple at the floor, yellow at the top.
        assert!(dark[0] < 90 && dark[1] < 20 && dark[2] > 60, "{dark:?}");
        assert!(bright[0] > 240 && bright[1] > 220 && bright[2] < 60, "{bright:?}");
        assert_eq!(s.color(-5.0), dark);
        assert_eq!(s.color(9.0), bright);
        assert_eq!(s.ticks(), [2.0, 1.5, 1.0, 0.5, 0.0]);
    }
}
