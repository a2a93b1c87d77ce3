//! What a sweep costs: each cell's work in token-layers (the unit of [`Progress`]), the whole
//! sweep's, and an estimate of its time told before it runs. [`CostModel`] needs only the grid,
//! where the prompts first differ and the model's shape, so the app can estimate a sweep before
//! running its baselines.

use super::Component;
use super::layout::{CellAt, Layout};
use super::progress::Progress;
use super::schedule::Schedule;
use super::sweep::{Sweep, SweepOptions};
use crate::model::ArchConfig;

/// What a sweep will cost, told before it runs ([`Sweep::estimate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Cells to compute (no-op cells aside).
    pub cells: usize,
    /// Seconds it should take on this device, roughly.
    pub seconds: f64,
}

/// The predicted work of a sweep's cells.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    pub layout: Layout,
    /// The first position where the prompts differ.
    pub first_diff: usize,
    /// The unembedding of one row, in token-layers with as many weights.
    unembed: usize,
}

impl CostModel {
    /// The cost model of a sweep laid out as `layout` on a model of `cfg`.
    pub fn new(layout: Layout, first_diff: usize, cfg: &ArchConfig) -> Self {
        let layer_params = cfg.hidden_size
            * (2 * cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim + 3 * cfg.intermediate_size);
        Self {
            layout,
            first_diff,
            unembed: (cfg.vocab_size * cfg.hidden_size).div_ceil(layer_params.max(1)),
        }
    }

    /// Whether the fast schedule computes the last layer's cells with the baselines (the
    /// components patched after that layer's attention, when the prompts differ): they need no
    /// layer, only the unembedding of one patched row.
    pub fn last_layer_with_baselines(&self) -> bool {
        matches!(
            self.layout.component,
            Component::ResidPost | Component::ResidMid | Component::AttnOut | Component::MlpOut
        ) && self.first_diff < self.layout.positions
    }

    /// The layer whose resid_pre the cone of cell `at` starts from: the patched layer itself for
    /// resid_pre; the next one for every other component, whose patched resid_post is computed
    /// directly (only the layer's attention output or what follows it changes).
    pub fn cone_start_layer(&self, at: CellAt) -> usize {
        match self.layout.component_of(at) {
            Component::ResidPre => at.layer,
            _ => at.layer + 1,
        }
    }

    /// The first position of a cell's cone: its patched position, or for every-position head
    /// patches the first differing token.
    pub fn cone_offset(&self, at: CellAt) -> usize {
        at.position
            .unwrap_or(self.first_diff)
            .min(self.layout.positions.saturating_sub(1))
    }

    /// The work of the cell `at` in token-layers: every layer on every token for the naive
    /// schedule; for the fast one, its cone's layers on the positions from its offset.
    pub fn token_layers(&self, schedule: Schedule, at: CellAt) -> usize {
        let (layers, seq) = (self.layout.layers, self.layout.positions);
        match schedule {
            Schedule::Naive => layers * seq,
            Schedule::Fast => (layers - self.cone_start_layer(at)) * (seq - self.cone_offset(at)),
        }
    }

    /// The predicted cost of computing the cell `at`: its token-layers plus the unembedding of
    /// its last row.
    pub fn cell_cost(&self, schedule: Schedule, at: CellAt) -> usize {
        self.token_layers(schedule, at) + self.unembed
    }

    /// The cells a run with `options` computes: not the skipped no-ops, nor the last layer's
    /// cells that come with the baselines.
    pub fn computed_cells(&self, options: &SweepOptions) -> impl Iterator<Item = CellAt> + '_ {
        let skip_noops = options.schedule == Schedule::Fast || options.skip_noops;
        let with_baselines = options.schedule == Schedule::Fast && self.last_layer_with_baselines();
        let last = self.layout.layers - 1;
        self.layout.cells().filter(move |&at| {
            !(skip_noops && self.layout.is_noop(at, self.first_diff) || with_baselines && at.layer == last)
        })
    }

    /// The predicted cost of every cell a run with `options` computes.
    pub fn total(&self, options: &SweepOptions) -> f64 {
        self.computed_cells(options)
            .map(|at| self.cell_cost(options.schedule, at))
            .sum::<usize>() as f64
    }
}

impl Sweep<'_> {
    /// A [`Progress`] for running this sweep with `options`: the predicted cost of every cell it
    /// computes, which [`Sweep::run_observed`] reports as it is done.
    pub fn progress(&self, options: &SweepOptions) -> Progress {
        Progress::new(self.cost.total(options))
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
}
