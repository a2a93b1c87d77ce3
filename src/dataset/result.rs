//! A dataset sweep's results: every pair's own result (the single-sweep schema) and the aggregate
//! over pairs (mean, standard deviation and count per cell, per metric), with the columns the
//! dataset names. [`DatasetResult::mean_view`] is the aggregate as a single-sweep result, so the
//! heatmap, the text heatmap, `.npy` and the figures draw it as they draw one pair.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::run::DatasetRequest;
use super::{Dropped, PromptPair};
use crate::patching::grid::Grid;
use crate::patching::layout::CellAt;
use crate::patching::metric::normalized;
use crate::patching::result::{AnswerRecord, PromptRecord};
use crate::patching::{Component, Direction, Layout, Metric, SweepResult};

/// Written in every dataset JSON; bumped when the layout changes.
pub const FORMAT: &str = "patchbay-dataset/1";

/// Pairs whose clean and corrupted logit differences are closer than this are flagged: their
/// normalized values divide by almost nothing.
pub const FLAG_MIN_GAP: f64 = 0.1;

/// Why a pair is flagged (None: it is not).
pub fn flag(clean_ld: f64, corrupted_ld: f64) -> Option<String> {
    if clean_ld <= 0.0 {
        Some(format!(
            "the model gets the clean prompt wrong (clean LD {clean_ld:+.3} ≤ 0)"
        ))
    } else if (clean_ld - corrupted_ld).abs() < FLAG_MIN_GAP {
        Some(format!(
            "clean and corrupted barely differ (gap {:.3} < {FLAG_MIN_GAP})",
            (clean_ld - corrupted_ld).abs()
        ))
    } else {
        None
    }
}

/// One pair of a dataset sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairResult {
    pub pair: PromptPair,
    /// Why the pair is flagged (the model gets its clean prompt wrong, or its prompts barely
    /// differ); flagged pairs can be left out of the aggregate.
    pub flagged: Option<String>,
    /// Why the pair could not run.
    pub error: Option<String>,
    /// Its sweep, in the single-pair schema.
    pub result: Option<SweepResult>,
}

/// Per metric, per aggregate cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Mean over the pairs included, by metric name.
    pub mean: BTreeMap<String, Grid<Option<f64>>>,
    /// Standard deviation (numpy's `nanstd`, ddof 0), by metric name.
    pub sd: BTreeMap<String, Grid<Option<f64>>>,
    /// Pairs with a value at each cell, by metric name.
    pub n: BTreeMap<String, Grid<usize>>,
    /// The normalized metric of the mean logit differences: (mean patched LD − mean corrupted LD)
    /// / (mean clean LD − mean corrupted LD), over the pairs with a value at the cell. Papers use
    /// both this and the mean of the normalized values.
    pub normalized_of_mean: Grid<Option<f64>>,
    /// Pairs the aggregate includes.
    pub pairs: usize,
}

/// A dataset sweep's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetResult {
    /// Always [`FORMAT`].
    pub format: String,
    /// The dataset's name ("ioi (n=32, seed 0)", a file's name).
    pub dataset: String,
    pub component: Component,
    pub direction: Direction,
    pub by_position: bool,
    pub prepend_bos: bool,
    /// The aggregate's columns when pairs' lengths differ (IO, S1, …); empty: token positions.
    pub position_names: Vec<String>,
    /// Leave flagged pairs out of the aggregate.
    pub exclude_flagged: bool,
    pub pairs: Vec<PairResult>,
    /// Pairs the dataset left out before the sweep, and why.
    pub dropped: Vec<Dropped>,
    /// Filled by [`DatasetResult::aggregate`].
    pub aggregate: Option<Aggregate>,
    /// Whether every pair ran to the end.
    pub complete: bool,
}

