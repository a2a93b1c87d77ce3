//! Attribution patching (AtP): every cell's patched logit difference estimated at once from the
//! target run's gradients (Nanda 2023; Syed et al. 2023; AtP* by Kramár et al. 2024):
//!
//!     LD_patched ≈ LD_target + (a_source − a_target) · ∂LD/∂a   (at the target run)
//!
//! One differentiable forward and one backward of the target run
//! ([`Transformer::site_gradients`](crate::model::Transformer::site_gradients)); the source
//! activations are the sweep's own caches. The estimate is poor where the effect is not linear
//! (the residual stream at a token the answer depends on, saturated attention), which is why the
//! app replaces it with exact cells, most important first. AtP* recomputes the attention softmax
//! exactly for patched queries and keys and linearises only after it.
//!
//! Only the logit difference and the normalized metric are estimated: the other metrics are not
//! linear in the activation.

use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::grid::Grid;
use super::layout::CellAt;
use super::metric::normalized;
use super::sweep::Sweep;
use super::{Component, Direction};
use crate::error::{Error, Result};
use crate::model::{HeadActivations, Site, SiteGradients};

/// How cells are estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "kebab-case")]
pub enum EstimateMethod {
    /// First order through everything: (a_source − a_target) · ∂LD/∂a.
    Atp,
    /// AtP*: queries and keys patched through the exact attention softmax, then first order.
    #[default]
    AtpStar,
}

impl EstimateMethod {
    pub const ALL: [EstimateMethod; 2] = [EstimateMethod::AtpStar, EstimateMethod::Atp];

    pub fn name(self) -> &'static str {
        match self {
            EstimateMethod::Atp => "atp",
            EstimateMethod::AtpStar => "atp_star",
        }
    }

    /// As the app and figures show it.
    pub fn label(self) -> &'static str {
        match self {
            EstimateMethod::Atp => "AtP",
            EstimateMethod::AtpStar => "AtP*",
        }
    }
}

/// Which numbers a figure (or the text heatmap, or `--npy`) shows of a sweep with an estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EstimateView {
    /// The exact cells (null where not verified).
    #[default]
    Exact,
    /// The estimate of every cell.
    Estimate,
    /// Exact − estimate, where verified.
    Difference,
}

/// `result` with its logit_diff and normalized numbers replaced by what `shown` asks for (the
/// other metrics, which are not estimated, emptied unless exact values are shown); the title's
/// component says which. `None` when `result` has no estimate to show.
pub fn with_view(result: &super::SweepResult, shown: EstimateView) -> Option<super::SweepResult> {
    use super::Metric;
    if shown == EstimateView::Exact {
        return Some(result.clone());
    }
    let estimate = result.estimate.as_ref()?;
    let mut out = result.clone();
    let pick = |exact: &Grid<Option<f64>>, est: &Grid<Option<f64>>| -> Grid<Option<f64>> {
        let values = match shown {
            EstimateView::Estimate => est.flat().to_vec(),
            _ => exact
                .flat()
                .iter()
                .zip(est.flat())
                .map(|(x, e)| Some((*x)? - (*e)?))
                .collect(),
        };
        Grid::from_flat(exact.shape().to_vec(), values)
    };
    let exact_ld = result.patched_logit_diff.clone();
    let exact_norm = result.values.clone();
    out.patched_logit_diff = pick(&exact_ld, &estimate.logit_diff);
    out.values = pick(&exact_norm, &estimate.normalized);
    for (name, grid) in out.metrics.iter_mut() {
        *grid = match name.as_str() {
            n if n == Metric::LogitDiff.name() => out.patched_logit_diff.clone(),
            n if n == Metric::Normalized.name() => out.values.clone(),
            _ => Grid::new(grid.shape().to_vec(), None),
        };
    }
    out.model.id = match shown {
        EstimateView::Estimate => format!("{} · {} estimate", result.model.id, estimate.method.label()),
        _ => format!("{} · exact − {} estimate", result.model.id, estimate.method.label()),
    };
    Some(out)
}

/// Every cell's estimate, in the sweep's layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attribution {
    pub method: EstimateMethod,
    /// The estimated patched logit difference.
    pub logit_diff: Grid<Option<f64>>,
    /// The estimated normalized metric (null where the baselines' difference is too small).
    pub normalized: Grid<Option<f64>>,
    /// Seconds the estimate took (its forward and backward included).
    pub seconds: f64,
}

