//! A sweep's results: the grid of cells (layer × position, layer × head, layer × position × head
//! or component × layer × position) plus everything needed to read it later. Serialized as the
//! JSON the CLI writes and the GUI exports (`format` = [`FORMAT`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::grid::{self, Grid};
use super::layout::{Axis, CellAt, Layout, View};
use super::metric::{Metric, Metrics, normalized};
use super::request::ValidRequest;
use super::schedule::Schedule;
use super::{Component, Direction};
use crate::model::Model;

/// Identifies the JSON layout, so notebooks can check what they load.
pub const FORMAT: &str = "patchbay.sweep.v1";

/// One of the model's most likely next tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopToken {
    /// Token id.
    pub id: u32,
    /// The token's text (" John").
    pub token: String,
    /// Its logit at the last position.
    pub logit: f32,
    /// Its softmax probability at the last position.
    pub prob: f32,
}

/// A prompt and its tokenization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub tokens: Vec<String>,
}

/// An answer token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerRecord {
    pub text: String,
    pub token_id: u32,
    pub token: String,
}

/// The model a sweep ran on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Repo id or file/folder name.
    pub id: String,
    /// HF architecture class ("Qwen3ForCausalLM").
    pub architecture: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    /// Query heads per layer.
    #[serde(default)]
    pub num_heads: usize,
    /// Key/value heads per layer (fewer than query heads under GQA).
    #[serde(default)]
    pub num_kv_heads: usize,
    /// Each head's width, read from the config (not always hidden / heads).
    #[serde(default)]
    pub head_dim: usize,
    pub dtype: String,
    pub device: String,
}

impl ModelRecord {
    /// The record of a loaded model.
    pub fn of(model: &Model) -> Self {
        let cfg = &model.config;
        Self {
            id: model.source.display_name(),
            architecture: cfg.family.hf_class().to_owned(),
            num_layers: cfg.num_layers,
            hidden_size: cfg.hidden_size,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            dtype: model.dtype().as_str().to_owned(),
            device: model.device_kind().name().to_owned(),
        }
    }
}

/// One unpatched run at the last position, as a result records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    /// logit[correct] − logit[incorrect].
    pub logit_diff: f64,
    /// The logits of [correct, incorrect].
    pub answer_logits: [f32; 2],
    /// The most likely next tokens.
    pub top_k: Vec<TopToken>,
    /// Every metric of the run.
    pub metrics: Metrics,
}

/// How long things took.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Which schedule computed the cells ("naive" or "fast").
    pub schedule: Schedule,
    /// Seconds loading the model (download excluded), when known.
    pub load_seconds: Option<f64>,
    /// Seconds for the clean and corrupted runs.
    pub baseline_seconds: f64,
    /// Seconds for the whole sweep, baselines included.
    pub sweep_seconds: f64,
    /// Cells run through the model.
    pub cells_computed: usize,
    /// Cells filled without running the model (exact no-ops).
    pub cells_skipped: usize,
    /// Every forward that computed cells after the baselines, in order: where a sweep's time went.
    #[serde(default)]
    pub forwards: Vec<ForwardTiming>,
}

/// One forward of a sweep's cells (a packed block of cones, or the naive schedule's full forward).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ForwardTiming {
    /// Cells it computed.
    pub cells: usize,
    /// Its work in token-layers: for each cell, the layers it ran times the tokens it ran them on.
    pub token_layers: usize,
    /// Seconds in the model, up to its logits being on the host (on a GPU: the device's work).
    pub forward_seconds: f64,
    /// Seconds turning those logits into cells on the CPU (metric, softmax, top-k) and delivering them.
    pub cells_seconds: f64,
    /// CPU seconds (summed over the cores) of the six metrics beyond the softmax the top-k needs.
    #[serde(default)]
    pub metrics_seconds: f64,
}