impl DatasetResult {
    /// An empty result for `request`, every pair still to run.
    pub fn new(request: &DatasetRequest) -> Self {
        Self {
            format: FORMAT.to_owned(),
            dataset: request.dataset.name.clone(),
            component: request.component,
            direction: request.direction,
            by_position: request.by_position,
            prepend_bos: request.prepend_bos,
            position_names: request.dataset.position_names.clone(),
            exclude_flagged: false,
            pairs: request
                .dataset
                .pairs
                .iter()
                .map(|p| PairResult {
                    pair: p.clone(),
                    flagged: None,
                    error: None,
                    result: None,
                })
                .collect(),
            dropped: request.dataset.dropped.clone(),
            aggregate: None,
            complete: false,
        }
    }

    /// The pairs that ran (some cells at least), as (index, result).
    pub fn swept(&self) -> impl Iterator<Item = (usize, &SweepResult)> {
        self.pairs
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.result.as_ref().map(|r| (i, r)))
    }

    /// The pairs the aggregate includes.
    fn included(&self) -> impl Iterator<Item = (usize, &SweepResult)> {
        self.swept()
            .filter(|(i, _)| !(self.exclude_flagged && self.pairs[*i].flagged.is_some()))
    }

    /// The aggregate's layout: the first swept pair's, its positions the named ones when the
    /// dataset names them. None before any pair ran.
    pub fn layout(&self) -> Option<Layout> {
        let (_, first) = self.swept().next()?;
        let mut layout = first.layout();
        if !self.position_names.is_empty() {
            layout.positions = self.position_names.len();
        }
        Some(layout)
    }

    /// Pair `index`'s flat cell index for the aggregate's cell `at` (its own token index for a
    /// named position).
    pub fn pair_cell(&self, index: usize, at: CellAt) -> Option<usize> {
        let r = self.pairs.get(index)?.result.as_ref()?;
        let mut at = at;
        if let (Some(p), false) = (at.position, self.position_names.is_empty()) {
            at.position = Some(*self.pairs[index].pair.positions.get(p)?);
        }
        Some(r.layout().index(at))
    }

    /// Every included pair's value of `metric` at the aggregate's flat cell `i`, as (pair, value).
    pub fn values_at(&self, metric: Metric, i: usize) -> Vec<(usize, f64)> {
        let Some(layout) = self.layout() else { return Vec::new() };
        let at = layout.at(i);
        self.included()
            .filter_map(|(p, r)| Some((p, r.metric_at(metric, self.pair_cell(p, at)?)?)))
            .collect()
    }

    /// Recomputes [`DatasetResult::aggregate`] from the pairs so far.
    pub fn aggregate(&mut self) {
        let Some(layout) = self.layout() else {
            self.aggregate = None;
            return;
        };
        let shape = layout.shape();
        let len = layout.len();
        let (mut mean, mut sd, mut n) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        for metric in Metric::ALL {
            let (mut m, mut s, mut c) = (vec![None; len], vec![None; len], vec![0; len]);
            for i in 0..len {
                let values: Vec<f64> = self.values_at(metric, i).into_iter().map(|(_, v)| v).collect();
                if values.is_empty() {
                    continue;
                }
                let count = values.len() as f64;
                let mu = values.iter().sum::<f64>() / count;
                let var = values.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / count;
                (m[i], s[i], c[i]) = (Some(mu), Some(var.sqrt()), values.len());
            }
            mean.insert(metric.name().to_owned(), Grid::from_flat(shape.clone(), m));
            sd.insert(metric.name().to_owned(), Grid::from_flat(shape.clone(), s));
            n.insert(metric.name().to_owned(), Grid::from_flat(shape.clone(), c));
        }
        let normalized_of_mean = (0..len)
            .map(|i| {
                let at = layout.at(i);
                let rows: Vec<(f64, f64, f64)> = self
                    .included()
                    .filter_map(|(p, r)| {
                        let ld = r.patched_logit_diff.flat()[self.pair_cell(p, at)?]?;
                        Some((ld, r.clean_logit_diff, r.corrupted_logit_diff))
                    })
                    .collect();
                let k = rows.len() as f64;
                (!rows.is_empty()).then_some(())?;
                let avg = |f: fn(&(f64, f64, f64)) -> f64| rows.iter().map(f).sum::<f64>() / k;
                normalized(avg(|r| r.0), avg(|r| r.1), avg(|r| r.2))
            })
            .collect();
        self.aggregate = Some(Aggregate {
            mean,
            sd,
            n,
            normalized_of_mean: Grid::from_flat(shape, normalized_of_mean),
            pairs: self.included().count(),
        });
    }

    /// The aggregate's mean as a single-sweep result (named positions as its tokens), for the
    /// heatmaps, figures and `.npy`: `values` the mean normalized value, `patched_logit_diff` the
    /// mean logit difference, each metric its mean; the baselines their means over the pairs.
    pub fn mean_view(&self) -> Option<SweepResult> {
        let agg = self.aggregate.as_ref()?;
        let layout = self.layout()?;
        let (_, first) = self.swept().next()?;
        let mut view = first.clone();
        let included: Vec<&SweepResult> = self.included().map(|(_, r)| r).collect();
        let avg =
            |f: &dyn Fn(&SweepResult) -> f64| included.iter().map(|r| f(r)).sum::<f64>() / included.len().max(1) as f64;
        view.clean_logit_diff = avg(&|r| r.clean_logit_diff);
        view.corrupted_logit_diff = avg(&|r| r.corrupted_logit_diff);
        if !self.position_names.is_empty() {
            let record = |text: &str| PromptRecord {
                text: text.to_owned(),
                token_ids: vec![0; layout.positions],
                tokens: self.position_names.clone(),
            };
            view.clean = record("(named positions)");
            view.corrupted = record("(named positions)");
        }
        let grid = |name: &str| {
            agg.mean
                .get(name)
                .cloned()
                .unwrap_or_else(|| Grid::new(layout.shape(), None))
        };
        view.values = grid(Metric::Normalized.name());
        view.patched_logit_diff = grid(Metric::LogitDiff.name());
        view.metrics = agg.mean.clone();
        let n = agg.n.get(Metric::LogitDiff.name());
        view.skipped = Grid::from_flat(
            layout.shape(),
            (0..layout.len())
                .map(|i| {
                    let at = layout.at(i);
                    n.is_some_and(|n| n.flat()[i] > 0)
                        && included
                            .iter()
                            .zip(self.included().map(|(p, _)| p))
                            .all(|(r, p)| self.pair_cell(p, at).is_some_and(|c| r.skipped.flat()[c]))
                })
                .collect(),
        );
        view.top_k = Grid::new(layout.shape(), Vec::new());
        view.answer_logits = Grid::new(layout.shape(), None);
        view.estimate = None;
        view.verified = None;
        view.shape = layout.shape();
        view.model.id = format!("{} · {}, mean over {} pairs", view.model.id, self.dataset, agg.pairs);
        // The pairs' own runs differ: no one pair's logits or predictions stand for them.
        view.clean_answer_logits = [f32::NAN; 2];
        view.corrupted_answer_logits = [f32::NAN; 2];
        view.clean_top_k = Vec::new();
        view.corrupted_top_k = Vec::new();
        view.correct = AnswerRecord {
            text: "correct answers".into(),
            token_id: view.correct.token_id,
            token: "correct".into(),
        };
        view.incorrect = AnswerRecord {
            text: "incorrect answers".into(),
            token_id: view.incorrect.token_id,
            token: "incorrect".into(),
        };
        view.complete = self.complete;
        view.warnings = Vec::new();
        Some(view)
    }

    /// `metric` of every pair mapped onto the aggregate's cells, `[pairs, ..shape]` row-major, NaN
    /// where a pair has no value (it failed, or the cell was not computed): what `.npy` holds.
    pub fn stacked(&self, metric: Metric) -> (Vec<usize>, Vec<f64>) {
        let Some(layout) = self.layout() else {
            return (vec![0], Vec::new());
        };
        let mut shape = vec![self.pairs.len()];
        shape.extend(layout.shape());
        let mut out = Vec::with_capacity(self.pairs.len() * layout.len());
        for p in 0..self.pairs.len() {
            let r = self.pairs[p].result.as_ref();
            for i in 0..layout.len() {
                let v = r
                    .zip(self.pair_cell(p, layout.at(i)))
                    .and_then(|(r, c)| r.metric_at(metric, c));
                out.push(v.unwrap_or(f64::NAN));
            }
        }
        (shape, out)
    }
}

