//! The patching metric: normalized logit difference.

/// Below this |LD_clean − LD_corrupted| the normalized metric is undefined (a division by ~0).
pub const MIN_LOGIT_DIFF_GAP: f64 = 1e-6;

/// The logit difference `logit[correct] − logit[incorrect]` of one row of last-position logits.
pub fn logit_diff(logits: &[f32], correct: u32, incorrect: u32) -> f64 {
    f64::from(logits[correct as usize]) - f64::from(logits[incorrect as usize])
}

/// `(LD_patched − LD_corrupted) / (LD_clean − LD_corrupted)`: 0 = still corrupted, 1 = clean behaviour
/// fully restored. `None` when the clean and corrupted runs do not differ.
pub fn normalized(patched: f64, clean: f64, corrupted: f64) -> Option<f64> {
    let gap = clean - corrupted;
    (gap.abs() >= MIN_LOGIT_DIFF_GAP).then(|| (patched - corrupted) / gap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalized_maps_corrupted_to_zero_and_clean_to_one() {
        assert_eq!(normalized(-3.0, 5.0, -3.0), Some(0.0));
        assert_eq!(normalized(5.0, 5.0, -3.0), Some(1.0));
        assert_eq!(normalized(1.0, 5.0, -3.0), Some(0.5));
        assert_eq!(normalized(1.0, 2.0, 2.0), None);
    }

    #[test]
    fn logit_diff_is_correct_minus_incorrect() {
        assert_eq!(logit_diff(&[1.0, 4.0, 2.5], 1, 2), 1.5);
    }
}