/// The result of patching one component over every layer × position (× head).
///
/// Every per-cell field (`values`, `patched_logit_diff`, each of `metrics`, `skipped`, `top_k`,
/// `answer_logits`) is a nested array of [`SweepResult::shape`], whose axes `axes` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepResult {
    /// Always [`FORMAT`].
    pub format: String,
    pub model: ModelRecord,
    pub component: Component,
    /// Head sweeps: one cell per (layer, position, head) rather than per (layer, head).
    #[serde(default)]
    pub by_position: bool,
    /// Which run was patched with which run's activations.
    #[serde(default)]
    pub direction: Direction,
    /// Whether Patchbay put the model's BOS token before both prompts on request (`--prepend-bos`);
    /// a BOS the tokenizer adds itself shows in the tokens either way.
    #[serde(default)]
    pub prepend_bos: bool,
    /// What `values` holds: "normalized_logit_diff".
    pub metric: String,
    /// The metric in words.
    pub metric_definition: String,
    pub clean: PromptRecord,
    pub corrupted: PromptRecord,
    pub correct: AnswerRecord,
    pub incorrect: AnswerRecord,
    /// logit[correct] − logit[incorrect] at the last position of the clean run.
    pub clean_logit_diff: f64,
    /// The same for the corrupted run.
    pub corrupted_logit_diff: f64,
    /// The clean run's most likely next tokens.
    pub clean_top_k: Vec<TopToken>,
    /// The corrupted run's most likely next tokens.
    pub corrupted_top_k: Vec<TopToken>,
    /// The clean run's logits of [correct, incorrect].
    pub clean_answer_logits: [f32; 2],
    /// The corrupted run's logits of [correct, incorrect].
    pub corrupted_answer_logits: [f32; 2],
    /// The unpatched runs' metrics, by name (the clean run's KL is 0, its normalized value 1).
    #[serde(default)]
    pub clean_metrics: BTreeMap<String, Option<f64>>,
    #[serde(default)]
    pub corrupted_metrics: BTreeMap<String, Option<f64>>,
    /// The grid's axes: `["layer", "position"]`, `["layer", "head"]`, `["layer", "position",
    /// "head"]` or `["component", "layer", "position"]`, as TransformerLens' `get_act_patch_*` order them.
    #[serde(default = "default_axes")]
    pub axes: Vec<Axis>,
    /// The grid's shape, one number per axis.
    pub shape: Vec<usize>,
    /// Block sweeps: the components along the first axis.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block_components: Vec<Component>,
    /// Head sweeps over key/value heads: the query heads each key/value head serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_heads_of_kv_head: Vec<Vec<usize>>,
    /// The normalized metric per cell; null where not computed or undefined.
    pub values: Grid<Option<f64>>,
    /// The patched run's raw logit difference per cell; null where not computed.
    pub patched_logit_diff: Grid<Option<f64>>,
    /// Every metric per cell, by name ([`Metric::name`]); null where not computed or undefined.
    #[serde(default)]
    pub metrics: BTreeMap<String, Grid<Option<f64>>>,
    /// Cells filled without running the model because the patch cannot change anything there
    /// (positions before the first token where the prompts differ).
    pub skipped: Grid<bool>,
    /// The patched run's most likely next tokens per cell (empty where not computed).
    pub top_k: Grid<Vec<TopToken>>,
    /// The patched run's logits of [correct, incorrect] per cell; null where not computed.
    pub answer_logits: Grid<Option<[f32; 2]>>,
    /// Whether every cell was computed (false after a cancel or an error).
    pub complete: bool,
    /// Why the sweep stopped before every cell was computed, when an error stopped it (null when
    /// it completed or was cancelled); the cells computed before it are kept.
    #[serde(default)]
    pub error: Option<String>,
    /// A note for the reader, e.g. why `values` are null.
    pub warnings: Vec<String>,
    pub timing: Timing,
    /// The attribution-patching estimate of every cell (`--estimate`), when one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<crate::patching::estimate::Attribution>,
    /// With an estimate: which cells were computed exactly (elsewhere `values` is null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<Grid<bool>>,
}

