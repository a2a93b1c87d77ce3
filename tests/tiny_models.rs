//! Random-weight Qwen3, Qwen2, Llama and Llama 3 models built in code, checked against HF
//! transformers run on the same weights (tests/fixtures/make_tiny_reference.py → tiny_reference.json),
//! with both schedules.

mod common;

use std::sync::atomic::AtomicBool;

use common::{TempDir, fixture_json, ids, write_tiny_model};
use patchbay::model::{DeviceChoice, Model, ModelSource};
use patchbay::patching::Component;
use patchbay::patching::sweep::{Schedule, Sweep, SweepOptions, SweepRequest};

/// f32 on different kernels: logits agree to ~1e-5; leave headroom.
const LOGIT_TOLERANCE: f64 = 2e-4;

fn load(dir: &std::path::Path) -> Model {
    Model::load(
        &ModelSource::Folder(dir.to_owned()),
        DeviceChoice::Cpu,
        None,
        &mut |_| {},
    )
    .expect("tiny model loads")
}

fn check_model(entry: &serde_json::Value, config_key: &str, schedule: Schedule) {
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

    let model = load(&dir.0);
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

    for component in Component::ALL {
        let request = SweepRequest {
            clean: prompts["clean"].as_str().unwrap().into(),
            corrupted: prompts["corrupted"].as_str().unwrap().into(),
            correct: prompts["correct"].as_str().unwrap().into(),
            incorrect: prompts["incorrect"].as_str().unwrap().into(),
            component,
        };
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

fn entry(name: &str) -> serde_json::Value {
    let reference = fixture_json("tiny_reference.json");
    reference["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no reference for {name}"))
        .clone()
}

#[test]
fn qwen3_matches_transformers() {
    for schedule in Schedule::ALL {
        check_model(&entry("tiny-qwen3"), "config", schedule);
    }
}

#[test]
fn qwen3_legacy_config_layout_matches_transformers() {
    for schedule in Schedule::ALL {
        check_model(&entry("tiny-qwen3"), "config_legacy", schedule);
    }
}

#[test]
fn llama_matches_transformers() {
    for schedule in Schedule::ALL {
        check_model(&entry("tiny-llama"), "config", schedule);
    }
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    for schedule in Schedule::ALL {
        check_model(&entry("tiny-llama3"), "config", schedule);
    }
    for schedule in Schedule::ALL {
        check_model(&entry("tiny-llama3"), "config_legacy", schedule);
    }
}

#[test]
fn qwen2_matches_transformers() {
    for schedule in Schedule::ALL {
        check_model(&entry("tiny-qwen2"), "config", schedule);
    }
}

/// Not a check: writes the reference's tiny models as folders (`<name>/` with config.json,
/// model.safetensors and tokenizer.json) into `$PATCHBAY_TINY_MODELS_OUT`, for
/// `scripts/gpu-check.sh`, which runs them on a GPU machine that has no Rust toolchain.
#[test]
#[ignore = "a generator for scripts/gpu-check.sh, run by it"]
fn write_the_tiny_models_for_the_gpu_check() {
    let out = std::path::PathBuf::from(
        std::env::var_os("PATCHBAY_TINY_MODELS_OUT").expect("set PATCHBAY_TINY_MODELS_OUT to the output folder"),
    );
    for entry in fixture_json("tiny_reference.json")["models"].as_array().unwrap() {
        let name = entry["name"].as_str().unwrap();
        let sums = write_tiny_model(&out.join(name), &entry["config"]);
        assert_eq!(
            sums.len(),
            entry["tensor_sums"].as_object().unwrap().len(),
            "{name}: tensor count"
        );
    }
}
