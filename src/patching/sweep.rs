//! Sweeps: validate the prompts and answers, run the clean and corrupted baselines, then patch
//! every layer × position and stream each finished cell.
//!
//! Two schedules compute the same cells:
//! - [`Schedule::Fast`] (default) runs only each patch's causal cone. A patch at (layer L,
//!   position P) changes nothing before L and nothing at positions before P, so a cell starts from
//!   the corrupted run's residual stream with the patched value written in, attends to the
//!   corrupted run's cached keys/values for positions < P, and many cells share one packed forward
//!   ([`Transformer::forward_cones`](crate::model::Transformer::forward_cones)).
//!   The last layer's cells need no layer at all, only the final norm and unembedding of one row:
//!   they are computed with the baselines.
//! - [`Schedule::Naive`] runs one full corrupted forward per cell, as a notebook loop does: the
//!   baseline the fast schedule is measured and tested against.
//!
//! Both start from the same baselines: the clean and corrupted prompts in one packed forward that
//! computes their shared first tokens once
//! ([`Transformer::forward_shared_prefix`](crate::model::Transformer::forward_shared_prefix)).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::Component;
use super::metric::{logit_diff, normalized};
use super::result::{
    AnswerRecord, Cell, FORMAT, ForwardTiming, ModelRecord, PromptRecord, SweepResult, Timing, TopToken,
};
use crate::error::{Error, Result};
use crate::model::fastmath;
use crate::model::transformer::{logits_rows, top_k};
use crate::model::{Cone, Hooks, LayerKv, Model, Site, Span};

/// How many next-token candidates are kept per run.
pub const DEFAULT_TOP_K: usize = 10;
/// Naive schedule: cells per forward. 1 = one forward per cell, as a notebook loop runs them.
pub const DEFAULT_BATCH_CELLS: usize = 1;
/// Fast schedule: the first block of cells costs about this fraction of the whole sweep, so cells
/// reach the UI early (SmolLM2 IOI: the next-to-last layer's 7 cells, mostly unembeddings; the
/// last layer's come with the baselines).
const FAST_FIRST_BLOCK_FRACTION: f64 = 1.0 / 400.0;
/// Fast schedule: each later block may cost this many times the one before. Fewer, larger forwards
/// keep the matmuls efficient; more, smaller ones fill the heatmap more smoothly (SmolLM2 IOI:
/// blocks of 7, 14, 42 and 140 cells after the last layer's 7).
const FAST_BLOCK_GROWTH: usize = 6;
/// Fast schedule: a block with this many packed token rows runs its matmuls about as efficiently
/// as any larger one (SmolLM2 on 2 CPU cores: ~11,000–12,000 token-layers/s from a few hundred
/// rows on, whether 500 or 15,000).
const FAST_EFFICIENT_ROWS: usize = 1024;
/// Fast schedule: a block that is efficient ([`FAST_EFFICIENT_ROWS`]) ends at the first layer
/// boundary after it costs this share of the sweep, however large the growth would let it be: a
/// long prompt's heatmap then fills in steady steps (a 43-token sweep on SmolLM2: blocks of
/// 3–7 s, where one 682-cell block ran 23 s before), at no cost in speed.
const FAST_MAX_BLOCK_SHARE: f64 = 1.0 / 8.0;
/// Fast schedule: at most this many bytes of f32 logits per block (bounds memory on big
/// vocabularies: 220 cells of Qwen3's 151,936 logits).
const FAST_MAX_BLOCK_LOGIT_BYTES: usize = 128 << 20;
/// Fast schedule: at most about this many bytes of one layer's activations per block (bounds
/// memory on long prompts, whose cones are long: SmolLM2 in f32 on the CPU packs at most
/// ~16k token rows, Qwen3-0.6B ~7k, far more than a matmul needs to run efficiently).
const FAST_MAX_BLOCK_ACTIVATION_BYTES: usize = 512 << 20;

/// A cell: (layer, position).
type CellAt = (usize, usize);

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

/// A sweep given as token ids rather than text (models without a tokenizer, synthetic benchmarks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSweepRequest {
    pub clean_ids: Vec<u32>,
    pub corrupted_ids: Vec<u32>,
    pub correct_id: u32,
    pub incorrect_id: u32,
    pub component: Component,
}

/// How cells are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Only each patch's causal cone (later layers, later positions), many cells per packed forward,
    /// late-position cells first so every layer row fills early.
    #[default]
    Fast,
    /// One full forward of the corrupted prompt per cell (`batch_cells` rows per forward), as
    /// notebooks do: the baseline.
    Naive,
}

impl Schedule {
    /// Every schedule.
    pub const ALL: [Schedule; 2] = [Schedule::Fast, Schedule::Naive];

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Fast => "fast",
            Schedule::Naive => "naive",
        }
    }

    /// Parses a schedule name.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "fast" => Ok(Schedule::Fast),
            "naive" => Ok(Schedule::Naive),
            other => Err(Error::Input(format!("unknown schedule '{other}': use fast or naive"))),
        }
    }
}

/// Knobs of a sweep run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepOptions {
    pub schedule: Schedule,
    /// Next-token candidates kept per cell.
    pub top_k: usize,
    /// Naive schedule only: cells per batched forward (the fast schedule sizes its own blocks).
    pub batch_cells: usize,
    /// Naive schedule only: fill the no-op cells (positions before the first differing token) as
    /// exact zeros, as the fast schedule does. `false` runs a forward for them too, as a notebook
    /// loop does (the benchmark's baseline); their values then come out as ~0 rather than exactly 0.
    pub skip_noops: bool,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            schedule: Schedule::default(),
            top_k: DEFAULT_TOP_K,
            batch_cells: DEFAULT_BATCH_CELLS,
            skip_noops: true,
        }
    }
}

