//! Sweeps: validate the prompts and answers, run the clean and corrupted baselines, then patch
//! every layer × position and stream each finished cell.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::Component;
use super::metric::{logit_diff, normalized};
use super::result::{AnswerRecord, Cell, FORMAT, ModelRecord, PromptRecord, SweepResult, Timing, TopToken};
use crate::error::{Error, Result};
use crate::model::transformer::{logits_rows, top_k};
use crate::model::{Hooks, Model, NoHooks, Site, Span};

/// How many next-token candidates are kept per run.
pub const DEFAULT_TOP_K: usize = 10;
/// Cells run together in one batched forward (one batch row each).
pub const DEFAULT_BATCH_CELLS: usize = 32;

/// What to sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRequest {
    pub clean: String,
    pub corrupted: String,
    /// The answer the clean prompt should produce (" John").
    pub correct: String,
    /// The answer the corrupted prompt produces (" Mary").
    pub incorrect: String,
    pub component: Component,
}

/// How cells are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// One full forward of the corrupted prompt per cell (batched), as notebooks do.
    #[default]
    Naive,
}

impl Schedule {
    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Naive => "naive",
        }
    }

    /// Parses a schedule name.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "naive" => Ok(Schedule::Naive),
            other => Err(Error::Input(format!("unknown schedule '{other}': use naive"))),
        }
    }
}

/// Knobs of a sweep run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepOptions {
    pub schedule: Schedule,
    pub top_k: usize,
    pub batch_cells: usize,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            schedule: Schedule::default(),
            top_k: DEFAULT_TOP_K,
            batch_cells: DEFAULT_BATCH_CELLS,
        }
    }
}

/// A prepared sweep: inputs validated, baselines run, clean activations cached.
pub struct Sweep<'m> {
    model: &'m Model,
    result: SweepResult,
    /// The clean run's activation at the swept site, per layer, `[1, seq, hidden]`.
    clean_acts: Vec<Tensor>,
    /// First position where the prompts' tokens differ (`seq` when they are identical).
    first_diff: usize,
    baseline_seconds: f64,
}

/// Records activations at some sites.
struct Capture {
    sites: Vec<Site>,
    acts: HashMap<(Site, usize), Tensor>,
}

impl Hooks for Capture {
    fn visit(&mut self, site: Site, layer: usize, _offset: usize, x: Tensor) -> Result<Tensor> {
        if self.sites.contains(&site) {
            self.acts.insert((site, layer), x.clone());
        }
        Ok(x)
    }
}

/// Overwrites, per batch row, one (layer, position) of one site with the clean activation.
struct PatchRows<'a> {
    site: Site,
    /// (layer, position) patched in each batch row.
    rows: &'a [(usize, usize)],
    clean: &'a [Tensor],
}

impl Hooks for PatchRows<'_> {
    fn visit(&mut self, site: Site, layer: usize, offset: usize, x: Tensor) -> Result<Tensor> {
        if site != self.site || !self.rows.iter().any(|&(l, _)| l == layer) {
            return Ok(x);
        }
        let (batch, seq, hidden) = x.dims3()?;
        let mut mask = vec![0u8; batch * seq];
        for (row, &(l, p)) in self.rows.iter().enumerate() {
            if l == layer && p >= offset && p < offset + seq {
                mask[row * seq + (p - offset)] = 1;
            }
        }
        let mask = Tensor::from_vec(mask, (batch, seq, 1), x.device())?.broadcast_as((batch, seq, hidden))?;
        let clean = self.clean[layer]
            .narrow(1, offset, seq)?
            .broadcast_as((batch, seq, hidden))?;
        Ok(mask.where_cond(&clean, &x)?)
    }
}

/// Checks one answer is a single token and returns it.
fn answer_token(model: &Model, which: &str, text: &str) -> Result<AnswerRecord> {
    if text.is_empty() {
        return Err(Error::Input(format!(
            "the {which} answer is empty: give one token, e.g. \" John\""
        )));
    }
    let ids = model.tokenizer.encode_plain(text)?;
    match ids.as_slice() {
        [id] => Ok(AnswerRecord {
            text: text.to_owned(),
            token_id: *id,
            token: model.tokenizer.token_text(*id),
        }),
        _ => {
            let parts: Vec<String> = ids
                .iter()
                .map(|&i| format!("{:?}", model.tokenizer.token_text(i)))
                .collect();
            let hint = ids
                .first()
                .map(|&i| format!(" Its first token is {:?}.", model.tokenizer.token_text(i)))
                .unwrap_or_default();
            Err(Error::Input(format!(
                "the {which} answer {text:?} is {} tokens ({}); answers must be exactly one token.{hint}",
                ids.len(),
                parts.join(" + ")
            )))
        }
    }
}