impl Attribution {
    /// The cells in order of estimated importance: |estimate − target run's logit difference|,
    /// largest first (ties in layout order).
    pub fn by_importance(&self, target_logit_diff: f64, cells: &mut [CellAt], index: impl Fn(CellAt) -> usize) {
        let effect = |at: &CellAt| self.logit_diff.flat()[index(*at)].map_or(0.0, |v| (v - target_logit_diff).abs());
        cells.sort_by(|a, b| effect(b).total_cmp(&effect(a)));
    }
}

/// The sites whose gradients a component's estimate needs.
fn sites(component: Component) -> Vec<Site> {
    match component {
        Component::Block => Component::BLOCK_PARTS.iter().filter_map(|c| c.site()).collect(),
        // AtP* recomputes their attention: the target run's queries, keys, values and outputs.
        Component::HeadQ | Component::HeadK => vec![Site::Q, Site::K, Site::V, Site::Z],
        c => c.site().into_iter().collect(),
    }
}

/// Σ over the last dimension of (source − target) · gradient, in f32: `[.., n] → [..]`.
fn attribution(source: &Tensor, target: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    Ok(((f(source)? - f(target)?)? * f(grad)?)?.sum(candle_core::D::Minus1)?)
}

impl Sweep<'_> {
    /// Estimates every cell of the sweep with `method` (see the module documentation).
    pub fn attribution(&self, method: EstimateMethod) -> Result<Attribution> {
        let start = Instant::now();
        let t = &self.model.transformer;
        let component = self.layout.component;
        let r = &self.result;
        let (target, target_ld) = match r.direction {
            Direction::Denoising => (&r.corrupted.token_ids, r.corrupted_logit_diff),
            Direction::Noising => (&r.clean.token_ids, r.clean_logit_diff),
        };
        let grads = t.site_gradients(target, r.correct.token_id, r.incorrect.token_id, &sites(component))?;
        let mut logit_diff = Grid::new(self.layout.shape(), None);
        let mut put = |at: CellAt, effect: f64| {
            logit_diff.set(self.layout.index(at), Some(target_ld + effect));
        };
        let layers = self.layout.layers;
        if component.has_heads() {
            for l in 0..layers {
                let effects = self.head_effects(l, &grads, method)?; // [heads or kv heads, seq]
                for (head, row) in effects.iter().enumerate() {
                    if self.layout.by_position {
                        for (p, &e) in row.iter().enumerate() {
                            put(
                                CellAt {
                                    layer: l,
                                    position: Some(p),
                                    head: Some(head),
                                    part: 0,
                                },
                                e,
                            );
                        }
                    } else {
                        put(
                            CellAt {
                                layer: l,
                                position: None,
                                head: Some(head),
                                part: 0,
                            },
                            row.iter().sum(),
                        );
                    }
                }
            }
        } else {
            let parts: Vec<Component> = match component {
                Component::Block => Component::BLOCK_PARTS.to_vec(),
                c => vec![c],
            };
            for (part, c) in parts.iter().enumerate() {
                let site = c.site().ok_or_else(|| Error::Internal(format!("{c} has no site")))?;
                for l in 0..layers {
                    let key = (site, l);
                    let (Some(source), Some(act), Some(grad)) =
                        (self.source.get(&key), grads.acts.get(&key), grads.grads.get(&key))
                    else {
                        return Err(Error::Internal(format!("no activations or gradient at {site:?} {l}")));
                    };
                    let effects = attribution(&source.squeeze(0)?, act, grad)?.to_vec1::<f32>()?;
                    for (p, &e) in effects.iter().enumerate() {
                        put(
                            CellAt {
                                part,
                                ..CellAt::at(l, p)
                            },
                            f64::from(e),
                        );
                    }
                }
            }
        }
        let normalized_grid = Grid::from_flat(
            self.layout.shape(),
            logit_diff
                .flat()
                .iter()
                .map(|v| v.and_then(|v| normalized(v, r.clean_logit_diff, r.corrupted_logit_diff)))
                .collect(),
        );
        Ok(Attribution {
            method,
            logit_diff,
            normalized: normalized_grid,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Layer `l`'s estimated effects of a head component, per head (key/value head for k and v)
    /// and position: `[heads][seq]`, in raw logit difference.
    fn head_effects(&self, l: usize, grads: &SiteGradients, method: EstimateMethod) -> Result<Vec<Vec<f64>>> {
        let t = &self.model.transformer;
        let cfg = t.config();
        let (heads, hd) = (cfg.num_heads, cfg.head_dim);
        let source: HeadActivations = t.head_activations(l, &self.source_stream[l].unsqueeze(0)?)?;
        let get = |site: Site| -> Result<(&Tensor, &Tensor)> {
            match (grads.acts.get(&(site, l)), grads.grads.get(&(site, l))) {
                (Some(a), Some(g)) => Ok((a, g)),
                _ => Err(Error::Internal(format!("no gradient at {site:?} {l}"))),
            }
        };
        // Head outputs, `[heads, seq, hd]`.
        let by_head = |z: &Tensor| -> Result<Tensor> {
            let seq = z.dim(0)?;
            Ok(z.reshape((seq, heads, hd))?.transpose(0, 1)?.contiguous()?)
        };
        let rows = |t: Tensor| -> Result<Vec<Vec<f64>>> {
            Ok(t.to_dtype(DType::F32)?
                .to_vec2::<f32>()?
                .into_iter()
                .map(|r| r.into_iter().map(f64::from).collect())
                .collect())
        };
        let component = self.layout.component;
        let star = method == EstimateMethod::AtpStar;
        Ok(match component {
            Component::HeadOut => {
                let (z, g) = get(Site::Z)?;
                rows(attribution(&source.z, &by_head(z)?, &by_head(g)?)?)?
            }
            Component::HeadV | Component::HeadPattern => {
                let site = component.site().unwrap_or(Site::V);
                let (a, g) = get(site)?;
                let s = if site == Site::V { &source.v } else { &source.pattern };
                rows(attribution(s, a, g)?)?
            }
            Component::HeadQ if !star => {
                let (a, g) = get(Site::Q)?;
                rows(attribution(&source.q, a, g)?)?
            }
            Component::HeadK if !star => {
                let (a, g) = get(Site::K)?;
                rows(attribution(&source.k, a, g)?)?
            }
            Component::HeadQ => {
                // AtP*: every head's attention with its source queries, exactly; each query row
                // depends on its own query only, so one pass gives every position's patch.
                let (z, gz) = (by_head(get(Site::Z)?.0)?, by_head(get(Site::Z)?.1)?);
                let (k, v) = (get(Site::K)?.0, get(Site::V)?.0);
                let rep = heads / cfg.num_kv_heads;
                let expand = |x: &Tensor| -> Result<Tensor> {
                    let (g, s, d) = x.dims3()?;
                    Ok(x.unsqueeze(1)?.broadcast_as((g, rep, s, d))?.reshape((heads, s, d))?)
                };
                let patched = t.attend_heads(l, &source.q, &expand(k)?, &expand(v)?)?;
                rows(attribution(&patched, &z, &gz)?)?
            }
            Component::HeadK => self.key_effects_exact(l, &source, grads)?,
            other => return Err(Error::Internal(format!("{other} is not a head component"))),
        })
    }

    /// AtP* for keys: key/value head g's keys replaced by the source run's (at every position from
    /// the first difference, or at one), the query heads it serves attend again exactly, and the
    /// change in their outputs is taken to first order. `[kv_heads][seq]`; for every-position
    /// cells the whole patch's effect is in the first difference's entry.
    fn key_effects_exact(&self, l: usize, source: &HeadActivations, grads: &SiteGradients) -> Result<Vec<Vec<f64>>> {
        let t = &self.model.transformer;
        let cfg = t.config();
        let (heads, hd, kv_heads) = (cfg.num_heads, cfg.head_dim, cfg.num_kv_heads);
        let rep = heads / kv_heads;
        let missing = || Error::Internal(format!("no gradient at layer {l}"));
        let q = grads.acts.get(&(Site::Q, l)).ok_or_else(missing)?;
        let k = grads.acts.get(&(Site::K, l)).ok_or_else(missing)?;
        let v = grads.acts.get(&(Site::V, l)).ok_or_else(missing)?;
        let z = grads.acts.get(&(Site::Z, l)).ok_or_else(missing)?;
        let gz = grads.grads.get(&(Site::Z, l)).ok_or_else(missing)?;
        let seq = q.dim(1)?;
        let by_head =
            |z: &Tensor| -> Result<Tensor> { Ok(z.reshape((seq, heads, hd))?.transpose(0, 1)?.contiguous()?) };
        let (z, gz) = (by_head(z)?, by_head(gz)?);
        let mut out = vec![vec![0.0; seq]; kv_heads];
        for (g, row) in out.iter_mut().enumerate() {
            let queries = q.narrow(0, g * rep, rep)?;
            let (zg, gzg) = (z.narrow(0, g * rep, rep)?, gz.narrow(0, g * rep, rep)?);
            let values = v.get(g)?.unsqueeze(0)?.broadcast_as((rep, seq, hd))?;
            let (ks, kt) = (source.k.get(g)?, k.get(g)?);
            let patches: Vec<(usize, Vec<u8>)> = if self.layout.by_position {
                (self.first_diff..seq)
                    .map(|p| (p, (0..seq).map(|i| u8::from(i == p)).collect()))
                    .collect()
            } else if self.first_diff < seq {
                vec![(
                    self.first_diff,
                    (0..seq).map(|i| u8::from(i >= self.first_diff)).collect(),
                )]
            } else {
                Vec::new()
            };
            for (p, mask) in patches {
                let mask = Tensor::from_vec(mask, (seq, 1), t.device())?.broadcast_as(kt.shape())?;
                let keys = mask.where_cond(&ks, &kt)?.unsqueeze(0)?.broadcast_as((rep, seq, hd))?;
                let patched = t.attend_heads(l, &queries, &keys, &values)?;
                let effect = attribution(&patched, &zg, &gzg)?.sum_all()?.to_scalar::<f32>()?;
                row[p] = f64::from(effect);
            }
        }
        Ok(out)
    }
}

/// Which cells a sweep with an estimate computes exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Exact {
    /// Every cell (the estimate only orders them, most important first).
    #[default]
    All,
    /// The K cells of largest estimated effect.
    Top(usize),
    /// None: the estimate alone.
    None,
}

impl std::str::FromStr for Exact {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "all" => Ok(Exact::All),
            "none" => Ok(Exact::None),
            other => other
                .strip_prefix("top:")
                .and_then(|k| k.parse().ok())
                .map(Exact::Top)
                .ok_or_else(|| format!("'{other}' is not all, none or top:K (e.g. top:200)")),
        }
    }
}