/// A prepared sweep: inputs validated, baselines run, clean activations cached.
pub struct Sweep<'m> {
    model: &'m Model,
    result: SweepResult,
    /// The clean run's activation at the swept site, per layer, `[1, seq, hidden]`.
    clean_acts: Vec<Tensor>,
    /// The corrupted run's residual stream, `[seq, hidden]`: resid_pre of every layer, then the
    /// last layer's resid_post (where a cone that starts after the last layer begins).
    corrupted_stream: Vec<Tensor>,
    /// The corrupted run's resid_mid per layer, `[seq, hidden]`.
    corrupted_mid: Vec<Tensor>,
    /// The corrupted run's keys/values per layer, `[1, kv_heads, seq, head_dim]`.
    corrupted_kv: Vec<LayerKv>,
    /// First position where the prompts' tokens differ (`seq` when they are identical).
    first_diff: usize,
    /// The last layer's cells, computed with the baselines (every component but resid_pre): the
    /// logits of the patch at the last position, and the corrupted run's, which every patch at an
    /// earlier position leaves unchanged there.
    last_layer_logits: Option<(Vec<f32>, Vec<f32>)>,
    baseline_seconds: f64,
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
    let sum = sum_exp(logits, max);
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

/// The residual stream a cone starts from (see [`Sweep::cone_start_layer`]) when `component` at
/// `layer` is patched with `clean` (rows of the clean run's activation); `pre` and `mid` are the
/// corrupted run's resid_pre and resid_mid at the same positions.
fn patched_stream(
    model: &Model,
    component: Component,
    layer: usize,
    clean: Tensor,
    pre: Tensor,
    mid: Tensor,
) -> Result<Tensor> {
    Ok(match component {
        Component::ResidPre | Component::ResidPost => clean,
        // resid_post = resid_mid + mlp_out.
        Component::MlpOut => (mid + clean)?,
        // resid_mid = resid_pre + attn_out; the layer's MLP then runs on it.
        Component::AttnOut => model.transformer.mlp_residual(layer, &(pre + clean)?)?,
    })
}

/// How [`run_blocks`] ended.
struct BlockRun {
    /// `cancel` was set before every block had run.
    cancelled: bool,
    /// The error that stopped the run; the blocks before it were delivered.
    error: Option<Error>,
    /// The most cells per forward once the device had run out of memory on larger blocks.
    split_to: Option<usize>,
}

/// Runs `blocks` in order through `step`, which computes a block and delivers its cells, checking
/// `cancel` before each. A block the device has no memory for is split in halves and retried, and
/// no later block is larger than those halves; any other error, or running out of memory on a
/// single cell, stops the run, keeping what was delivered.
fn run_blocks(
    blocks: Vec<Vec<CellAt>>,
    cancel: &AtomicBool,
    step: &mut dyn FnMut(&[CellAt]) -> Result<()>,
) -> BlockRun {
    let mut queue: VecDeque<Vec<CellAt>> = blocks.into();
    let mut run = BlockRun {
        cancelled: false,
        error: None,
        split_to: None,
    };
    let split = |queue: &mut VecDeque<Vec<CellAt>>, block: &[CellAt], most: usize| {
        for part in block.chunks(most).rev() {
            queue.push_front(part.to_vec());
        }
    };
    while let Some(block) = queue.pop_front() {
        if cancel.load(Ordering::Relaxed) {
            run.cancelled = true;
            break;
        }
        if let Some(most) = run.split_to.filter(|&most| block.len() > most) {
            split(&mut queue, &block, most);
            continue;
        }
        match step(&block) {
            Ok(()) => {}
            // `step` saw `cancel` mid-block: the block's cells are dropped, the earlier ones kept.
            Err(Error::Cancelled(_)) => {
                run.cancelled = true;
                break;
            }
            Err(e) if e.is_out_of_memory() && block.len() > 1 => {
                let half = block.len().div_ceil(2);
                run.split_to = Some(half);
                split(&mut queue, &block, half);
            }
            Err(e) => {
                run.error = Some(e);
                break;
            }
        }
    }
    run
}

