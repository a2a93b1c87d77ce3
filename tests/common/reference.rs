//! The check of a sweep against HF transformers' numbers for the tiny reference models
//! (tests/fixtures/tiny_reference.json): weights, tokens, baselines, top-k and every cell.

use std::sync::atomic::AtomicBool;

use super::{TempDir, fixture_json, ids, load_folder, tiny_request, write_tiny_model};
use patchbay::model::Model;
use patchbay::patching::result::SweepResult;
use patchbay::patching::{Component, Metric, Schedule, Sweep, SweepOptions, SweepRequest};

/// f32 on different kernels: logits agree to ~1e-5; leave headroom.
pub const LOGIT_TOLERANCE: f64 = 2e-4;

/// Builds the reference model of `entry` from its `config_key` config, checks the generator
/// reproduces its weights and the tokenizer its prompts, then sweeps every component with
/// `schedule` and compares the baselines, the clean top-10 and every cell with HF transformers.
pub fn check_model(entry: &serde_json::Value, config_key: &str, schedule: Schedule) {
    let name = entry["name"].as_str().unwrap();
    let dir = TempDir::new(&format!("{name}-{config_key}"));
    let sums = write_tiny_model(&dir.0, &entry[config_key]);

    // The generator reproduces the reference's weights.
    let ref_sums = entry["tensor_sums"].as_object().unwrap();
    assert_eq!(sums.len(), ref_sums.len(), "{name}: tensor count");
    for (tensor, expected) in ref_sums {
        let got = sums
            .get(tensor)
            .unwrap_or_else(|| panic!("{name}: generator lacks {tensor}"));
        let expected = expected.as_f64().unwrap();
        assert!(
            (got - expected).abs() <= 1e-9 * expected.abs().max(1.0),
            "{name} {tensor}: sum {got} vs {expected}"
        );
    }

    let model = load_folder(&dir.0);
    let prompts = fixture_json("tiny_reference.json")["prompts"].clone();
    assert_eq!(
        model
            .tokenizer
            .encode_prompt(prompts["clean"].as_str().unwrap())
            .unwrap(),
        ids(&entry["clean_ids"])
    );
    assert_eq!(
        model
            .tokenizer
            .encode_prompt(prompts["corrupted"].as_str().unwrap())
            .unwrap(),
        ids(&entry["corrupted_ids"])
    );

    // tiny_reference.json has these four; every other site is checked against
    // patching_reference.json (tests/heads_directions_metrics.rs).
    for component in [
        Component::ResidPost,
        Component::ResidPre,
        Component::AttnOut,
        Component::MlpOut,
    ] {
        let request = tiny_request(component);
        let sweep = Sweep::prepare(&model, &request, 10).unwrap();
        let options = SweepOptions {
            schedule,
            ..SweepOptions::default()
        };
        let result = sweep.run(&options, &AtomicBool::new(false), &mut |_| {}).unwrap();
        assert!(result.complete);
        assert_eq!(result.correct.token_id as u64, entry["correct_id"].as_u64().unwrap());
        assert_eq!(
            result.incorrect.token_id as u64,
            entry["incorrect_id"].as_u64().unwrap()
        );
        let close = |a: f64, b: f64, what: &str| {
            assert!(
                (a - b).abs() <= LOGIT_TOLERANCE,
                "{name} {component} {what}: {a} vs reference {b}"
            );
        };
        close(
            result.clean_logit_diff,
            entry["clean_logit_diff"].as_f64().unwrap(),
            "clean LD",
        );
        close(
            result.corrupted_logit_diff,
            entry["corrupted_logit_diff"].as_f64().unwrap(),
            "corrupted LD",
        );
        let top_ref: Vec<u64> = entry["clean_top10"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_u64().unwrap())
            .collect();
        for (i, t) in result.clean_top_k.iter().enumerate() {
            close(
                f64::from(t.logit),
                entry["clean_top10"][i][1].as_f64().unwrap(),
                "clean top-k logit",
            );
        }
        assert_eq!(result.clean_top_k[0].id as u64, top_ref[0], "{name}: clean top-1 token");
        let reference = &entry["patched_logit_diff"][component.name()];
        for l in 0..result.layers() {
            for p in 0..result.positions() {
                let got = result.patched_logit_diff[l][p].expect("every cell computed");
                close(
                    got,
                    reference[l][p].as_f64().unwrap(),
                    &format!("{} schedule: patched LD at layer {l}, position {p}", schedule.name()),
                );
            }
        }
    }
}