fn default_axes() -> Vec<Axis> {
    vec![Axis::Layer, Axis::Position]
}

/// One finished cell, as streamed to the UI while a sweep runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub at: CellAt,
    /// Every metric of the patched run.
    pub metrics: Metrics,
    /// Filled without running the model.
    pub skipped: bool,
    /// The patched run's most likely next tokens.
    pub top_k: Vec<TopToken>,
    /// The patched run's logits of the correct and the incorrect answer.
    pub answer_logits: [f32; 2],
}

impl Cell {
    /// The patched run's logit difference.
    pub fn patched_logit_diff(&self) -> f64 {
        self.metrics[Metric::LogitDiff.index()].unwrap_or(f64::NAN)
    }

    /// The normalized metric (None when clean and corrupted do not differ).
    pub fn value(&self) -> Option<f64> {
        self.metrics[Metric::Normalized.index()]
    }
}

impl SweepResult {
    /// The result of a sweep laid out as `layout` before any cell is done: the request's prompts and
    /// answers and the clean and corrupted baselines.
    pub fn new(
        model: ModelRecord,
        request: ValidRequest,
        [clean, corrupted]: [Baseline; 2],
        layout: Layout,
        load_seconds: Option<f64>,
    ) -> Self {
        let mut warnings = Vec::new();
        if normalized(0.0, clean.logit_diff, corrupted.logit_diff).is_none() {
            warnings.push(format!(
                "the clean and corrupted logit differences are equal ({:.6}), so the normalized metric is \
                 undefined: `values` are null; `patched_logit_diff` holds the raw numbers",
                clean.logit_diff
            ));
        }
        let shape = layout.shape();
        let by_name = |m: &Metrics| -> BTreeMap<String, Option<f64>> {
            Metric::ALL
                .iter()
                .map(|k| (k.name().to_owned(), m[k.index()]))
                .collect()
        };
        let query_heads_of_kv_head = if layout.component.per_kv_head() {
            let rep = (model.num_heads / model.num_kv_heads.max(1)).max(1);
            (0..layout.heads).map(|g| (g * rep..(g + 1) * rep).collect()).collect()
        } else {
            Vec::new()
        };
        Self {
            format: FORMAT.to_owned(),
            model,
            component: request.component,
            by_position: layout.by_position,
            direction: request.direction,
            prepend_bos: request.prepend_bos,
            metric: "normalized_logit_diff".to_owned(),
            metric_definition: Metric::Normalized.definition().to_owned(),
            clean: request.clean,
            corrupted: request.corrupted,
            correct: request.correct,
            incorrect: request.incorrect,
            clean_logit_diff: clean.logit_diff,
            corrupted_logit_diff: corrupted.logit_diff,
            clean_top_k: clean.top_k,
            corrupted_top_k: corrupted.top_k,
            clean_answer_logits: clean.answer_logits,
            corrupted_answer_logits: corrupted.answer_logits,
            clean_metrics: by_name(&clean.metrics),
            corrupted_metrics: by_name(&corrupted.metrics),
            axes: layout.axes(),
            block_components: if layout.component == Component::Block {
                Component::BLOCK_PARTS.to_vec()
            } else {
                Vec::new()
            },
            query_heads_of_kv_head,
            values: Grid::new(shape.clone(), None),
            patched_logit_diff: Grid::new(shape.clone(), None),
            metrics: Metric::ALL
                .iter()
                .map(|m| (m.name().to_owned(), Grid::new(shape.clone(), None)))
                .collect(),
            skipped: Grid::new(shape.clone(), false),
            top_k: Grid::new(shape.clone(), Vec::new()),
            answer_logits: Grid::new(shape.clone(), None),
            shape,
            complete: false,
            error: None,
            warnings,
            timing: Timing {
                load_seconds,
                ..Timing::default()
            },
            estimate: None,
            verified: None,
        }
    }

