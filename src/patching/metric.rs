//! The metrics every cell is measured by, all computed from the patched run's last-position logits.

use serde::{Deserialize, Serialize};

use super::logits::Softmax;

/// Below this |LD_clean − LD_corrupted| the normalized metric is undefined (a division by ~0).
pub const MIN_LOGIT_DIFF_GAP: f64 = 1e-6;

/// A measure of the patched run at its last position. Every cell stores all of them, so a view can
/// switch between them without recomputing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Metric {
    /// logit(correct) − logit(incorrect).
    LogitDiff,
    /// (LD − LD_corrupted) / (LD_clean − LD_corrupted): 0 = corrupted behaviour, 1 = clean.
    #[default]
    Normalized,
    /// log-softmax of the correct answer.
    Logprob,
    /// Softmax probability of the correct answer.
    Prob,
    /// KL(clean ‖ patched) over the whole vocabulary.
    Kl,
    /// How many tokens have a larger logit than the correct answer (0 = top).
    Rank,
}

/// One value per [`Metric`], in [`Metric::ALL`] order; `None` where undefined (normalized, when
/// the clean and corrupted runs do not differ).
pub type Metrics = [Option<f64>; Metric::COUNT];

impl Metric {
    pub const COUNT: usize = 6;
    /// Every metric, in the order menus, CSV columns and the JSON's `metrics` show them.
    pub const ALL: [Metric; Metric::COUNT] = [
        Metric::LogitDiff,
        Metric::Normalized,
        Metric::Logprob,
        Metric::Prob,
        Metric::Kl,
        Metric::Rank,
    ];

    /// The name on the command line, in CSV headers and in the JSON's `metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::LogitDiff => "logit_diff",
            Metric::Normalized => "normalized",
            Metric::Logprob => "logprob",
            Metric::Prob => "prob",
            Metric::Kl => "kl",
            Metric::Rank => "rank",
        }
    }

    /// Its definition in words.
    pub fn definition(self) -> &'static str {
        match self {
            Metric::LogitDiff => "logit[correct] - logit[incorrect] at the last position",
            Metric::Normalized => {
                "(LD_patched - LD_corrupted) / (LD_clean - LD_corrupted), LD = logit[correct] - \
                 logit[incorrect] at the last position: 0 = corrupted behaviour, 1 = clean"
            }
            Metric::Logprob => "log-softmax of the correct answer at the last position",
            Metric::Prob => "softmax probability of the correct answer at the last position",
            Metric::Kl => "KL(clean || patched) of the next-token distributions, in nats",
            Metric::Rank => "number of tokens with a larger logit than the correct answer (0 = top)",
        }
    }

    /// Where this metric sits in a [`Metrics`] array.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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

/// What every cell's metrics are measured against: the answers, both baselines' logit differences
/// and the clean run's next-token distribution.
#[derive(Debug, Clone)]
pub struct MetricBasis {
    correct: u32,
    incorrect: u32,
    clean_ld: f64,
    corrupted_ld: f64,
    /// The clean run's softmax probabilities over the vocabulary.
    clean_probs: Vec<f32>,
    /// Σ p_clean · log p_clean.
    clean_neg_entropy: f64,
}

impl MetricBasis {
    /// The basis for a sweep whose unpatched clean and corrupted runs gave these logits.
    pub fn new(clean: &[f32], corrupted: &[f32], correct: u32, incorrect: u32) -> Self {
        let lse = Softmax::of(clean).log_sum_exp();
        let mut neg_entropy = 0f64;
        let clean_probs = clean
            .iter()
            .map(|&l| {
                let log_p = f64::from(l) - lse;
                let p = log_p.exp();
                if p > 0.0 {
                    neg_entropy += p * log_p;
                }
                p as f32
            })
            .collect();
        Self {
            correct,
            incorrect,
            clean_ld: logit_diff(clean, correct, incorrect),
            corrupted_ld: logit_diff(corrupted, correct, incorrect),
            clean_probs,
            clean_neg_entropy: neg_entropy,
        }
    }

    /// Every metric of one run's last-position logits.
    pub fn measure(&self, logits: &[f32]) -> Metrics {
        self.measure_with(logits, Softmax::of(logits))
    }

    /// [`MetricBasis::measure`] with the row's [`Softmax`] already computed (the top-k shares it).
    pub fn measure_with(&self, logits: &[f32], softmax: Softmax) -> Metrics {
        let ld = logit_diff(logits, self.correct, self.incorrect);
        let lse = softmax.log_sum_exp();
        let correct = logits[self.correct as usize];
        let logprob = f64::from(correct) - lse;
        // KL = Σ p_c log p_c − Σ p_c (x − lse) = Σ p_c log p_c − Σ p_c x + lse (Σ p_c = 1).
        let expected_logit: f64 = self
            .clean_probs
            .chunks(1024)
            .zip(logits.chunks(1024))
            .map(|(p, x)| p.iter().zip(x).map(|(&p, &x)| p * x).sum::<f32>() as f64)
            .sum();
        let kl = (self.clean_neg_entropy - expected_logit + lse).max(0.0);
        let rank = logits.iter().filter(|&&l| l > correct).count();
        let mut out = [None; Metric::COUNT];
        out[Metric::LogitDiff.index()] = Some(ld);
        out[Metric::Normalized.index()] = normalized(ld, self.clean_ld, self.corrupted_ld);
        out[Metric::Logprob.index()] = Some(logprob);
        out[Metric::Prob.index()] = Some(logprob.exp());
        out[Metric::Kl.index()] = Some(kl);
        out[Metric::Rank.index()] = Some(rank as f64);
        out
    }
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

    #[test]
    fn metrics_match_their_definitions_worked_by_hand() {
        // Clean: logits [0, ln 2, ln 3, 0] → p = [1/7, 2/7, 3/7, 1/7]; correct = 2, incorrect = 1.
        let (l2, l3) = (2f32.ln(), 3f32.ln());
        let clean = [0.0, l2, l3, 0.0];
        let corrupted = [0.0, l3, l2, 0.0];
        let basis = MetricBasis::new(&clean, &corrupted, 2, 1);
        let m = basis.measure(&clean);
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-6;
        assert!(close(m[Metric::LogitDiff.index()], (1.5f64).ln()));
        assert!(close(m[Metric::Normalized.index()], 1.0));
        assert!(close(m[Metric::Prob.index()], 3.0 / 7.0));
        assert!(close(m[Metric::Logprob.index()], (3.0f64 / 7.0).ln()));
        assert!(close(m[Metric::Kl.index()], 0.0), "KL of a run with itself");
        assert_eq!(m[Metric::Rank.index()], Some(0.0));
        let m = basis.measure(&corrupted);
        assert!(close(m[Metric::Normalized.index()], 0.0));
        assert_eq!(
            m[Metric::Rank.index()],
            Some(1.0),
            "one token (id 1) above the correct answer"
        );
        // KL(p ‖ q) with p = [1,2,3,1]/7 and q = [1,3,2,1]/7.
        let kl = (2.0 / 7.0) * (2.0f64 / 3.0).ln() + (3.0 / 7.0) * (3.0f64 / 2.0).ln();
        assert!(close(m[Metric::Kl.index()], kl));
        assert_eq!(Metric::ALL.map(Metric::index), [0, 1, 2, 3, 4, 5]);
    }
}
