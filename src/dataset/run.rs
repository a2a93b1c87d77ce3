//! Sweeping a dataset: pairs in groups, each group's cells packed into shared forwards
//! ([`run_together`]), streamed, with pairs that cannot run reported and the others kept.

use std::sync::atomic::{AtomicBool, Ordering};

use super::Dataset;
use super::result::{DatasetResult, PairResult};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::patching::together::run_together;
use crate::patching::{Cell, Component, Direction, Sweep, SweepEvent, SweepOptions, SweepRequest, SweepResult};

/// Pairs prepared and swept together, their cells sharing packed forwards: enough to fill large
/// blocks, few enough that their cached activations stay small.
const PAIRS_TOGETHER: usize = 16;

/// What to sweep over every pair of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetRequest {
    pub dataset: Dataset,
    pub component: Component,
    pub direction: Direction,
    pub by_position: bool,
    pub prepend_bos: bool,
}

/// What a dataset sweep reports as it goes.
pub enum DatasetEvent<'a> {
    /// Pair `index`'s baselines are done; its cells follow.
    PairStarted { index: usize, result: &'a SweepResult },
    /// One of pair `index`'s cells.
    Cell { index: usize, cell: &'a Cell },
    /// Work done within the pair, in the units of its progress.
    Work(f64),
    /// Pair `index` ended (complete, or partial after a cancel).
    PairFinished { index: usize, result: &'a SweepResult },
    /// Pair `index` could not run; the message says why.
    PairFailed { index: usize, error: &'a str },
}

impl DatasetRequest {
    /// The single-pair request of pair `index`.
    pub fn pair_request(&self, index: usize) -> Option<SweepRequest> {
        let p = self.dataset.pairs.get(index)?;
        Some(SweepRequest {
            clean: p.clean.clone(),
            corrupted: p.corrupted.clone(),
            correct: p.correct.clone(),
            incorrect: p.incorrect.clone(),
            component: self.component,
            direction: self.direction,
            by_position: self.by_position,
            prepend_bos: self.prepend_bos,
        })
    }
}

/// Sweeps every pair of `request` on `model` with `options`, [`PAIRS_TOGETHER`] at a time. A pair
/// that cannot run (answers of several tokens, a length unlike the others' where the dataset has
/// no named positions) is reported and skipped; a cancel stops within the forward in flight,
/// keeping every finished cell and pair.
pub fn run(
    model: &Model,
    request: &DatasetRequest,
    options: &SweepOptions,
    cancel: &AtomicBool,
    observe: &mut dyn FnMut(DatasetEvent<'_>),
) -> Result<DatasetResult> {
    let mut out = DatasetResult::new(request);
    let mut length: Option<usize> = None;
    let indices: Vec<usize> = (0..request.dataset.pairs.len()).collect();
    for group in indices.chunks(PAIRS_TOGETHER) {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        let (mut sweeps, mut swept) = (Vec::with_capacity(group.len()), Vec::with_capacity(group.len()));
        // The group's baselines in one packed forward.
        let requests = group
            .iter()
            .map(|&i| {
                request
                    .pair_request(i)
                    .ok_or_else(|| Error::Internal(format!("no pair {i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let prepared_group = Sweep::prepare_many(model, &requests, options.top_k);
        for (&index, prepared) in group.iter().zip(prepared_group) {
            let prepared = prepared.and_then(|sweep| {
                let seq = sweep.result().positions();
                if let Some(bad) = request.dataset.pairs[index].positions.iter().find(|&&p| p >= seq) {
                    return Err(Error::Input(format!(
                        "its named position at token {bad} is past its {seq} tokens"
                    )));
                }
                if request.dataset.named_positions().is_none() && *length.get_or_insert(seq) != seq {
                    return Err(Error::Input(format!(
                        "its prompts are {seq} tokens where the dataset's first are {}: pairs of different lengths \
                         need named positions (the built-in templates have them), so the cells line up",
                        length.unwrap_or(seq)
                    )));
                }
                Ok(sweep)
            });
            match prepared {
                Ok(sweep) => {
                    observe(DatasetEvent::PairStarted {
                        index,
                        result: sweep.result(),
                    });
                    sweeps.push(sweep);
                    swept.push(index);
                }
                Err(e) => {
                    let error = e.to_string();
                    observe(DatasetEvent::PairFailed { index, error: &error });
                    out.pairs[index].error = Some(error);
                }
            }
        }
        // The group's cells share packed forwards.
        let results = run_together(sweeps, options, cancel, &mut |k, event| {
            let index = swept[k];
            match event {
                SweepEvent::Cell(cell) => observe(DatasetEvent::Cell { index, cell }),
                SweepEvent::Work(w) => observe(DatasetEvent::Work(w)),
                SweepEvent::Estimated(_) | SweepEvent::Planned { .. } => {}
            }
        })?;
        for (k, result) in results.into_iter().enumerate() {
            observe(DatasetEvent::PairFinished {
                index: swept[k],
                result: &result,
            });
            out.pairs[swept[k]].set_result(result);
        }
    }
    out.complete = !cancel.load(Ordering::Relaxed)
        && out
            .pairs
            .iter()
            .all(|p| p.error.is_some() || p.result.as_ref().is_some_and(|r| r.complete));
    Ok(out)
}

impl PairResult {
    /// Files a finished sweep of this pair, flagging it where the model gets the clean prompt
    /// wrong or the prompts barely differ.
    pub fn set_result(&mut self, result: SweepResult) {
        self.flagged = super::result::flag(result.clean_logit_diff, result.corrupted_logit_diff);
        self.result = Some(result);
    }
}
