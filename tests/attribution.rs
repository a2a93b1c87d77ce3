//! Attribution patching against PyTorch autograd on the same weights
//! (tests/fixtures/make_attribution_reference.py → attribution_reference.json): every estimated
//! cell of every site, AtP and AtP*, for the tiny models of every family and SmolLM2; and AtP*'s
//! attention fix on a constructed case.

mod common;

use std::sync::atomic::AtomicBool;

use common::reference::{component, flat};
use common::{TempDir, fixture_json, ioi_request, load_folder, smollm2, tiny, tiny_request, write_tiny_model};
use patchbay::model::Model;
use patchbay::patching::estimate::{EstimateMethod, Exact};
use patchbay::patching::{Component, Direction, Sweep, SweepEvent, SweepOptions, SweepRequest};

/// First-order terms in f32 on different kernels: the bar.
const ESTIMATE_TOLERANCE: f64 = 1e-4;

fn check_estimates(model: &Model, base: SweepRequest, entry: &serde_json::Value, name: &str) {
    let mut compared = 0;
    for e in entry["estimates"].as_array().unwrap() {
        let comp = component(e["component"].as_str().unwrap());
        let request = SweepRequest {
            component: comp,
            direction: serde_json::from_value::<Direction>(e["direction"].clone()).unwrap(),
            by_position: comp.has_heads() && e["by_position"].as_bool().unwrap(),
            ..base.clone()
        };
        let sweep = Sweep::prepare(model, &request, 1).unwrap();
        // AtP* differs from AtP only for queries and keys; the reference lists it there alone.
        let methods: &[EstimateMethod] = match (e["method"].as_str().unwrap(), comp) {
            ("atp_star", _) => &[EstimateMethod::AtpStar],
            (_, Component::HeadQ | Component::HeadK) => &[EstimateMethod::Atp],
            _ => &[EstimateMethod::Atp, EstimateMethod::AtpStar],
        };
        let mut want = Vec::new();
        flat(&e["estimate"], &mut want);
        for &method in methods {
            let a = sweep.attribution(method).unwrap();
            let shape: Vec<usize> = serde_json::from_value(e["shape"].clone()).unwrap();
            assert_eq!(a.logit_diff.shape(), &shape[..], "{name} {comp} shape");
            for (i, w) in want.iter().enumerate() {
                let (Some(w), Some(got)) = (w, a.logit_diff.flat()[i]) else {
                    panic!("{name} {comp} {method:?}: cell {i} missing");
                };
                assert!(
                    (got - w).abs() <= ESTIMATE_TOLERANCE,
                    "{name} {comp} by_position={} {} {method:?} cell {:?}: {got} vs autograd {w}",
                    request.by_position,
                    request.direction,
                    sweep.result().layout().at(i)
                );
                compared += 1;
            }
        }
    }
    assert!(compared > 0, "{name}: nothing compared");
}

#[test]
fn tiny_models_estimates_match_autograd_on_every_site() {
    let reference = fixture_json("attribution_reference.json");
    let families = fixture_json("family_reference.json");
    for (name, entry) in reference["models"].as_object().unwrap() {
        if name.starts_with("SmolLM2") {
            continue;
        }
        let (dir, model);
        if let Some(config) = families["models"].get(name) {
            dir = TempDir::new(&format!("atp-{name}"));
            write_tiny_model(&dir.0, &config["config"]);
            model = load_folder(&dir.0);
        } else {
            (dir, model) = tiny(name);
        }
        check_estimates(&model, tiny_request(Component::ResidPost), entry, name);
        drop(dir);
    }
}

#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn smollm2_estimates_match_autograd() {
    let reference = fixture_json("attribution_reference.json");
    let entry = &reference["models"]["SmolLM2-135M-Instruct"];
    check_estimates(smollm2(), ioi_request(Component::ResidPost), entry, "SmolLM2");
}