/// Runs `attempt`, passing the rows it reports layer by layer on as work; if it fails, takes that
/// work back, as a block that ran out of memory is retried in halves that report it again.
fn reporting_attempt<T>(
    observe: &mut dyn FnMut(SweepEvent<'_>),
    attempt: impl FnOnce(&mut dyn FnMut(usize)) -> Result<T>,
) -> Result<T> {
    let mut reported = 0;
    let out = attempt(&mut |rows| {
        reported += rows;
        observe(SweepEvent::Work(rows as f64));
    });
    if out.is_err() && reported > 0 {
        observe(SweepEvent::Work(-(reported as f64)));
    }
    out
}

/// Groups `cells` (in schedule order) into blocks, one packed forward each: the first costs about
/// [`FAST_FIRST_BLOCK_FRACTION`] of the total `cost`, each later one up to [`FAST_BLOCK_GROWTH`]
/// times the one before, but no more than [`FAST_MAX_BLOCK_SHARE`] of the total once it has
/// [`FAST_EFFICIENT_ROWS`] rows; a block ends where the layer changes, and a remainder cheaper
/// than the block just filled joins it. Whatever the costs, no block has more than `max_cells`
/// cells or more than `max_rows` packed token `rows` (but one cell).
fn pack_blocks(
    cells: &[CellAt],
    cost: &dyn Fn(&CellAt) -> usize,
    rows: &dyn Fn(&CellAt) -> usize,
    max_cells: usize,
    max_rows: usize,
) -> Vec<Vec<CellAt>> {
    let mut remaining: usize = cells.iter().map(cost).sum();
    let mut budget = ((remaining as f64 * FAST_FIRST_BLOCK_FRACTION) as usize).max(1);
    let share = ((remaining as f64 * FAST_MAX_BLOCK_SHARE) as usize).max(1);
    let mut blocks = Vec::new();
    let mut block: Vec<CellAt> = Vec::new();
    let (mut spent, mut packed) = (0, 0);
    for (i, cell) in cells.iter().enumerate() {
        spent += cost(cell);
        remaining -= cost(cell);
        packed += rows(cell);
        block.push(*cell);
        let next = cells.get(i + 1);
        let layer_ends = next.is_none_or(|next| next.0 != cell.0);
        let full = block.len() >= max_cells || next.is_some_and(|next| packed + rows(next) > max_rows);
        let enough = spent >= budget || (packed >= FAST_EFFICIENT_ROWS && spent >= share);
        if full || (layer_ends && enough && remaining >= spent.min(budget)) {
            blocks.push(std::mem::take(&mut block));
            (spent, packed) = (0, 0);
            budget = budget.saturating_mul(FAST_BLOCK_GROWTH);
        }
    }
    if !block.is_empty() {
        blocks.push(block);
    }
    blocks
}

/// What [`Sweep::run_observed`] reports as a sweep goes.
#[derive(Debug)]
pub enum SweepEvent<'a> {
    /// A cell is done.
    Cell(&'a Cell),
    /// More work is done, in the units of [`Sweep::progress`] (token-layers); negative when a
    /// block that failed and will be retried takes back what it had reported.
    Work(f64),
}

/// How far a running sweep has got by the work done rather than the cells, and when it should end:
/// the fast schedule sends the no-op cells and the late layers' short cones first and then runs
/// the early layers' long ones in a few large blocks, so counting cells promises an end far too
/// early, and the cells of a large block arrive together at its end. Made by [`Sweep::progress`]
/// and fed [`SweepEvent::Work`], which comes layer by layer within a block.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    total: f64,
    done: f64,
    /// (seconds since the start, work done by then) over the last [`PROGRESS_RATE_WINDOW`] seconds
    /// and one sample before them: the ETA's rate is the recent one, as blocks differ in
    /// efficiency.
    samples: VecDeque<(f64, f64)>,
}

/// Seconds of recent progress the ETA's rate is measured over.
pub const PROGRESS_RATE_WINDOW: f64 = 5.0;

impl Progress {
    /// Progress towards `total` work (any unit), none done yet, at 0 seconds.
    pub fn new(total: f64) -> Self {
        Self {
            total,
            done: 0.0,
            samples: VecDeque::from([(0.0, 0.0)]),
        }
    }

    /// Counts `work` more done, `elapsed` seconds after the start.
    pub fn work_done(&mut self, work: f64, elapsed: f64) {
        self.done += work;
        self.samples.push_back((elapsed, self.done));
        while self.samples.len() > 2 && self.samples[1].0 <= elapsed - PROGRESS_RATE_WINDOW {
            self.samples.pop_front();
        }
    }

    /// The work there is to do.
    pub fn total(&self) -> f64 {
        self.total
    }

    /// The work done so far.
    pub fn done(&self) -> f64 {
        self.done
    }

    /// The share of the work done, 0 to 1 (1 when there is nothing to compute).
    pub fn fraction(&self) -> f64 {
        if self.total > 0.0 {
            (self.done / self.total).min(1.0)
        } else {
            1.0
        }
    }

    /// Seconds left at `elapsed` seconds after the start, at the rate of the last few seconds up
    /// to now (so a stall lengthens it); `None` before any work is done.
    pub fn eta(&self, elapsed: f64) -> Option<f64> {
        let &(since, done_then) = self.samples.front()?;
        let rate = (self.done - done_then) / (elapsed - since);
        let eta = (self.total - self.done).max(0.0) / rate;
        (rate > 0.0 && eta.is_finite()).then_some(eta)
    }
}

