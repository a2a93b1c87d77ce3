//! The check of a sweep against HF transformers' numbers for the tiny reference models
//! (tests/fixtures/tiny_reference.json): weights, tokens, baselines, top-k and every cell.

use std::sync::atomic::AtomicBool;

use super::{TempDir, fixture_json, ids, load_folder, tiny_request, write_tiny_model};
use patchbay::patching::{Component, Schedule, Sweep, SweepOptions};

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
