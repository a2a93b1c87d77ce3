//! What a sweep costs: each cell's work in token-layers (the unit of [`Progress`]), the whole
//! sweep's, and an estimate of its time told before it runs.

use super::Component;
use super::progress::Progress;
use super::schedule::Schedule;
use super::sweep::{Sweep, SweepOptions};

/// What a sweep will cost, told before it runs ([`Sweep::estimate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Cells to compute (no-op cells aside).
    pub cells: usize,
    /// Seconds it should take on this device, roughly.
    pub seconds: f64,
}

impl Sweep<'_> {
    /// The predicted cost of computing the cell at (`layer`, `position`), in token-layers: its
    /// [`Sweep::token_layers`] plus the unembedding of its last row, counted as the token-layers
    /// with as many weights.
    pub(super) fn cell_cost(&self, schedule: Schedule, layer: usize, position: usize) -> usize {
        let cfg = &self.model.config;
        let layer_params = cfg.hidden_size
            * (2 * cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim + 3 * cfg.intermediate_size);
        let head_cost = (cfg.vocab_size * cfg.hidden_size).div_ceil(layer_params.max(1));
        self.token_layers(schedule, layer, position) + head_cost
    }

    /// A [`Progress`] for running this sweep with `options`: the predicted cost of every cell it
    /// computes (not the skipped no-ops, nor the last layer's cells that come with the baselines),
    /// which [`Sweep::run_observed`] reports as it is done.
    pub fn progress(&self, options: &SweepOptions) -> Progress {
        let (layers, seq) = (self.result.layers(), self.result.positions());
        let skip_noops = options.schedule == Schedule::Fast || options.skip_noops;
        let first_run = if skip_noops { self.first_diff.min(seq) } else { 0 };
        let with_baselines = options.schedule == Schedule::Fast && self.last_layer_logits.is_some();
        let computed_layers = if with_baselines { layers - 1 } else { layers };
        let total: usize = (0..computed_layers)
            .flat_map(|l| (first_run..seq).map(move |p| (l, p)))
            .map(|(l, p)| self.cell_cost(options.schedule, l, p))
            .sum();
        Progress::new(total as f64)
    }

    /// How many cells running with `options` computes (the no-op cells it fills as zeros aside),
    /// and about how long it takes here: its work at the rate the baselines ran (the large blocks
    /// of the fast schedule run faster, so this errs long).
    pub fn estimate(&self, options: &SweepOptions) -> Estimate {
        let (layers, seq) = (self.result.layers(), self.result.positions());
        let skip_noops = options.schedule == Schedule::Fast || options.skip_noops;
        let first_run = if skip_noops { self.first_diff.min(seq) } else { 0 };
        let baseline_work = (layers * (self.first_diff + 2 * (seq - self.first_diff))) as f64;
        let rate = baseline_work / self.baseline_seconds.max(1e-6);
        Estimate {
            cells: layers * (seq - first_run),
            seconds: self.progress(options).total() / rate,
        }
    }

    /// The work of the cell at (`layer`, `position`) in token-layers: every layer on every token
    /// for the naive schedule; for the fast one, its cone's layers on the positions from `position`.
    pub(super) fn token_layers(&self, schedule: Schedule, layer: usize, position: usize) -> usize {
        let (layers, seq) = (self.result.layers(), self.result.positions());
        match schedule {
            Schedule::Naive => layers * seq,
            Schedule::Fast => (layers - self.cone_start_layer(layer)) * (seq - position),
        }
    }

    /// The layer whose resid_pre a cone for a patch at `layer` starts from: the patched layer itself
    /// for resid_pre; the next one for resid_post, attn_out and mlp_out, whose patched resid_post is
    /// computed directly (nothing else in the layer changes at the patched position).
    pub(super) fn cone_start_layer(&self, layer: usize) -> usize {
        match self.result.component {
            Component::ResidPre => layer,
            Component::ResidPost | Component::AttnOut | Component::MlpOut => layer + 1,
        }
    }
}