    /// Where each cell sits in the grid.
    pub fn layout(&self) -> Layout {
        let len = |axis: Axis| {
            self.axes
                .iter()
                .position(|&a| a == axis)
                .and_then(|i| self.shape.get(i).copied())
        };
        Layout {
            component: self.component,
            by_position: self.by_position,
            layers: len(Axis::Layer).unwrap_or(self.model.num_layers),
            positions: self.clean.token_ids.len(),
            heads: len(Axis::Head).unwrap_or(0),
        }
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.layout().layers
    }

    /// Number of positions (tokens in each prompt).
    pub fn positions(&self) -> usize {
        self.clean.token_ids.len()
    }

    /// Stores a finished cell.
    pub fn insert(&mut self, cell: Cell) {
        let i = self.layout().index(cell.at);
        self.values.set(i, cell.value());
        self.patched_logit_diff.set(i, Some(cell.patched_logit_diff()));
        for m in Metric::ALL {
            if let Some(grid) = self.metrics.get_mut(m.name()) {
                grid.set(i, cell.metrics[m.index()]);
            }
        }
        self.skipped.set(i, cell.skipped);
        self.top_k.set(i, cell.top_k);
        self.answer_logits.set(i, Some(cell.answer_logits));
    }

    /// The cells computed so far.
    pub fn done_cells(&self) -> usize {
        self.patched_logit_diff.flat().iter().filter(|v| v.is_some()).count()
    }

    /// `metric`'s grid: from `metrics`, or for results written before it existed, `values` and
    /// `patched_logit_diff`; `None` when the result lacks it. Look it up once per view, not per cell.
    pub fn metric_grid(&self, metric: Metric) -> Option<&Grid<Option<f64>>> {
        self.metrics.get(metric.name()).or(match metric {
            Metric::Normalized => Some(&self.values),
            Metric::LogitDiff => Some(&self.patched_logit_diff),
            _ => None,
        })
    }

    /// `metric` of the cell at flat index `i` (see [`SweepResult::metric_grid`]).
    pub fn metric_at(&self, metric: Metric, i: usize) -> Option<f64> {
        self.metric_grid(metric)?.flat().get(i).copied().flatten()
    }

    /// The metrics this result has (older results: normalized and logit_diff only).
    pub fn available_metrics(&self) -> Vec<Metric> {
        Metric::ALL
            .into_iter()
            .filter(|&m| self.metric_grid(m).is_some())
            .collect()
    }

    /// Position labels as researchers write them: the token text with its index (" John_1" →
    /// "John_1"); where the prompts' tokens differ, both ("Mary/John_9"). Every view of a result
    /// (heatmap axis, figure ticks, text table) uses these.
    pub fn position_labels(&self) -> Vec<String> {
        self.clean
            .tokens
            .iter()
            .zip(&self.corrupted.tokens)
            .enumerate()
            .map(|(i, (c, k))| {
                if c == k {
                    format!("{}_{i}", c.trim())
                } else {
                    format!("{}/{}_{i}", c.trim(), k.trim())
                }
            })
            .collect()
    }

    /// Head labels along a head axis: "H3"; for key/value heads, the query heads they serve too
    /// ("KV1 (H3–5)").
    pub fn head_labels(&self) -> Vec<String> {
        let heads = self.layout().heads;
        if self.query_heads_of_kv_head.is_empty() {
            return (0..heads).map(|h| format!("H{h}")).collect();
        }
        self.query_heads_of_kv_head
            .iter()
            .enumerate()
            .map(|(g, q)| match (q.first(), q.last()) {
                (Some(a), Some(b)) if a != b => format!("KV{g} (H{a}–{b})"),
                (Some(a), _) => format!("KV{g} (H{a})"),
                _ => format!("KV{g}"),
            })
            .collect()
    }

