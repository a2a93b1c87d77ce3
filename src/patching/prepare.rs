//! Preparing sweeps: validating a request against the model, running its clean and corrupted
//! baselines (one packed forward that computes their shared first tokens once, or many requests'
//! baselines at once) and caching what both schedules start from.

use std::time::Instant;

use candle_core::Tensor;

use super::cost::CostModel;
use super::forwards::{patched_stream, residual_sites};
use super::hooks::SourceActs;
use super::layout::Layout;
use super::logits::{logits_rows, top_tokens};
use super::metric::{MetricBasis, logit_diff};
use super::request::{SweepRequest, TokenSweepRequest, ValidRequest};
use super::result::{Baseline, ModelRecord, SweepResult};
use super::sweep::{MAX_TOP_K, Sweep};
use super::{Component, Direction};
use crate::error::{Error, Result};
use crate::model::{LayerKv, Model, Site};

/// The sites a request's baselines keep: the component's, and the residual stream the cones and
/// head cells start from.
fn baseline_sites(component: Component) -> Vec<Site> {
    let mut sites = residual_sites(component);
    sites.extend([Site::ResidPre, Site::ResidMid, Site::ResidPost]);
    sites.sort();
    sites.dedup();
    sites
}

impl<'m> Sweep<'m> {
    /// Validates the request, runs the clean and corrupted prompts and caches clean activations.
    pub fn prepare(model: &'m Model, request: &SweepRequest, top_k: usize) -> Result<Self> {
        let start = Instant::now();
        Self::from_request(model, start, request.validate(model)?, top_k)
    }

    /// Like [`Sweep::prepare`], for prompts and answers given as token ids.
    pub fn prepare_tokens(model: &'m Model, request: &TokenSweepRequest, top_k: usize) -> Result<Self> {
        let start = Instant::now();
        Self::from_request(model, start, request.validate(model)?, top_k)
    }

    /// Prepares many requests at once (a dataset's pairs): their baselines run in one packed
    /// forward ([`Transformer::forward_prompt_groups`](crate::model::Transformer::forward_prompt_groups)),
    /// each then cached as [`Sweep::prepare`] caches it. A request that cannot run gets its error;
    /// the others are prepared.
    pub fn prepare_many(model: &'m Model, requests: &[SweepRequest], top_k: usize) -> Vec<Result<Self>> {
        let start = Instant::now();
        let mut valid: Vec<Result<ValidRequest>> = requests
            .iter()
            .map(|r| {
                let v = r.validate(model)?;
                Self::check(model, &v, top_k)?;
                Ok(v)
            })
            .collect();
        let ok: Vec<usize> = (0..valid.len()).filter(|&i| valid[i].is_ok()).collect();
        let mut sites: Vec<Site> = ok
            .iter()
            .filter_map(|&i| valid[i].as_ref().ok())
            .flat_map(|v| baseline_sites(v.component))
            .collect();
        sites.sort();
        sites.dedup();
        let prompts: Vec<([&[u32]; 2], usize)> = ok
            .iter()
            .filter_map(|&i| valid[i].as_ref().ok())
            .map(|v| {
                (
                    [v.clean.token_ids.as_slice(), v.corrupted.token_ids.as_slice()],
                    v.first_diff(),
                )
            })
            .collect();
        let groups: Vec<(&[&[u32]], usize)> = prompts.iter().map(|(p, shared)| (&p[..], *shared)).collect();
        let forwards = model.transformer.forward_prompt_groups(&groups, &sites);
        let share = start.elapsed() / (ok.len().max(1) as u32);
        let mut forwards = match forwards {
            Ok(f) => f.into_iter().map(Some).collect::<Vec<_>>(),
            // Packed they failed (memory?): each pair's baselines on their own.
            Err(_) => ok.iter().map(|_| None).collect(),
        };
        let mut out: Vec<Result<Self>> = Vec::with_capacity(valid.len());
        let mut k = 0;
        for v in valid.drain(..) {
            out.push(v.and_then(|request| {
                let forward = forwards[k].take();
                k += 1;
                let start = Instant::now().checked_sub(share).unwrap_or_else(Instant::now);
                match forward {
                    Some(f) => Self::from_baselines(model, start, request, top_k, f),
                    None => Self::from_request(model, Instant::now(), request, top_k),
                }
            }));
        }
        out
    }

    /// What a request must be beyond its own validation to run on `model`.
    fn check(model: &Model, request: &ValidRequest, top_k: usize) -> Result<()> {
        if top_k > MAX_TOP_K {
            return Err(Error::Input(format!(
                "top-k is {top_k}; at most {MAX_TOP_K} candidates are kept per cell"
            )));
        }
        let component = request.component;
        let cfg = &model.config;
        if component.has_heads() && (cfg.num_heads == 0 || cfg.num_kv_heads == 0 || cfg.head_dim == 0) {
            return Err(Error::Input(format!(
                "{component} patches attention heads, but this model's config gives no head counts"
            )));
        }
        if component == Component::ResidMid && !cfg.has_resid_mid() {
            return Err(Error::Input(format!(
                "{} has a parallel residual: attention and MLP both read the layer's input, so nothing \
                 reads the residual stream between them. Patch attn_out or resid_pre instead",
                cfg.family.hf_class()
            )));
        }
        Ok(())
    }

