//! A sweep's results: the layer × position grid plus everything needed to read it later.
//! Serialized as the JSON the CLI writes and the GUI exports (`format` = [`FORMAT`]).

use serde::{Deserialize, Serialize};

use super::Component;
use super::metric::normalized;
use super::request::ValidRequest;
use super::schedule::Schedule;
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
}

/// The result of patching one component over every layer × position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepResult {
    /// Always [`FORMAT`].
    pub format: String,
    pub model: ModelRecord,
    pub component: Component,
    /// "normalized_logit_diff".
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
    /// `[layers, positions]`, as TransformerLens' `get_act_patch_*` return.
    pub shape: [usize; 2],
    /// The normalized metric per `[layer][position]`; null where not computed or undefined.
    pub values: Vec<Vec<Option<f64>>>,
    /// The patched run's raw logit difference per `[layer][position]`; null where not computed.
    pub patched_logit_diff: Vec<Vec<Option<f64>>>,
    /// Cells filled without running the model because the patch cannot change anything there
    /// (positions before the first token where the prompts differ).
    pub skipped: Vec<Vec<bool>>,
    /// The patched run's most likely next tokens per `[layer][position]` (empty where not computed).
    pub top_k: Vec<Vec<Vec<TopToken>>>,
    /// The patched run's logits of [correct, incorrect] per `[layer][position]`; null where not computed.
    pub answer_logits: Vec<Vec<Option<[f32; 2]>>>,
    /// Whether every cell was computed (false after a cancel or an error).
    pub complete: bool,
    /// Why the sweep stopped before every cell was computed, when an error stopped it (null when
    /// it completed or was cancelled); the cells computed before it are kept.
    #[serde(default)]
    pub error: Option<String>,
    /// A note for the reader, e.g. why `values` are null.
    pub warnings: Vec<String>,
    pub timing: Timing,
}

/// One finished cell, as streamed to the UI while a sweep runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub layer: usize,
    pub position: usize,
    /// The patched run's logit difference.
    pub patched_logit_diff: f64,
    /// The normalized metric (None when clean and corrupted do not differ).
    pub value: Option<f64>,
    /// Filled without running the model.
    pub skipped: bool,
    /// The patched run's most likely next tokens.
    pub top_k: Vec<TopToken>,
    /// The patched run's logits of the correct and the incorrect answer.
    pub answer_logits: [f32; 2],
}

impl SweepResult {
    /// The result of a sweep over `layers` × the prompts' positions before any cell is done: the
    /// request's prompts and answers and the clean and corrupted baselines.
    pub fn new(
        model: ModelRecord,
        request: ValidRequest,
        [clean, corrupted]: [Baseline; 2],
        layers: usize,
        load_seconds: Option<f64>,
    ) -> Self {
        let seq = request.clean.token_ids.len();
        let mut warnings = Vec::new();
        if normalized(0.0, clean.logit_diff, corrupted.logit_diff).is_none() {
            warnings.push(format!(
                "the clean and corrupted logit differences are equal ({:.6}), so the normalized metric is \
                 undefined: `values` are null; `patched_logit_diff` holds the raw numbers",
                clean.logit_diff
            ));
        }
        Self {
            format: FORMAT.to_owned(),
            model,
            component: request.component,
            metric: "normalized_logit_diff".to_owned(),
            metric_definition: "(LD_patched - LD_corrupted) / (LD_clean - LD_corrupted), \
                LD = logit[correct] - logit[incorrect] at the last position"
                .to_owned(),
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
            shape: [layers, seq],
            values: vec![vec![None; seq]; layers],
            patched_logit_diff: vec![vec![None; seq]; layers],
            skipped: vec![vec![false; seq]; layers],
            top_k: vec![vec![Vec::new(); seq]; layers],
            answer_logits: vec![vec![None; seq]; layers],
            complete: false,
            error: None,
            warnings,
            timing: Timing {
                load_seconds,
                ..Timing::default()
            },
        }
    }

    /// Number of layers (rows).
    pub fn layers(&self) -> usize {
        self.shape[0]
    }

    /// Number of positions (columns).
    pub fn positions(&self) -> usize {
        self.shape[1]
    }

    /// Stores a finished cell.
    pub fn insert(&mut self, cell: Cell) {
        let (l, p) = (cell.layer, cell.position);
        self.values[l][p] = cell.value;
        self.patched_logit_diff[l][p] = Some(cell.patched_logit_diff);
        self.skipped[l][p] = cell.skipped;
        self.top_k[l][p] = cell.top_k;
        self.answer_logits[l][p] = Some(cell.answer_logits);
    }

    /// The cells computed so far.
    pub fn done_cells(&self) -> usize {
        self.patched_logit_diff.iter().flatten().filter(|v| v.is_some()).count()
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
        };
        let request = ValidRequest {
            clean: prompt.clone(),
            corrupted: prompt,
            correct: answer(0),
            incorrect: answer(1),
            component: Component::ResidPost,
        };
        let model = ModelRecord {
            id: "test".into(),
            architecture: "LlamaForCausalLM".into(),
            num_layers: layers,
            hidden_size: 8,
            dtype: "f32".into(),
            device: "cpu".into(),
        };
        Self::new(model, request, [baseline(1.0), baseline(0.0)], layers, None)
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