/// Seed of the random sample of cells outside the top K: the same sweep verifies the same cells.
const SAMPLE_SEED: u64 = 0x5eed;

/// The cells to compute exactly, most important first: all of them, or the top K by estimated
/// effect, then `sample` more drawn at random from the rest (AtP*'s check on what the estimate
/// missed).
pub(super) fn choose_exact(mut cells: Vec<CellAt>, exact: Exact, sample: usize) -> Vec<CellAt> {
    use rand::SeedableRng;
    let keep = match exact {
        Exact::All => return cells,
        Exact::Top(k) => k.min(cells.len()),
        Exact::None => 0,
    };
    let rest = cells.split_off(keep);
    let mut rng = rand::rngs::StdRng::seed_from_u64(SAMPLE_SEED);
    let mut picked = rand::seq::index::sample(&mut rng, rest.len(), sample.min(rest.len())).into_vec();
    picked.sort_unstable();
    cells.extend(picked.into_iter().map(|i| rest[i]));
    cells
}

/// Cells ordered by importance grouped into tiers of doubling size (the first an eighth of a
/// typical block): each tier is then packed into blocks as the fast schedule packs any cells, so
/// the most important cells are verified first without giving up packing.
pub(super) fn importance_tiers(cells: Vec<CellAt>) -> Vec<Vec<CellAt>> {
    const FIRST_TIER: usize = 8;
    let mut tiers = Vec::new();
    let mut rest = cells.as_slice();
    let mut size = FIRST_TIER;
    while !rest.is_empty() {
        let (tier, after) = rest.split_at(size.min(rest.len()));
        tiers.push(tier.to_vec());
        rest = after;
        size *= 2;
    }
    tiers
}

