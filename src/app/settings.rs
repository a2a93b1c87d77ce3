//! What the app remembers between runs, and what the command line may set instead at start.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::presets::{Preset, presets};
use crate::dataset::templates::Template;
use crate::model::{DEFAULT_MODEL, DeviceChoice, DtypeChoice};
use crate::patching::estimate::{EstimateMethod, Exact};
use crate::patching::sweep::DEFAULT_MAX_CELLS;
use crate::patching::{Component, Direction, Metric};

/// Which cells a sweep with an estimate verifies exactly (see [`crate::patching::estimate::Exact`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Verify {
    /// Every cell, most important first.
    #[default]
    All,
    /// The [`Settings::verify_top`] cells of largest estimated effect.
    Top,
    /// None: the estimate alone.
    None,
}

/// The "verify the top K" default.
pub const DEFAULT_VERIFY_TOP: usize = 200;

/// How many recently used models the picker remembers.
const RECENT_MODELS: usize = 8;

/// What persists between runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub model: String,
    pub recent_models: Vec<String>,
    pub device: DeviceChoice,
    pub dtype: DtypeChoice,
    pub clean: String,
    pub corrupted: String,
    pub correct: String,
    pub incorrect: String,
    pub component: Component,
    /// Head components: one cell per (layer, position, head).
    pub by_position: bool,
    pub direction: Direction,
    /// Put the model's BOS before the prompts where its tokenizer adds none (GPT-2).
    pub prepend_bos: bool,
    /// The metric the heatmap shows (every metric is computed; switching redraws).
    pub metric: Metric,
    /// Draw an attribution-patching estimate of every cell first (None: exact cells only).
    pub estimate: Option<EstimateMethod>,
    /// With an estimate: which cells are verified exactly.
    pub verify: Verify,
    pub verify_top: usize,
    /// The dataset generator's template, size and seed.
    pub dataset_template: Template,
    pub dataset_n: usize,
    pub dataset_seed: u64,
    /// Leave flagged pairs out of a dataset's mean.
    pub exclude_flagged: bool,
    pub preset: Option<String>,
    pub auto_range: bool,
    /// Run asks for confirmation first when a sweep has more cells to compute than this.
    pub confirm_above_cells: usize,
    /// The file "Save to" writes (for desktops without a file dialog).
    pub save_path: String,
}

impl Default for Settings {
    fn default() -> Self {
        let mut s = Self {
            model: DEFAULT_MODEL.to_owned(),
            recent_models: Vec::new(),
            device: DeviceChoice::Cpu,
            dtype: DtypeChoice::Auto,
            clean: String::new(),
            corrupted: String::new(),
            correct: String::new(),
            incorrect: String::new(),
            component: Component::ResidPost,
            by_position: false,
            direction: Direction::Denoising,
            prepend_bos: false,
            metric: Metric::Normalized,
            estimate: Some(EstimateMethod::AtpStar),
            verify: Verify::All,
            verify_top: DEFAULT_VERIFY_TOP,
            dataset_template: Template::Ioi,
            dataset_n: 32,
            dataset_seed: 0,
            exclude_flagged: false,
            preset: None,
            auto_range: false,
            confirm_above_cells: DEFAULT_MAX_CELLS,
            save_path: String::new(),
        };
        if let Some(p) = presets().first() {
            s.apply_preset(p);
        }
        s
    }
}

impl Settings {
    pub(super) fn apply_preset(&mut self, p: &Preset) {
        self.clean = p.clean.clone();
        self.corrupted = p.corrupted.clone();
        self.correct = p.correct.clone();
        self.incorrect = p.incorrect.clone();
        self.component = p.component;
        self.by_position = p.by_position;
        self.direction = p.direction;
        self.preset = Some(p.name.clone());
    }

    /// The exact cells the settings ask for.
    pub fn exact(&self) -> Exact {
        match self.verify {
            Verify::All => Exact::All,
            Verify::Top => Exact::Top(self.verify_top),
            Verify::None => Exact::None,
        }
    }

    pub(super) fn remember_model(&mut self, spec: &str) {
        self.recent_models.retain(|m| m != spec);
        self.recent_models.insert(0, spec.to_owned());
        self.recent_models.truncate(RECENT_MODELS);
    }
}

/// How the app starts (command line and tests).
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Load this model instead of the remembered one.
    pub model: Option<String>,
    /// The demo model to offer when the chosen one cannot be loaded.
    pub demo_model: Option<PathBuf>,
    /// Ignore remembered settings (tests).
    pub fresh: bool,
    /// Start a sweep as soon as the model has loaded (demos, screenshots).
    pub run_on_load: bool,
    /// Settings given on the command line, over the remembered ones.
    pub overrides: Overrides,
    /// A dataset to load (or generate) once the model has loaded; with `run_on_load` it runs.
    pub dataset: Option<DatasetStart>,
}

/// A dataset given on the command line (`patchbay gui --pairs FILE` or `--template ioi --n 32`).
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetStart {
    File(PathBuf),
    Template { template: Template, n: usize, seed: u64 },
}

/// Settings to start with instead of the remembered ones (`patchbay gui --clean … --device …`).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub clean: Option<String>,
    pub corrupted: Option<String>,
    pub correct: Option<String>,
    pub incorrect: Option<String>,
    pub component: Option<Component>,
    pub by_position: Option<bool>,
    pub direction: Option<Direction>,
    pub prepend_bos: Option<bool>,
    /// `Some(None)`: no estimate; `Some(Some(m))`: estimate with `m`.
    pub estimate: Option<Option<EstimateMethod>>,
    pub exact: Option<Exact>,
    pub metric: Option<Metric>,
    pub device: Option<DeviceChoice>,
    pub dtype: Option<DtypeChoice>,
}

impl Overrides {
    pub(super) fn apply(self, settings: &mut Settings) {
        let prompts_given = self.clean.is_some() || self.corrupted.is_some();
        let set = |field: &mut String, value: Option<String>| {
            if let Some(v) = value {
                *field = v;
            }
        };
        set(&mut settings.clean, self.clean);
        set(&mut settings.corrupted, self.corrupted);
        set(&mut settings.correct, self.correct);
        set(&mut settings.incorrect, self.incorrect);
        if let Some(d) = self.dtype {
            settings.dtype = d;
        }
        if let Some(c) = self.component {
            settings.component = c;
            settings.by_position = false;
        }
        if let Some(b) = self.by_position {
            settings.by_position = b;
        }
        if let Some(d) = self.direction {
            settings.direction = d;
        }
        if let Some(b) = self.prepend_bos {
            settings.prepend_bos = b;
        }
        if let Some(e) = self.estimate {
            settings.estimate = e;
        }
        match self.exact {
            Some(Exact::All) => settings.verify = Verify::All,
            Some(Exact::None) => settings.verify = Verify::None,
            Some(Exact::Top(k)) => {
                settings.verify = Verify::Top;
                settings.verify_top = k;
            }
            None => {}
        }
        if let Some(m) = self.metric {
            settings.metric = m;
        }
        if let Some(d) = self.device {
            settings.device = d;
        }
        if prompts_given {
            // The prompts are the user's own now, not the preset's.
            settings.preset = None;
        }
    }
}