/// Tokenizes a prompt, refusing empty ones.
fn prompt_tokens(model: &Model, which: &str, text: &str) -> Result<PromptRecord> {
    if text.trim().is_empty() {
        return Err(Error::Input(format!("the {which} prompt is empty")));
    }
    let token_ids = model.tokenizer.encode_prompt(text)?;
    if token_ids.is_empty() {
        return Err(Error::Input(format!("the {which} prompt has no tokens")));
    }
    let max = model.config.max_position_embeddings;
    if token_ids.len() > max {
        return Err(Error::Input(format!(
            "the {which} prompt is {} tokens; the model takes at most {max}",
            token_ids.len()
        )));
    }
    Ok(PromptRecord {
        text: text.to_owned(),
        tokens: model.tokenizer.token_texts(&token_ids),
        token_ids,
    })
}

/// "[0]'After' [1]' John' …" for messages.
fn token_list(p: &PromptRecord) -> String {
    p.tokens
        .iter()
        .enumerate()
        .map(|(i, t)| format!("[{i}]{t:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The most likely next tokens of one logits row, with softmax probabilities.
pub fn top_tokens(model: &Model, logits: &[f32], k: usize) -> Vec<TopToken> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    top_k(logits, k)
        .into_iter()
        .map(|(id, logit)| TopToken {
            id,
            token: model.tokenizer.token_text(id),
            logit,
            prob: (f64::from(logit - max).exp() / sum) as f32,
        })
        .collect()
}

impl<'m> Sweep<'m> {
    /// Validates the request, runs the clean and corrupted prompts and caches clean activations.
    pub fn prepare(model: &'m Model, request: &SweepRequest, top_k: usize) -> Result<Self> {
        let start = Instant::now();
        let clean = prompt_tokens(model, "clean", &request.clean)?;
        let corrupted = prompt_tokens(model, "corrupted", &request.corrupted)?;
        if clean.token_ids.len() != corrupted.token_ids.len() {
            return Err(Error::Input(format!(
                "the prompts have different token lengths (clean {}, corrupted {}); patching compares them \
                 position by position, so they must tokenize to the same length.\n  clean:     {}\n  corrupted: {}",
                clean.token_ids.len(),
                corrupted.token_ids.len(),
                token_list(&clean),
                token_list(&corrupted)
            )));
        }
        let correct = answer_token(model, "correct", &request.correct)?;
        let incorrect = answer_token(model, "incorrect", &request.incorrect)?;
        if correct.token_id == incorrect.token_id {
            return Err(Error::Input(format!(
                "the correct and incorrect answers are the same token ({:?}); the logit difference would always be 0",
                correct.token
            )));
        }
        let seq = clean.token_ids.len();
        let first_diff = (0..seq)
            .find(|&i| clean.token_ids[i] != corrupted.token_ids[i])
            .unwrap_or(seq);

        let t = &model.transformer;
        let site = request.component.site();
        let layers = model.config.num_layers;
        let mut capture = Capture {
            sites: vec![site],
            acts: HashMap::new(),
        };
        let clean_run = t.forward(t.embed(&[&clean.token_ids])?, Span::default(), &mut capture)?;
        let corrupted_run = t.forward(t.embed(&[&corrupted.token_ids])?, Span::default(), &mut NoHooks)?;
        let clean_logits = logits_rows(&clean_run.last_logits)?.remove(0);
        let corrupted_logits = logits_rows(&corrupted_run.last_logits)?.remove(0);
        let clean_acts = (0..layers)
            .map(|l| {
                capture
                    .acts
                    .remove(&(site, l))
                    .ok_or_else(|| Error::Input(format!("internal: no clean activation captured at layer {l}")))
            })
            .collect::<Result<Vec<_>>>()?;

        let clean_ld = logit_diff(&clean_logits, correct.token_id, incorrect.token_id);
        let corrupted_ld = logit_diff(&corrupted_logits, correct.token_id, incorrect.token_id);
        let mut warnings = Vec::new();
        if normalized(0.0, clean_ld, corrupted_ld).is_none() {
            warnings.push(format!(
                "the clean and corrupted logit differences are equal ({clean_ld:.6}), so the normalized metric is \
                 undefined: `values` are null; `patched_logit_diff` holds the raw numbers"
            ));
        }
        let cfg = &model.config;
        let result = SweepResult {
            format: FORMAT.to_owned(),
            model: ModelRecord {
                id: model.source.display_name(),
                architecture: cfg.family.hf_class().to_owned(),
                num_layers: cfg.num_layers,
                hidden_size: cfg.hidden_size,
                dtype: model.dtype_name(),
                device: model.device_name(),
            },
            component: request.component,
            metric: "normalized_logit_diff".to_owned(),
            metric_definition: "(LD_patched - LD_corrupted) / (LD_clean - LD_corrupted), \
                LD = logit[correct] - logit[incorrect] at the last position"
                .to_owned(),
            clean_top_k: top_tokens(model, &clean_logits, top_k),
            corrupted_top_k: top_tokens(model, &corrupted_logits, top_k),
            clean,
            corrupted,
            correct,
            incorrect,
            clean_logit_diff: clean_ld,
            corrupted_logit_diff: corrupted_ld,
            shape: [layers, seq],
            values: vec![vec![None; seq]; layers],
            patched_logit_diff: vec![vec![None; seq]; layers],
            skipped: vec![vec![false; seq]; layers],
            top_k: vec![vec![Vec::new(); seq]; layers],
            complete: false,
            warnings,
            timing: Timing {
                load_seconds: Some(model.load_seconds),
                ..Timing::default()
            },
        };
        Ok(Self {
            model,
            result,
            clean_acts,
            first_diff,
            baseline_seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// The result so far: baselines, tokens, answers; no cells yet.
    pub fn result(&self) -> &SweepResult {
        &self.result
    }

    /// The first position where the prompts differ; earlier cells are exact no-ops.
    pub fn first_diff(&self) -> usize {
        self.first_diff
    }

    /// Computes every cell, calling `on_cell` as each finishes. When `cancel` is set the sweep stops
    /// after the current batch and returns what it has, with `complete == false`.
    pub fn run(
        mut self,
        options: &SweepOptions,
        cancel: &AtomicBool,
        on_cell: &mut dyn FnMut(&Cell),
    ) -> Result<SweepResult> {
        let start = Instant::now();
        let (layers, seq) = (self.result.layers(), self.result.positions());
        let clean_ld = self.result.clean_logit_diff;
        let corrupted_ld = self.result.corrupted_logit_diff;

        // Positions before the first difference: the clean and corrupted activations are identical
        // there (causal attention), so patching changes nothing.
        let corrupted_top = self.result.corrupted_top_k.clone();
        for layer in 0..layers {
            for position in 0..self.first_diff.min(seq) {
                let cell = Cell {
                    layer,
                    position,
                    patched_logit_diff: corrupted_ld,
                    value: normalized(corrupted_ld, clean_ld, corrupted_ld),
                    skipped: true,
                    top_k: corrupted_top.clone(),
                };
                on_cell(&cell);
                self.result.insert(cell);
                self.result.timing.cells_skipped += 1;
            }
        }

        let cells: Vec<(usize, usize)> = (0..layers)
            .flat_map(|l| (self.first_diff..seq).map(move |p| (l, p)))
            .collect();
        let mut cancelled = false;
        match options.schedule {
            Schedule::Naive => {
                for batch in cells.chunks(options.batch_cells.max(1)) {
                    if cancel.load(Ordering::Relaxed) {
                        cancelled = true;
                        break;
                    }
                    let logits = self.naive_batch(batch)?;
                    for (&(layer, position), row) in batch.iter().zip(logits) {
                        let patched = logit_diff(&row, self.result.correct.token_id, self.result.incorrect.token_id);
                        let cell = Cell {
                            layer,
                            position,
                            patched_logit_diff: patched,
                            value: normalized(patched, clean_ld, corrupted_ld),
                            skipped: false,
                            top_k: top_tokens(self.model, &row, options.top_k),
                        };
                        on_cell(&cell);
                        self.result.insert(cell);
                        self.result.timing.cells_computed += 1;
                    }
                }
            }
        }
        self.result.complete = !cancelled;
        self.result.timing.schedule = options.schedule.name().to_owned();
        self.result.timing.baseline_seconds = self.baseline_seconds;
        self.result.timing.sweep_seconds = self.baseline_seconds + start.elapsed().as_secs_f64();
        Ok(self.result)
    }

    /// One full corrupted forward per cell, batched: returns last-position logits per cell.
    fn naive_batch(&self, batch: &[(usize, usize)]) -> Result<Vec<Vec<f32>>> {
        let t = &self.model.transformer;
        let ids = &self.result.corrupted.token_ids;
        let rows: Vec<&[u32]> = batch.iter().map(|_| ids.as_slice()).collect();
        let mut hooks = PatchRows {
            site: self.result.component.site(),
            rows: batch,
            clean: &self.clean_acts,
        };
        let out = t.forward(t.embed(&rows)?, Span::default(), &mut hooks)?;
        logits_rows(&out.last_logits.to_dtype(DType::F32)?)
    }
}