/// Σ exp(l − max) over `logits` (all ≤ `max`), the softmax denominator of every cell's top-k.
///
/// libm's `expf` one value at a time cost ~0.37 ms per cell on SmolLM2's 49k vocabulary; the
/// branch-free [`fastmath::exp`], which the compiler vectorizes, takes ~0.08 ms.
fn sum_exp(logits: &[f32], max: f32) -> f64 {
    // The exponentials of a chunk first, a plain map the compiler vectorizes; then eight running
    // sums, so the additions (which it may not reorder) vectorize too. Each lane adds at most 32
    // terms ≤ 1 in f32 before they are folded into the f64 total.
    let mut total = 0f64;
    let mut terms = [0f32; 256];
    for chunk in logits.chunks(terms.len()) {
        let terms = &mut terms[..chunk.len()];
        for (t, &l) in terms.iter_mut().zip(chunk) {
            *t = fastmath::exp(l - max);
        }
        let groups = terms.chunks_exact(8);
        let rest: f64 = groups.remainder().iter().map(|&t| f64::from(t)).sum();
        let mut lanes = [0f32; 8];
        for group in groups {
            for (lane, &t) in lanes.iter_mut().zip(group) {
                *lane += t;
            }
        }
        total += lanes.iter().map(|&s| f64::from(s)).sum::<f64>() + rest;
    }
    total
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
        Self::from_records(
            model,
            start,
            [clean, corrupted],
            [correct, incorrect],
            request.component,
            top_k,
        )
    }

    /// Like [`Sweep::prepare`], for prompts and answers given as token ids.
    pub fn prepare_tokens(model: &'m Model, request: &TokenSweepRequest, top_k: usize) -> Result<Self> {
        let start = Instant::now();
        let vocab = model.config.vocab_size;
        let max = model.config.max_position_embeddings;
        let prompt = |which: &str, ids: &[u32]| -> Result<PromptRecord> {
            if ids.is_empty() || ids.len() > max {
                return Err(Error::Input(format!(
                    "the {which} prompt has {} tokens; give 1 to {max}",
                    ids.len()
                )));
            }
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::Input(format!(
                    "the {which} prompt has token id {bad}; the vocabulary has {vocab}"
                )));
            }
            let tokens = model.tokenizer.token_texts(ids);
            Ok(PromptRecord {
                text: tokens.concat(),
                token_ids: ids.to_vec(),
                tokens,
            })
        };
        let answer = |which: &str, id: u32| -> Result<AnswerRecord> {
            if id as usize >= vocab {
                return Err(Error::Input(format!(
                    "the {which} answer is token id {id}; the vocabulary has {vocab}"
                )));
            }
            let token = model.tokenizer.token_text(id);
            Ok(AnswerRecord {
                text: token.clone(),
                token_id: id,
                token,
            })
        };
        let clean = prompt("clean", &request.clean_ids)?;
        let corrupted = prompt("corrupted", &request.corrupted_ids)?;
        if clean.token_ids.len() != corrupted.token_ids.len() {
            return Err(Error::Input(format!(
                "the prompts have different lengths (clean {}, corrupted {} tokens); they must be equally long",
                clean.token_ids.len(),
                corrupted.token_ids.len()
            )));
        }
        let correct = answer("correct", request.correct_id)?;
        let incorrect = answer("incorrect", request.incorrect_id)?;
        Self::from_records(
            model,
            start,
            [clean, corrupted],
            [correct, incorrect],
            request.component,
            top_k,
        )
    }

    /// Runs the baselines for validated, equally long prompts and caches what both schedules need.
    fn from_records(
        model: &'m Model,
        start: Instant,
        [clean, corrupted]: [PromptRecord; 2],
        [correct, incorrect]: [AnswerRecord; 2],
        component: Component,
        top_k: usize,
    ) -> Result<Self> {
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
        let site = component.site();
        let layers = model.config.num_layers;
        // Both baselines in one packed forward (row 0 clean, row 1 corrupted) that computes the
        // tokens before the first difference once; the corrupted row also keeps what the fast
        // schedule starts cones from.
        let mut sites = vec![site, Site::ResidPre, Site::ResidMid, Site::ResidPost];
        sites.sort();
        sites.dedup();
        let baselines = t.forward_shared_prefix(&[&clean.token_ids, &corrupted.token_ids], first_diff, &sites)?;
        let act = |site: Site, l: usize| {
            baselines
                .acts
                .get(&(site, l))
                .cloned()
                .ok_or_else(|| Error::Input(format!("internal: no {site:?} activation captured at layer {l}")))
        };
        let clean_acts = (0..layers)
            .map(|l| Ok(act(site, l)?.narrow(0, 0, 1)?))
            .collect::<Result<Vec<_>>>()?;
        let mut corrupted_stream = (0..layers)
            .map(|l| Ok(act(Site::ResidPre, l)?.get(1)?))
            .collect::<Result<Vec<_>>>()?;
        corrupted_stream.push(act(Site::ResidPost, layers - 1)?.get(1)?);
        let corrupted_mid = (0..layers)
            .map(|l| Ok(act(Site::ResidMid, l)?.get(1)?))
            .collect::<Result<Vec<_>>>()?;
        let corrupted_kv = baselines
            .kv
            .iter()
            .map(|kv| {
                Ok(LayerKv {
                    k: kv.k.narrow(0, 1, 1)?,
                    v: kv.v.narrow(0, 1, 1)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;

        // The last layer's cells (every component but resid_pre) run no layer at all: the patched
        // residual stream at the last position goes straight to the final norm and unembedding:
        // the clean-patched row for the patch at the last position, the corrupted run's own for
        // the others. They share the baselines' pass over the unembedding, so the first cells are
        // ready with the baselines.
        let last = layers - 1;
        let has_ready = component != Component::ResidPre && first_diff < seq;
        let mut finals = vec![baselines.last_hidden.clone()];
        if has_ready {
            let at_last = |t: &Tensor| t.narrow(0, seq - 1, 1);
            finals.push(patched_stream(
                model,
                component,
                last,
                at_last(&clean_acts[last].squeeze(0)?)?,
                at_last(&corrupted_stream[last])?,
                at_last(&corrupted_mid[last])?,
            )?);
        }
        let mut logits = logits_rows(&t.final_logits(&Tensor::cat(&finals, 0)?)?)?.into_iter();
        let (Some(clean_logits), Some(corrupted_logits)) = (logits.next(), logits.next()) else {
            return Err(Error::Input("internal: the baselines did not return two rows".into()));
        };
        let last_layer_logits = logits.next().map(|patched| (patched, corrupted_logits.clone()));

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
            component,
            metric: "normalized_logit_diff".to_owned(),
            metric_definition: "(LD_patched - LD_corrupted) / (LD_clean - LD_corrupted), \
                LD = logit[correct] - logit[incorrect] at the last position"
                .to_owned(),
            clean_answer_logits: [
                clean_logits[correct.token_id as usize],
                clean_logits[incorrect.token_id as usize],
            ],
            corrupted_answer_logits: [
                corrupted_logits[correct.token_id as usize],
                corrupted_logits[incorrect.token_id as usize],
            ],
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
            answer_logits: vec![vec![None; seq]; layers],
            complete: false,
            error: None,
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
            corrupted_stream,
            corrupted_mid,
            corrupted_kv,
            first_diff,
            last_layer_logits,
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
    /// and returns what it has, with `complete == false`: within a layer of the fast schedule's
    /// block in flight (whose cells are dropped), after the forward in flight of the naive one. The
    /// no-op cells and those computed with the baselines are reported first, whatever `cancel` says.
    ///
    /// An error while computing cells does not lose the ones already computed: the sweep returns
    /// them with `complete == false` and the error in `error`. When the GPU runs out of memory the
    /// block in flight is first split and retried (see [`run_blocks`]).
    pub fn run(
        self,
        options: &SweepOptions,
        cancel: &AtomicBool,
        on_cell: &mut dyn FnMut(&Cell),
    ) -> Result<SweepResult> {
        self.run_observed(options, cancel, &mut |event| {
            if let SweepEvent::Cell(cell) = event {
                on_cell(cell);
            }
        })
    }

    /// [`Sweep::run`], reporting the work done as it goes too ([`SweepEvent::Work`]: within a
    /// block of the fast schedule, after each layer), for a [`Progress`] from [`Sweep::progress`].
    pub fn run_observed(
        mut self,
        options: &SweepOptions,
        cancel: &AtomicBool,
        observe: &mut dyn FnMut(SweepEvent<'_>),
    ) -> Result<SweepResult> {
        let start = Instant::now();
        let (layers, seq) = (self.result.layers(), self.result.positions());
        let clean_ld = self.result.clean_logit_diff;
        let corrupted_ld = self.result.corrupted_logit_diff;

        // Positions before the first difference: the clean and corrupted activations are identical
        // there (causal attention), so patching changes nothing.
        let skip_noops = options.schedule == Schedule::Fast || options.skip_noops;
        let first_run = if skip_noops { self.first_diff.min(seq) } else { 0 };
        let corrupted_top = self.result.corrupted_top_k.clone();
        for layer in 0..layers {
            for position in 0..first_run {
                let cell = Cell {
                    layer,
                    position,
                    patched_logit_diff: corrupted_ld,
                    value: normalized(corrupted_ld, clean_ld, corrupted_ld),
                    skipped: true,
                    top_k: corrupted_top.clone(),
                    answer_logits: self.result.corrupted_answer_logits,
                };
                self.emit(cell, observe);
            }
        }

        let mut cells: Vec<(usize, usize)> = (0..layers)
            .flat_map(|l| (first_run..seq).map(move |p| (l, p)))
            .collect();
        if let Some((patched, corrupted)) = self
            .last_layer_logits
            .take()
            .filter(|_| options.schedule == Schedule::Fast)
        {
            // The last layer's cells, computed with the baselines: one cell for the patch at the
            // last position, the corrupted run's logits (one top-k, shared) for the others.
            let last = layers - 1;
            cells.retain(|&(l, _)| l != last);
            let mut made = self
                .block_cells(
                    &[(last, seq - 1), (last, first_run)],
                    vec![patched, corrupted],
                    options.top_k,
                )
                .into_iter();
            if let (Some(at_last), Some(earlier)) = (made.next(), made.next()) {
                for position in first_run..seq - 1 {
                    self.emit(
                        Cell {
                            position,
                            ..earlier.clone()
                        },
                        observe,
                    );
                }
                self.emit(at_last, observe);
            }
        }
        let blocks: Vec<Vec<(usize, usize)>> = match options.schedule {
            Schedule::Fast => self.fast_blocks(cells),
            Schedule::Naive => cells
                .chunks(options.batch_cells.max(1))
                .map(<[(usize, usize)]>::to_vec)
                .collect(),
        };
        // The patched residual stream the fast schedule's cones start from.
        let starts = match options.schedule {
            Schedule::Fast if !blocks.is_empty() => self.cone_starts(),
            _ => Ok(Vec::new()),
        };
        let run = match starts {
            Ok(starts) => run_blocks(blocks, cancel, &mut |block| {
                let forward_start = Instant::now();
                let logits = match options.schedule {
                    Schedule::Fast => {
                        reporting_attempt(observe, |on_layer| self.fast_block(block, &starts, cancel, on_layer))?
                    }
                    Schedule::Naive => self.naive_batch(block)?,
                };
                let cells_start = Instant::now();
                for cell in self.block_cells(block, logits, options.top_k) {
                    self.emit(cell, observe);
                }
                let token_layers = block
                    .iter()
                    .map(|&(l, p)| self.token_layers(options.schedule, l, p))
                    .sum();
                // The rest of the cells' predicted cost: their unembeddings, and for the naive
                // schedule (which reports no layers) the whole forward.
                let cost: usize = block.iter().map(|&(l, p)| self.cell_cost(options.schedule, l, p)).sum();
                let reported = if options.schedule == Schedule::Fast {
                    token_layers
                } else {
                    0
                };
                observe(SweepEvent::Work(cost.saturating_sub(reported) as f64));
                self.result.timing.forwards.push(ForwardTiming {
                    cells: block.len(),
                    token_layers,
                    forward_seconds: (cells_start - forward_start).as_secs_f64(),
                    cells_seconds: cells_start.elapsed().as_secs_f64(),
                });
                Ok(())
            }),
            Err(e) => BlockRun {
                cancelled: false,
                error: Some(e),
                split_to: None,
            },
        };
        if let Some(most) = run.split_to {
            self.result.warnings.push(format!(
                "the GPU ran out of memory on the larger blocks of cells; the sweep went on with at most \
                 {most} cells per forward"
            ));
        }
        self.result.complete = !run.cancelled && run.error.is_none();
        self.result.error = run.error.map(|e| e.to_string());
        self.result.timing.schedule = options.schedule.name().to_owned();
        self.result.timing.baseline_seconds = self.baseline_seconds;
        self.result.timing.sweep_seconds = self.baseline_seconds + start.elapsed().as_secs_f64();
        Ok(self.result)
    }

    /// Reports a finished cell and files it in the result.
    fn emit(&mut self, cell: Cell, observe: &mut dyn FnMut(SweepEvent<'_>)) {
        observe(SweepEvent::Cell(&cell));
        if cell.skipped {
            self.result.timing.cells_skipped += 1;
        } else {
            self.result.timing.cells_computed += 1;
        }
        self.result.insert(cell);
    }

    /// The finished cells of one block from its logits rows, in block order. Spread over the cores:
    /// a softmax and top-k over a large vocabulary per cell is not free.
    fn block_cells(&self, block: &[(usize, usize)], logits: Vec<Vec<f32>>, top_k: usize) -> Vec<Cell> {
        let (clean_ld, corrupted_ld) = (self.result.clean_logit_diff, self.result.corrupted_logit_diff);
        let (correct, incorrect) = (self.result.correct.token_id, self.result.incorrect.token_id);
        let model = self.model;
        let cell = |&(layer, position): &(usize, usize), row: &Vec<f32>| {
            let patched = logit_diff(row, correct, incorrect);
            Cell {
                layer,
                position,
                patched_logit_diff: patched,
                value: normalized(patched, clean_ld, corrupted_ld),
                skipped: false,
                top_k: top_tokens(model, row, top_k),
                answer_logits: [row[correct as usize], row[incorrect as usize]],
            }
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if threads == 1 || block.len() <= 1 {
            return block.iter().zip(&logits).map(|(c, r)| cell(c, r)).collect();
        }
        let per_thread = block.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = block
                .chunks(per_thread)
                .zip(logits.chunks(per_thread))
                .map(|(cells, rows)| {
                    scope.spawn(move || cells.iter().zip(rows).map(|(c, r)| cell(c, r)).collect::<Vec<Cell>>())
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect::<Vec<Cell>>()
        })
    }

    /// Orders the fast schedule's cells and groups them into blocks, one packed forward each.
    ///
    /// Late layers first: their cones are short, so the first block is cheap and reaches the UI
    /// quickly, and a block of consecutive layers shares every weight read from its first layer on.
    /// The first block costs about [`FAST_FIRST_BLOCK_FRACTION`] of the sweep and each later one up
    /// to [`FAST_BLOCK_GROWTH`] times the one before, so the bulk runs in a few large, efficient
    /// forwards ([`pack_blocks`]), within the memory bounds [`FAST_MAX_BLOCK_LOGIT_BYTES`] and
    /// [`FAST_MAX_BLOCK_ACTIVATION_BYTES`].
    fn fast_blocks(&self, mut cells: Vec<(usize, usize)>) -> Vec<Vec<(usize, usize)>> {
        let cfg = &self.model.config;
        let seq = self.result.positions();
        cells.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
        let cost = |&(l, p): &(usize, usize)| self.cell_cost(Schedule::Fast, l, p);
        let max_cells = (FAST_MAX_BLOCK_LOGIT_BYTES / (4 * cfg.vocab_size.max(1))).max(1);
        // A packed token row's activations in one layer: the residual stream and its copies (norm,
        // attention output, resid_mid, MLP output), queries, keys and values, and the MLP's gate,
        // up and product. Off the CPU's f32 path, attention is batched tensors too: a row's scores
        // over every key slot per head (in the dtype, an f32 copy and the probabilities), cones
        // padded to the longest (up to twice the rows).
        let t = &self.model.transformer;
        let tensor_attention = !(t.device().is_cpu() && t.dtype() == DType::F32);
        let attention_bytes = if tensor_attention {
            2 * cfg.num_heads * seq * 12
        } else {
            0
        };
        let row_bytes = 4
            * (5 * cfg.hidden_size + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + 3 * cfg.intermediate_size)
            + attention_bytes;
        let max_rows = (FAST_MAX_BLOCK_ACTIVATION_BYTES / row_bytes.max(1)).max(seq);
        let rows = |&(_, p): &CellAt| seq - p;
        pack_blocks(&cells, &cost, &rows, max_cells, max_rows)
    }

    /// The predicted cost of computing the cell at (`layer`, `position`), in token-layers: its
    /// [`Sweep::token_layers`] plus the unembedding of its last row, counted as the token-layers
    /// with as many weights.
    fn cell_cost(&self, schedule: Schedule, layer: usize, position: usize) -> usize {
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

    /// The work of the cell at (`layer`, `position`) in token-layers: every layer on every token
    /// for the naive schedule; for the fast one, its cone's layers on the positions from `position`.
    fn token_layers(&self, schedule: Schedule, layer: usize, position: usize) -> usize {
        let (layers, seq) = (self.result.layers(), self.result.positions());
        match schedule {
            Schedule::Naive => layers * seq,
            Schedule::Fast => (layers - self.cone_start_layer(layer)) * (seq - position),
        }
    }

    /// The layer whose resid_pre a cone for a patch at `layer` starts from: the patched layer itself
    /// for resid_pre; the next one for resid_post, attn_out and mlp_out, whose patched resid_post is
    /// computed directly (nothing else in the layer changes at the patched position).
    fn cone_start_layer(&self, layer: usize) -> usize {
        match self.result.component {
            Component::ResidPre => layer,
            Component::ResidPost | Component::AttnOut | Component::MlpOut => layer + 1,
        }
    }

    /// Per patched layer: the patched residual stream a cone starts from, `[seq - first_diff, hidden]`,
    /// row i for a patch at position `first_diff + i`.
    fn cone_starts(&self) -> Result<Vec<Tensor>> {
        let seq = self.result.positions();
        let (from, len) = (self.first_diff, seq - self.first_diff);
        (0..self.result.layers())
            .map(|l| {
                patched_stream(
                    self.model,
                    self.result.component,
                    l,
                    self.clean_acts[l].squeeze(0)?.narrow(0, from, len)?,
                    self.corrupted_stream[l].narrow(0, from, len)?,
                    self.corrupted_mid[l].narrow(0, from, len)?,
                )
            })
            .collect()
    }

    /// The fast schedule: one packed forward of the causal cones of `block`'s cells.
    fn fast_block(
        &self,
        block: &[(usize, usize)],
        starts: &[Tensor],
        cancel: &AtomicBool,
        on_layer: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let seq = self.result.positions();
        let cones = block
            .iter()
            .map(|&(layer, position)| {
                let start_layer = self.cone_start_layer(layer);
                let patched = starts[layer].narrow(0, position - self.first_diff, 1)?;
                let hidden = if position + 1 < seq {
                    let rest = self.corrupted_stream[start_layer].narrow(0, position + 1, seq - position - 1)?;
                    Tensor::cat(&[&patched, &rest], 0)?
                } else {
                    patched
                };
                Ok(Cone {
                    start_layer,
                    offset: position,
                    hidden,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let logits = self
            .model
            .transformer
            .forward_cones(&cones, &self.corrupted_kv, cancel, on_layer)?;
        logits_rows(&logits)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(sizes: &[usize]) -> Vec<Vec<(usize, usize)>> {
        let mut next = 0;
        sizes
            .iter()
            .map(|&n| {
                let block = (next..next + n).map(|i| (i / 10, i % 10)).collect();
                next += n;
                block
            })
            .collect()
    }

    fn out_of_memory() -> Error {
        // What cudarc's allocator failure looks like through candle.
        Error::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ))
    }

    #[test]
    fn blocks_grow_end_at_layer_boundaries_and_keep_within_their_bounds() {
        // SmolLM2 IOI resid_post as the fast schedule orders it: layers 28..0 (the last layer's
        // cells come with the baselines) × positions 15..9, each cell costing its cone (the layers
        // after it × its tokens) and the unembedding of a row (8 token-layers).
        let cells: Vec<CellAt> = (0..29).rev().flat_map(|l| (9..16).rev().map(move |p| (l, p))).collect();
        let cost = |&(l, p): &CellAt| (29 - l) * (16 - p) + 8;
        let rows = |&(_, p): &CellAt| 16 - p;
        let check = |blocks: &[Vec<CellAt>], max_cells: usize, max_rows: usize| {
            assert_eq!(blocks.concat(), cells, "every cell once, in order");
            for b in blocks {
                assert!(!b.is_empty() && b.len() <= max_cells);
                assert!(b.len() == 1 || b.iter().map(rows).sum::<usize>() <= max_rows, "{b:?}");
            }
        };
        let free = pack_blocks(&cells, &cost, &rows, usize::MAX, usize::MAX);
        check(&free, usize::MAX, usize::MAX);
        let sizes: Vec<usize> = free.iter().map(Vec::len).collect();
        assert_eq!(sizes, [7, 14, 42, 140]);
        // Bounded: no block over 20 cells or 60 rows, though the budget would allow more.
        let bounded = pack_blocks(&cells, &cost, &rows, 20, 60);
        check(&bounded, 20, 60);
        assert!(bounded.len() > free.len());
        // A cell larger than the row bound still runs, alone.
        let alone = pack_blocks(&cells, &cost, &rows, usize::MAX, 3);
        check(&alone, usize::MAX, 3);
        assert!(alone.iter().any(|b| b == &[(28, 9)]));
    }

    #[test]
    fn long_prompts_blocks_stop_growing_once_efficient() {
        // 43 tokens differing at the first: every cell is computed, and the cones are long.
        let (layers, seq) = (30, 43);
        let cells: Vec<CellAt> = (0..layers - 1)
            .rev()
            .flat_map(|l| (0..seq).rev().map(move |p| (l, p)))
            .collect();
        let cost = |&(l, p): &CellAt| (layers - 1 - l) * (seq - p) + 8;
        let rows = |&(_, p): &CellAt| seq - p;
        let total: usize = cells.iter().map(cost).sum();
        let blocks = pack_blocks(&cells, &cost, &rows, usize::MAX, usize::MAX);
        assert_eq!(blocks.concat(), cells, "every cell once, in order");
        let costs: Vec<usize> = blocks.iter().map(|b| b.iter().map(cost).sum()).collect();
        // The first blocks grow as usual; no block, the last (which takes a small remainder) aside,
        // costs much more than the share plus one layer's cells.
        assert!(costs[0] < costs[1] && costs[1] < costs[2], "{costs:?}");
        let layer_cost = (layers - 1) * rows(&(0, 0)) * seq;
        let share = (total as f64 * FAST_MAX_BLOCK_SHARE) as usize;
        for &c in &costs[..costs.len() - 1] {
            assert!(c < share + layer_cost, "{c} of {total}: {costs:?}");
        }
        assert!(*costs.last().unwrap() < 2 * (share + layer_cost), "{costs:?}");
        assert!(blocks.len() >= 7, "{costs:?}");
    }

    #[test]
    fn out_of_memory_splits_blocks_and_every_cell_still_arrives_in_order() {
        let all: Vec<_> = blocks(&[7, 14, 1]).concat();
        let mut delivered = Vec::new();
        let mut sizes = Vec::new();
        let run = run_blocks(blocks(&[7, 14, 1]), &AtomicBool::new(false), &mut |block| {
            if block.len() > 2 {
                return Err(out_of_memory());
            }
            sizes.push(block.len());
            delivered.extend_from_slice(block);
            Ok(())
        });
        assert!(!run.cancelled && run.error.is_none());
        assert_eq!(delivered, all);
        // 7 → 4 + 3 → (2 + 2) + (2 + 1); the 14 then runs as 2s without failing first.
        assert_eq!(run.split_to, Some(2));
        assert_eq!(sizes, [2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 2, 1]);
        assert!(out_of_memory().to_string().starts_with("the GPU ran out of memory"));
    }

    #[test]
    fn other_errors_and_a_single_cell_out_of_memory_stop_the_run_keeping_earlier_blocks() {
        for (failure, what) in [
            (Error::Input("broken".into()), "another error"),
            (out_of_memory(), "out of memory on one cell"),
        ] {
            let mut failure = Some(failure);
            let mut delivered = Vec::new();
            let run = run_blocks(blocks(&[1, 1, 1]), &AtomicBool::new(false), &mut |block| {
                if delivered.len() == 1 {
                    return Err(failure.take().expect("no retry after a stop"));
                }
                delivered.extend_from_slice(block);
                Ok(())
            });
            assert_eq!(delivered, [(0, 0)], "{what}");
            assert!(
                run.error.is_some() && !run.cancelled && run.split_to.is_none(),
                "{what}"
            );
        }
        let cancel = AtomicBool::new(true);
        let run = run_blocks(blocks(&[2]), &cancel, &mut |_| panic!("cancelled before it ran"));
        assert!(run.cancelled && run.error.is_none());
        // A cancel seen inside a block (forward_cones looks before each layer) is a cancel.
        let mut delivered = Vec::new();
        let run = run_blocks(blocks(&[1, 1, 1]), &AtomicBool::new(false), &mut |block| {
            if delivered.len() == 1 {
                return Err(Error::Cancelled("cancelled".into()));
            }
            delivered.extend_from_slice(block);
            Ok(())
        });
        assert!(run.cancelled && run.error.is_none() && delivered == [(0, 0)]);
    }

    #[test]
    fn a_failed_attempt_takes_back_the_work_it_reported() {
        let mut work = Vec::new();
        let mut observe = |e: SweepEvent<'_>| {
            if let SweepEvent::Work(w) = e {
                work.push(w);
            }
        };
        let failed: Result<()> = reporting_attempt(&mut observe, |on_layer| {
            on_layer(30);
            on_layer(50);
            Err(out_of_memory())
        });
        assert!(failed.is_err());
        let done: Result<u8> = reporting_attempt(&mut observe, |on_layer| {
            on_layer(40);
            Ok(7)
        });
        assert_eq!(done.unwrap(), 7);
        assert_eq!(work, [30.0, 50.0, -80.0, 40.0]);
    }

    #[test]
    fn progress_follows_the_work_and_its_recent_rate() {
        let mut p = Progress::new(100.0);
        assert_eq!((p.fraction(), p.eta(1.0)), (0.0, None));
        // 10 units a second for 3 s: 70 left, 7 s at that rate.
        for t in 1..=3 {
            p.work_done(10.0, t as f64);
        }
        assert!((p.fraction() - 0.3).abs() < 1e-12);
        assert!((p.eta(3.0).unwrap() - 7.0).abs() < 1e-9);
        // Then 40 units a second: after more than the window, only the recent rate counts.
        for t in 4..=9 {
            p.work_done(if t < 5 { 40.0 } else { 0.0 }, t as f64);
        }
        assert_eq!(p.done(), 70.0);
        // Nothing in the last five seconds (t = 5..9): no rate to go by.
        assert_eq!(p.eta(10.0), None);
        p.work_done(20.0, 10.0);
        // 20 units in the last 5 s (the sample at t = 5 is the window's start): 4/s, 10 left.
        assert!((p.eta(10.0).unwrap() - 2.5).abs() < 1e-9, "{:?}", p.eta(10.0));
        // A stall lengthens it: the same work over a longer time.
        assert!(p.eta(12.0).unwrap() > 2.5);
        p.work_done(15.0, 12.0);
        assert_eq!((p.fraction(), p.eta(12.0)), (1.0, Some(0.0)));
        assert_eq!(Progress::new(0.0).fraction(), 1.0);
    }

    #[test]
    fn the_fast_softmax_denominator_matches_f64_exp() {
        // Logits spread like a real vocabulary's, plus the edges: 0, the underflow clamp, −∞.
        let mut logits: Vec<f32> = (0..50_000u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) % 10_000) as f32 / 10_000.0 - 0.8) * 30.0)
            .collect();
        logits.extend([0.0, -86.9, -87.5, -200.0, f32::NEG_INFINITY]);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exact: f64 = logits.iter().map(|&l| (f64::from(l) - f64::from(max)).exp()).sum();
        let fast = sum_exp(&logits, max);
        assert!((fast - exact).abs() / exact < 1e-6, "{fast} vs {exact}");
    }
}