    /// Labels of `view`'s columns.
    pub fn column_labels(&self, view: &View) -> Vec<String> {
        match view.columns {
            Axis::Head => self.head_labels(),
            _ => self.position_labels(),
        }
    }

    /// What `view` of this result shows, in words: "head_out at position Mary/John_9".
    pub fn view_title(&self, view: &View) -> String {
        match view.fixed {
            Some((Axis::Component, part)) => Component::BLOCK_PARTS[part.min(2)].name().to_owned(),
            Some((Axis::Position, p)) => format!(
                "{} at position {}",
                self.component,
                self.position_labels().get(p).map_or("?", String::as_str)
            ),
            _ => self.component.name().to_owned(),
        }
    }

    /// Turns a JSON value written by [`serde_json`] from a result back into one: the per-cell
    /// fields are nested arrays of `shape`, which [`Grid`] reads flat.
    pub fn from_json_value(mut value: serde_json::Value) -> serde_json::Result<Self> {
        use serde::de::Error as _;
        let shape: Vec<usize> = serde_json::from_value(value["shape"].clone())?;
        let object = value
            .as_object_mut()
            .ok_or_else(|| serde_json::Error::custom("not a JSON object"))?;
        for field in [
            "values",
            "patched_logit_diff",
            "skipped",
            "top_k",
            "answer_logits",
            "verified",
        ] {
            if let Some(v) = object.get_mut(field).filter(|v| !v.is_null()) {
                *v = grid::wire(v.take(), &shape)?;
            }
        }
        if let Some(serde_json::Value::Object(estimate)) = object.get_mut("estimate") {
            for field in ["logit_diff", "normalized"] {
                if let Some(v) = estimate.get_mut(field) {
                    *v = grid::wire(v.take(), &shape)?;
                }
            }
        }
        if let Some(serde_json::Value::Object(metrics)) = object.get_mut("metrics") {
            for v in metrics.values_mut() {
                *v = grid::wire(v.take(), &shape)?;
            }
        }
        serde_json::from_value(value)
    }
}

#[cfg(test)]
impl SweepResult {
    /// A result with no cells, `layers × positions`, its prompts' tokens "t0", "t1", ….
    pub(crate) fn empty_for_tests(layers: usize, positions: usize) -> Self {
        let prompt = PromptRecord {
            text: String::new(),
            token_ids: (0..positions as u32).collect(),
            tokens: (0..positions).map(|p| format!("t{p}")).collect(),
        };
        let answer = |id| AnswerRecord {
            text: format!("a{id}"),
            token_id: id,
            token: format!("a{id}"),
        };
        let baseline = |logit_diff| Baseline {
            logit_diff,
            answer_logits: [logit_diff as f32, 0.0],
            top_k: Vec::new(),
            metrics: [Some(logit_diff); Metric::COUNT],
        };
        let request = ValidRequest {
            prepend_bos: false,
            clean: prompt.clone(),
            corrupted: prompt,
            correct: answer(0),
            incorrect: answer(1),
            component: Component::ResidPost,
            direction: Direction::Denoising,
            by_position: false,
        };
        let model = ModelRecord {
            id: "test".into(),
            architecture: "LlamaForCausalLM".into(),
            num_layers: layers,
            hidden_size: 8,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            dtype: "f32".into(),
            device: "cpu".into(),
        };
        let layout = Layout {
            component: Component::ResidPost,
            by_position: false,
            layers,
            positions,
            heads: 0,
        };
        Self::new(model, request, [baseline(1.0), baseline(0.0)], layout, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_labels_name_the_token_and_both_where_the_prompts_differ() {
        let mut r = SweepResult::empty_for_tests(1, 3);
        r.clean.tokens = vec!["After".into(), " Mary".into(), " to".into()];
        r.corrupted.tokens = vec!["After".into(), " John".into(), " to".into()];
        assert_eq!(r.position_labels(), ["After_0", "Mary/John_1", "to_2"]);
    }
}
