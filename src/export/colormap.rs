//! The diverging colour map researchers know from plotly's `RdBu`: red below 0, white at 0, blue
//! above (blue = clean behaviour recovered). Shared by the live heatmap and saved figures.

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
}