    /// Runs the baselines for a validated request and caches what both schedules need.
    fn from_request(model: &'m Model, start: Instant, request: ValidRequest, top_k: usize) -> Result<Self> {
        Self::check(model, &request, top_k)?;
        // Both baselines in one packed forward that computes the tokens before the first
        // difference once; it also keeps what the fast schedule starts cones from.
        let baselines = model.transformer.forward_shared_prefix(
            &[&request.clean.token_ids, &request.corrupted.token_ids],
            request.first_diff(),
            &baseline_sites(request.component),
        )?;
        Self::from_baselines(model, start, request, top_k, baselines)
    }

    /// Caches what both schedules need from a request's baselines (row 0 clean, row 1 corrupted).
    fn from_baselines(
        model: &'m Model,
        start: Instant,
        request: ValidRequest,
        top_k: usize,
        baselines: crate::model::PromptsForward,
    ) -> Result<Self> {
        let first_diff = request.first_diff();
        let component = request.component;
        let seq = request.clean.token_ids.len();
        let cfg = &model.config;
        let layout = Layout::for_model(component, request.by_position, cfg, seq);

        let t = &model.transformer;
        let layers = cfg.num_layers;
        // Baseline rows: 0 clean, 1 corrupted. Denoising patches clean into corrupted.
        let (source_row, target_row) = match request.direction {
            Direction::Denoising => (0, 1),
            Direction::Noising => (1, 0),
        };
        let act = |site: Site, l: usize| {
            baselines
                .acts
                .get(&(site, l))
                .cloned()
                .ok_or_else(|| Error::Internal(format!("no {site:?} activation captured at layer {l}")))
        };
        let mut source = SourceActs::new();
        for site in residual_sites(component) {
            for l in 0..layers {
                source.insert((site, l), act(site, l)?.narrow(0, source_row, 1)?);
            }
        }
        let run_stream = |row: usize| -> Result<Vec<Tensor>> {
            let mut stream = (0..layers)
                .map(|l| Ok(act(Site::ResidPre, l)?.get(row)?))
                .collect::<Result<Vec<_>>>()?;
            stream.push(act(Site::ResidPost, layers - 1)?.get(row)?);
            Ok(stream)
        };
        let source_stream = run_stream(source_row)?;
        let target_stream = run_stream(target_row)?;
        let target_mid = (0..layers)
            .map(|l| Ok(act(Site::ResidMid, l)?.get(target_row)?))
            .collect::<Result<Vec<_>>>()?;
        let target_kv = baselines
            .kv
            .iter()
            .map(|kv| {
                Ok(LayerKv {
                    k: kv.k.narrow(0, target_row, 1)?,
                    v: kv.v.narrow(0, target_row, 1)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;

        // The last layer's cells of the components patched after that layer's attention run no
        // layer at all: the patched residual stream at the last position goes straight to the
        // final norm and unembedding: the source-patched row for the patch at the last position,
        // the target run's own for the others. They share the baselines' pass over the
        // unembedding, so the first cells are ready with the baselines.
        let last = layers - 1;
        let cost = CostModel::new(layout, first_diff, cfg);
        let has_ready = cost.last_layer_with_baselines();
        let mut finals = vec![baselines.last_hidden.clone()];
        if has_ready {
            let at_last = |t: &Tensor| t.narrow(0, seq - 1, 1);
            let site = component.site().ok_or_else(|| Error::Internal("no site".into()))?;
            finals.push(patched_stream(
                model,
                component,
                last,
                at_last(&act(site, last)?.get(source_row)?)?,
                at_last(&target_stream[last])?,
                at_last(&target_mid[last])?,
            )?);
        }
        let mut logits = logits_rows(&t.final_logits(&Tensor::cat(&finals, 0)?)?)?.into_iter();
        let (Some(clean_logits), Some(corrupted_logits)) = (logits.next(), logits.next()) else {
            return Err(Error::Internal("the baselines did not return two rows".into()));
        };
        let target_logits = if target_row == 0 {
            clean_logits.clone()
        } else {
            corrupted_logits.clone()
        };
        let last_layer_logits = logits.next().map(|patched| (patched, target_logits.clone()));

        let (correct, incorrect) = (request.correct.token_id, request.incorrect.token_id);
        let basis = MetricBasis::new(&clean_logits, &corrupted_logits, correct, incorrect);
        let baseline = |logits: &[f32]| Baseline {
            logit_diff: logit_diff(logits, correct, incorrect),
            answer_logits: [logits[correct as usize], logits[incorrect as usize]],
            top_k: top_tokens(model, logits, top_k),
            metrics: basis.measure(logits),
        };
        let result = SweepResult::new(
            ModelRecord::of(model),
            request,
            [baseline(&clean_logits), baseline(&corrupted_logits)],
            layout,
            Some(model.load_seconds),
        );
        Ok(Self {
            model,
            result,
            layout,
            source,
            source_stream,
            target_stream,
            target_mid,
            target_kv,
            first_diff,
            last_layer_logits,
            cost,
            target_logits,
            basis,
            baseline_seconds: start.elapsed().as_secs_f64(),
        })
    }
}