#[test]
fn a_sweep_with_an_estimate_verifies_its_top_cells_first_and_marks_the_rest() {
    let (_dir, model) = tiny("tiny-qwen3");
    let sweep = Sweep::prepare(&model, &tiny_request(Component::ResidPost), 3).unwrap();
    let target = sweep.target_logit_diff();
    let options = SweepOptions {
        estimate: Some(EstimateMethod::AtpStar),
        exact: Exact::Top(5),
        sample: 2,
        ..SweepOptions::default()
    };
    let mut order = Vec::new();
    let mut estimated_first = false;
    let (mut planned, mut work, mut reported) = (None, 0.0, 0);
    let result = sweep
        .run_observed(&options, &AtomicBool::new(false), &mut |event| match event {
            SweepEvent::Estimated(_) => estimated_first = order.is_empty() && reported == 0,
            SweepEvent::Planned { cells, work } => planned = Some((cells, work)),
            SweepEvent::Work(w) => work += w,
            SweepEvent::Cell(c) => {
                reported += 1;
                if !c.skipped {
                    order.push(c.at);
                }
            }
        })
        .unwrap();
    assert!(estimated_first, "the estimate comes before any cell");
    // The progress's new total is the work the chosen cells took, and the cells reported.
    let (cells, planned_work) = planned.expect("the exact cells were planned");
    assert_eq!(cells, reported);
    assert!((planned_work - work).abs() < 1e-9, "{planned_work} vs {work}");
    let estimate = result.estimate.as_ref().expect("the estimate is in the result");
    let verified = result.verified.as_ref().expect("a verified mask");
    let layout = result.layout();
    let computed: Vec<usize> = (0..layout.len())
        .filter(|&i| !result.skipped.flat()[i] && result.patched_logit_diff.flat()[i].is_some())
        .collect();
    // The last layer's cells come with the baselines (free); then the top 5 and a sample of 2.
    let last_layer = (0..layout.len())
        .filter(|&i| !result.skipped.flat()[i] && layout.at(i).layer == layout.layers - 1)
        .count();
    assert_eq!(computed.len(), last_layer + 5 + 2, "{order:?}");
    for i in 0..layout.len() {
        assert_eq!(verified.flat()[i], result.patched_logit_diff.flat()[i].is_some());
        assert!(estimate.logit_diff.flat()[i].is_some(), "every cell is estimated");
    }
    // The top 5 by estimated effect (the last layer's aside) are among those computed.
    let mut ranked: Vec<usize> = (0..layout.len())
        .filter(|&i| !result.skipped.flat()[i] && layout.at(i).layer != layout.layers - 1)
        .collect();
    let effect = |i: usize| (estimate.logit_diff.flat()[i].unwrap() - target).abs();
    ranked.sort_by(|&a, &b| effect(b).total_cmp(&effect(a)));
    for i in &ranked[..5] {
        assert!(computed.contains(i), "top cell {:?} verified", layout.at(*i));
    }
    // Unverified cells are null in `values` and say so in the JSON and CSV.
    let json = serde_json::to_value(&result).unwrap();
    assert!(json["estimate"]["logit_diff"].is_array());
    assert_eq!(json["estimate"]["method"], "atp_star");
    let csv = patchbay::export::data::to_csv(&result).unwrap();
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with("estimate_logit_diff,estimate_normalized,verified")
    );
    assert!(csv.lines().any(|l| l.ends_with(",false")));
    let back = patchbay::patching::SweepResult::from_json_value(json).unwrap();
    assert_eq!(back.verified, result.verified);
    assert_eq!(back.estimate, result.estimate);
}

/// Tiny Llama cut to two layers, its queries scaled up (×30) until attention saturates.
fn saturated_two_layer_llama(tag: &str) -> (TempDir, patchbay::model::Model) {
    let (_, mut config) = common::tiny_configs()
        .into_iter()
        .find(|(n, _)| n == "tiny-llama")
        .unwrap();
    config["num_hidden_layers"] = 2.into();
    let dir = TempDir::new(tag);
    write_tiny_model(&dir.0, &config);
    let path = dir.0.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("self_attn.q_proj.weight") {
            *t = (&*t * 30.0).unwrap();
        }
    }
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let model = load_folder(&dir.0);
    (dir, model)
}

/// Queries scaled up until attention saturates: plain AtP's gradient through the softmax is then
/// nearly zero where patching a query moves the attention from one key to another; AtP* recomputes
/// that softmax exactly and stays close to the exact patched cells.
#[test]
fn atp_star_follows_saturated_attention_where_atp_does_not() {
    // Two layers, the second's heads compared: after their attention only the MLP, the final norm
    // and the unembedding, so what AtP* still linearises is small next to what AtP linearises
    // through the saturated softmax. (The first layer makes the last position's query differ.)
    let (_dir, model) = saturated_two_layer_llama("atp-saturated");
    let request = SweepRequest {
        component: Component::HeadQ,
        by_position: true,
        ..tiny_request(Component::HeadQ)
    };
    let exact = Sweep::prepare(&model, &request, 1)
        .unwrap()
        .run(&SweepOptions::default(), &AtomicBool::new(false), &mut |_| {})
        .unwrap();
    let sweep = Sweep::prepare(&model, &request, 1).unwrap();
    let error = |method| {
        let a = sweep.attribution(method).unwrap();
        let pairs: Vec<f64> = exact
            .patched_logit_diff
            .flat()
            .iter()
            .zip(a.logit_diff.flat())
            .zip(exact.skipped.flat())
            .enumerate()
            .filter(|(i, (_, skipped))| !**skipped && exact.layout().at(*i).layer == 1)
            .map(|(_, ((x, e), _))| (x.unwrap() - e.unwrap()).abs())
            .collect();
        pairs.iter().sum::<f64>() / pairs.len() as f64
    };
    let (atp, star) = (error(EstimateMethod::Atp), error(EstimateMethod::AtpStar));
    eprintln!("mean |exact - estimate|: AtP* {star} vs AtP {atp}");
    assert!(star < 0.5 * atp, "mean |exact − estimate|: AtP* {star} vs AtP {atp}");
}