/// How far an estimate has been off on the cells verified so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    /// Cells computed exactly (no-op cells aside, which the estimate gets right by construction).
    pub verified: usize,
    /// Cells to compute in all (no-op cells aside).
    pub cells: usize,
    /// max |exact − estimate| in raw logit difference over the verified cells.
    pub max_abs_error: Option<f64>,
    /// Spearman's rank correlation of exact and estimated logit differences over the verified
    /// cells (None with fewer than three).
    pub rank_correlation: Option<f64>,
}

/// The agreement of `result`'s estimate with its exact cells so far; `None` without an estimate.
pub fn agreement(result: &super::SweepResult) -> Option<Agreement> {
    let estimate = result.estimate.as_ref()?;
    let pairs: Vec<(f64, f64)> = result
        .patched_logit_diff
        .flat()
        .iter()
        .zip(estimate.logit_diff.flat())
        .zip(result.skipped.flat())
        .filter(|(_, skipped)| !**skipped)
        .filter_map(|((x, e), _)| Some(((*x)?, (*e)?)))
        .collect();
    let cells = result.skipped.flat().iter().filter(|s| !**s).count();
    let (exact, est): (Vec<f64>, Vec<f64>) = pairs.iter().copied().unzip();
    Some(Agreement {
        verified: pairs.len(),
        cells,
        max_abs_error: pairs.iter().map(|(x, e)| (x - e).abs()).reduce(f64::max),
        rank_correlation: spearman(&exact, &est),
    })
}