impl DatasetResult {
    /// One CSV row per pair and aggregate cell: the pair's index, label and flag, the cell (named
    /// position where the dataset names them), then every metric.
    pub fn to_csv(&self) -> crate::error::Result<String> {
        use crate::error::Error;
        let fail = |e: csv::Error| Error::Internal(format!("writing CSV: {e}"));
        let mut out = csv::Writer::from_writer(Vec::new());
        let Some(layout) = self.layout() else {
            return Ok(String::new());
        };
        let heads = self.component.has_heads();
        let block = self.component == Component::Block;
        let mut header = vec!["pair", "label", "flagged"];
        if block {
            header.push("component");
        }
        header.extend(["layer", "position"]);
        if heads {
            header.push("head");
        }
        header.extend(Metric::ALL.iter().map(|m| m.name()));
        out.write_record(&header).map_err(fail)?;
        for (p, r) in self.swept() {
            let pair = &self.pairs[p];
            for i in 0..layout.len() {
                let at = layout.at(i);
                let Some(cell) = self.pair_cell(p, at) else { continue };
                let mut row = vec![
                    p.to_string(),
                    pair.pair.label.clone().unwrap_or_default(),
                    pair.flagged.is_some().to_string(),
                ];
                if block {
                    row.push(layout.component_of(at).name().to_owned());
                }
                row.push(at.layer.to_string());
                row.push(match at.position {
                    Some(j) => self.position_names.get(j).cloned().unwrap_or_else(|| j.to_string()),
                    None => String::new(),
                });
                if heads {
                    row.push(at.head.map(|h| h.to_string()).unwrap_or_default());
                }
                row.extend(
                    Metric::ALL
                        .iter()
                        .map(|&m| r.metric_at(m, cell).map(|v| v.to_string()).unwrap_or_default()),
                );
                out.write_record(&row).map_err(fail)?;
            }
        }
        let bytes = out
            .into_inner()
            .map_err(|e| Error::Internal(format!("writing CSV: {e}")))?;
        String::from_utf8(bytes).map_err(|e| Error::Internal(format!("writing CSV: {e}")))
    }
}

