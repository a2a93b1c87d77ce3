//! What a sweep costs: each cell's work in token-layers (the unit of [`Progress`]), the whole
//! sweep's, and an estimate of its time told before it runs.

use super::Component;
use super::layout::CellAt;
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
    /// The predicted cost of computing the cell `at`, in token-layers: its
    /// [`Sweep::token_layers`] plus the unembedding of its last row, counted as the token-layers
    /// with as many weights.
    pub(super) fn cell_cost(&self, schedule: Schedule, at: CellAt) -> usize {
        let cfg = &self.model.config;
        let layer_params = cfg.hidden_size
            * (2 * cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim + 3 * cfg.intermediate_size);
        let head_cost = (cfg.vocab_size * cfg.hidden_size).div_ceil(layer_params.max(1));
        self.token_layers(schedule, at) + head_cost
    }

    /// The cells running with `options` computes: not the skipped no-ops, nor the last layer's
    /// cells that come with the baselines.
    fn computed_cells(&self, options: &SweepOptions) -> impl Iterator<Item = CellAt> + '_ {
        let skip_noops = options.schedule == Schedule::Fast || options.skip_noops;
        let with_baselines = options.schedule == Schedule::Fast && self.last_layer_logits.is_some();
        let last = self.layout.layers - 1;
        self.layout
            .cells()
            .filter(move |&at| !(skip_noops && self.is_noop(at) || with_baselines && at.layer == last))
    }

    /// A [`Progress`] for running this sweep with `options`: the predicted cost of every cell it
    /// computes, which [`Sweep::run_observed`] reports as it is done.
    pub fn progress(&self, options: &SweepOptions) -> Progress {
        let total: usize = self
            .computed_cells(options)
            .map(|at| self.cell_cost(options.schedule, at))
            .sum();
        Progress::new(total as f64)
    }

    /// How many cells running with `options` computes (the no-op cells it fills as zeros aside),
    /// and about how long it takes here: its work at the rate the baselines ran (the large blocks
    /// of the fast schedule run faster, so this errs long).
    pub fn estimate(&self, options: &SweepOptions) -> Estimate {
        let (layers, seq) = (self.layout.layers, self.layout.positions);
        let skip_noops = options.schedule == Schedule::Fast || options.skip_noops;
        let cells = if skip_noops {
            self.layout.cells_to_compute(self.first_diff)
        } else {
            self.layout.len()
        };
        let baseline_work = (layers * (self.first_diff + 2 * (seq - self.first_diff))) as f64;
        let rate = baseline_work / self.baseline_seconds.max(1e-6);
        Estimate {
            cells,
            seconds: self.progress(options).total() / rate,
        }
    }

    /// The work of the cell `at` in token-layers: every layer on every token for the naive
    /// schedule; for the fast one, its cone's layers on the positions from its offset.
    pub(super) fn token_layers(&self, schedule: Schedule, at: CellAt) -> usize {
        let (layers, seq) = (self.layout.layers, self.layout.positions);
        match schedule {
            Schedule::Naive => layers * seq,
            Schedule::Fast => (layers - self.cone_start_layer(at)) * (seq - self.cone_offset(at)),
        }
    }

    /// The layer whose resid_pre the cone of cell `at` starts from: the patched layer itself for
    /// resid_pre; the next one for every other component, whose patched resid_post is computed
    /// directly (only the layer's attention output or what follows it changes).
    pub(super) fn cone_start_layer(&self, at: CellAt) -> usize {
        match self.layout.component_of(at) {
            Component::ResidPre => at.layer,
            _ => at.layer + 1,
        }
    }
}