/// Spearman's rank correlation (ties take their average rank); None with fewer than three pairs
/// or when either side is constant.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 3 {
        return None;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let mean = (a.len() as f64 - 1.0) / 2.0;
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        cov += (x - mean) * (y - mean);
        va += (x - mean).powi(2);
        vb += (y - mean).powi(2);
    }
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

/// 0-based ranks, ties averaged.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0;
        for &k in &order[i..=j] {
            out[k] = rank;
        }
        i = j + 1;
    }
    out
}

/// How many of the `k` cells of largest exact effect (|LD − target LD|) are among the `within` of
/// largest estimated effect: the bench's check that the estimate finds what matters.
pub fn top_overlap(exact: &[Option<f64>], estimate: &[Option<f64>], target: f64, k: usize, within: usize) -> usize {
    let top = |values: &[Option<f64>], n: usize| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..values.len()).filter(|&i| values[i].is_some()).collect();
        let effect = |i: usize| values[i].map_or(0.0, |v| (v - target).abs());
        idx.sort_by(|&a, &b| effect(b).total_cmp(&effect(a)));
        idx.truncate(n);
        idx
    };
    let wanted = top(exact, k);
    let found = top(estimate, within);
    wanted.iter().filter(|i| found.contains(i)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_is_one_for_monotone_and_minus_one_for_reversed() {
        let a = [1.0, 2.0, 3.0, 10.0];
        assert_eq!(spearman(&a, &[0.1, 0.2, 0.5, 0.9]), Some(1.0));
        assert_eq!(spearman(&a, &[4.0, 3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(spearman(&a, &[1.0, 1.0, 1.0, 1.0]), None);
        assert_eq!(ranks(&[5.0, 1.0, 5.0]), vec![1.5, 0.0, 1.5]);
    }

    #[test]
    fn exact_cells_are_the_top_k_and_a_reproducible_sample_of_the_rest() {
        let cells: Vec<CellAt> = (0..50).map(|i| CellAt::at(i / 10, i % 10)).collect();
        assert_eq!(choose_exact(cells.clone(), Exact::All, 5), cells);
        let top = choose_exact(cells.clone(), Exact::Top(7), 3);
        assert_eq!(top.len(), 10);
        assert_eq!(&top[..7], &cells[..7]);
        assert_eq!(
            top,
            choose_exact(cells.clone(), Exact::Top(7), 3),
            "the same sample each time"
        );
        assert!(top[7..].iter().all(|c| cells[7..].contains(c)));
        assert_eq!(choose_exact(cells.clone(), Exact::None, 0), Vec::new());
        assert_eq!("top:200".parse::<Exact>(), Ok(Exact::Top(200)));
        assert!("top".parse::<Exact>().is_err());
        let tiers = importance_tiers(cells);
        assert_eq!(tiers.iter().map(Vec::len).collect::<Vec<_>>(), vec![8, 16, 26]);
    }

    #[test]
    fn the_top_overlap_counts_exact_top_cells_the_estimate_ranks_high() {
        let exact = [Some(0.0), Some(5.0), Some(-4.0), Some(0.1), None];
        let estimate = [Some(0.0), Some(1.0), Some(0.2), Some(-3.0), Some(9.0)];
        // Exact top 2: cells 1 and 2; the estimate's top 3: cells 4, 3, 1.
        assert_eq!(top_overlap(&exact, &estimate, 0.0, 2, 3), 1);
    }
}