impl DatasetResult {
    /// Writes one output in `format`: the whole result (JSON), one row per pair and cell (CSV),
    /// the pairs' `[pairs, ..]` array of `shown.metric` and the mean beside it (NPY: `path`, and
    /// `path` with `.mean.npy`), or the mean's figure. Returns the files written.
    pub fn save(
        &self,
        path: &std::path::Path,
        format: crate::export::Format,
        shown: &crate::export::Shown,
    ) -> crate::error::Result<Vec<std::path::PathBuf>> {
        use crate::error::Error;
        use crate::export::{self, Format};
        let bytes = match format {
            Format::Json => serde_json::to_string_pretty(self)
                .map_err(|e| Error::Internal(format!("writing JSON: {e}")))?
                .into_bytes(),
            Format::Csv => self.to_csv()?.into_bytes(),
            Format::Npy => {
                let (shape, values) = self.stacked(shown.metric);
                export::data::write_file(path, &export::data::npy(&shape, values.into_iter()))?;
                let mean_path = path.with_extension("mean.npy");
                if let Some(mean) = self.mean_view() {
                    export::save_as(&mean, &mean_path, Format::Npy, shown)?;
                }
                return Ok(vec![path.to_owned(), mean_path]);
            }
            Format::Png | Format::Svg => {
                let mean = self
                    .mean_view()
                    .ok_or_else(|| Error::Input("no pair was swept: there is no mean to draw".into()))?;
                export::save_as(&mean, path, format, shown)?;
                return Ok(vec![path.to_owned()]);
            }
        };
        export::data::write_file(path, &bytes)?;
        Ok(vec![path.to_owned()])
    }
}