/// The reference entry of the tiny model `name`.
pub fn entry(name: &str) -> serde_json::Value {
    let reference = fixture_json("tiny_reference.json");
    reference["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no reference for {name}"))
        .clone()
}

/// The reference's nested arrays, flat (row-major), nulls as `None`.
pub fn flat(v: &serde_json::Value, out: &mut Vec<Option<f64>>) {
    match v {
        serde_json::Value::Array(items) => items.iter().for_each(|i| flat(i, out)),
        other => out.push(other.as_f64()),
    }
}

pub fn component(name: &str) -> Component {
    serde_json::from_value(serde_json::Value::String(name.into())).expect("a component Patchbay knows")
}

/// Sweeps what one reference entry describes and compares every cell it has.
pub fn check_sweep(
    model: &Model,
    base: SweepRequest,
    entry: &serde_json::Value,
    reference: &serde_json::Value,
    what: &str,
    schedule: Schedule,
) {
    let comp = component(entry["component"].as_str().unwrap());
    let request = SweepRequest {
        component: comp,
        direction: serde_json::from_value(entry["direction"].clone()).unwrap(),
        by_position: comp.has_heads() && entry["by_position"].as_bool().unwrap(),
        ..base
    };
    let what = format!(
        "{what} {} by_position={} {} ({} schedule)",
        request.component,
        request.by_position,
        request.direction,
        schedule.name()
    );
    let result: SweepResult = super::sweep_with(model, &request, schedule, 5);
    let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone()).unwrap();
    assert_eq!(result.shape, shape, "{what}: shape");
    let mut expected = Vec::new();
    flat(&entry["patched_logit_diff"], &mut expected);
    let mut compared = 0;
    for (i, want) in expected.iter().enumerate() {
        let Some(want) = want else { continue };
        let got = result.patched_logit_diff.flat()[i].expect("computed");
        assert!(
            (got - want).abs() <= LOGIT_TOLERANCE,
            "{what}: cell {:?} {got} vs HF {want}",
            result.layout().at(i)
        );
        compared += 1;
    }
    assert!(compared > 0, "{what}: nothing compared");
    // The metrics, where the reference has them. The normalized metric divides by the clean −
    // corrupted gap, which magnifies the raw tolerance; rank is a count and must match exactly
    // except where two logits tie within the tolerance.
    let gap =
        (reference["clean_logit_diff"].as_f64().unwrap() - reference["corrupted_logit_diff"].as_f64().unwrap()).abs();
    let Some(metrics) = entry["metrics"].as_object() else {
        return;
    };
    for (name, values) in metrics {
        let metric: Metric = serde_json::from_value(serde_json::Value::String(name.clone())).unwrap();
        let tolerance = match metric {
            Metric::Normalized => 2.0 * LOGIT_TOLERANCE / gap.max(1e-9),
            Metric::Rank => 0.0,
            _ => LOGIT_TOLERANCE,
        };
        let mut expected = Vec::new();
        flat(values, &mut expected);
        for (i, want) in expected.iter().enumerate() {
            let (Some(want), Some(got)) = (want, result.metric_at(metric, i)) else {
                continue;
            };
            assert!(
                (got - want).abs() <= tolerance,
                "{what}: {metric} at {:?}: {got} vs HF {want}",
                result.layout().at(i)
            );
        }
    }
}