/// AtP*'s fix is exact through the attention: the head outputs it recomputes for patched queries
/// (every head's attention with the source run's queries over the target run's keys and values)
/// equal those of a forward of the target prompt with the queries patched in, even where the
/// attention is saturated. Only what follows the head's output is taken to first order.
#[test]
fn atp_star_head_outputs_equal_a_forward_with_the_queries_patched() {
    use patchbay::model::{Hooks, Site, Span};
    let (_dir, model) = saturated_two_layer_llama("atp-exact-z");
    let t = &model.transformer;
    let request = tiny_request(Component::HeadQ);
    let (clean, corrupted) = (
        model.tokenizer.encode_prompt(&request.clean).unwrap(),
        model.tokenizer.encode_prompt(&request.corrupted).unwrap(),
    );
    // Each run's resid_pre at layer 1.
    struct Grab(Option<candle_core::Tensor>, Site, usize);
    impl Hooks for Grab {
        fn visit(
            &mut self,
            site: Site,
            layer: usize,
            _: usize,
            x: candle_core::Tensor,
        ) -> patchbay::Result<candle_core::Tensor> {
            if (site, layer) == (self.1, self.2) {
                self.0 = Some(x.clone());
            }
            Ok(x)
        }
    }
    let pre = |ids: &[u32]| {
        let mut g = Grab(None, Site::ResidPre, 1);
        t.forward(t.embed(&[ids]).unwrap(), Span::default(), &mut g).unwrap();
        g.0.unwrap()
    };
    let (source, target) = (
        t.head_activations(1, &pre(&clean)).unwrap(),
        t.head_activations(1, &pre(&corrupted)).unwrap(),
    );
    let cfg = t.config();
    let rep = cfg.num_heads / cfg.num_kv_heads;
    let expand = |x: &candle_core::Tensor| {
        let (g, s, d) = x.dims3().unwrap();
        x.unsqueeze(1)
            .unwrap()
            .broadcast_as((g, rep, s, d))
            .unwrap()
            .reshape((cfg.num_heads, s, d))
            .unwrap()
    };
    let recomputed = t
        .attend_heads(1, &source.q, &expand(&target.k), &expand(&target.v))
        .unwrap();
    // The target forward with layer 1's queries replaced by the source run's, its head outputs kept.
    struct PatchQ(candle_core::Tensor, Option<candle_core::Tensor>);
    impl Hooks for PatchQ {
        fn visit(
            &mut self,
            site: Site,
            layer: usize,
            _: usize,
            x: candle_core::Tensor,
        ) -> patchbay::Result<candle_core::Tensor> {
            Ok(match (site, layer) {
                (Site::Q, 1) => self.0.unsqueeze(0)?,
                (Site::Z, 1) => {
                    self.1 = Some(x.clone());
                    x
                }
                _ => x,
            })
        }
    }
    let mut patch = PatchQ(source.q.clone(), None);
    t.forward(t.embed(&[&corrupted]).unwrap(), Span::default(), &mut patch)
        .unwrap();
    let z = patch.1.unwrap().squeeze(0).unwrap(); // [seq, heads * hd]
    let (seq, hd) = (z.dim(0).unwrap(), cfg.head_dim);
    let z = z.reshape((seq, cfg.num_heads, hd)).unwrap().transpose(0, 1).unwrap();
    let gap = (recomputed - z)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(gap < 1e-5, "AtP*'s head outputs vs the patched forward's: {gap}");
    // And the attention is saturated there: some head's pattern row puts > 0.99 on one key.
    let max = source
        .pattern
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max > 0.99, "saturated: {max}");
}
