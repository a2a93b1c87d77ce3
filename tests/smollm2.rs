//! The real SmolLM2-135M-Instruct (Q4_1 GGUF) against HF transformers + nnsight on the same weights
//! (tests/fixtures/smollm2_ioi.json) and Python's tokenization of the GGUF tokenizer.

mod common;

use std::sync::atomic::AtomicBool;

use common::{fixture_json, ids, smollm2};
use patchbay::model::Model;
use patchbay::patching::Component;
use patchbay::patching::result::SweepResult;
use patchbay::patching::{Schedule, Sweep, SweepOptions, SweepRequest};

fn ioi_request(component: Component) -> SweepRequest {
    let r = fixture_json("smollm2_ioi.json");
    SweepRequest {
        clean: r["clean_prompt"].as_str().unwrap().into(),
        corrupted: r["corrupted_prompt"].as_str().unwrap().into(),
        correct: " John".into(),
        incorrect: " Mary".into(),
        component,
        direction: Default::default(),
        by_position: false,
        prepend_bos: false,
    }
}

fn sweep(model: &Model, schedule: Schedule) -> SweepResult {
    let prepared = Sweep::prepare(model, &ioi_request(Component::ResidPost), 10).unwrap();
    let options = SweepOptions {
        schedule,
        ..SweepOptions::default()
    };
    prepared.run(&options, &AtomicBool::new(false), &mut |_| {}).unwrap()
}

#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn ioi_tokenizes_like_python() {
    let model = smollm2();
    let r = fixture_json("smollm2_ioi.json");
    let clean = model
        .tokenizer
        .encode_prompt(r["clean_prompt"].as_str().unwrap())
        .unwrap();
    let corrupted = model
        .tokenizer
        .encode_prompt(r["corrupted_prompt"].as_str().unwrap())
        .unwrap();
    assert_eq!(clean.len(), 16, "16 tokens, no BOS");
    assert_eq!(clean, ids(&r["clean_token_ids"]));
    assert_eq!(corrupted, ids(&r["corrupted_token_ids"]));
    assert_eq!(model.tokenizer.encode_plain(" John").unwrap(), vec![2322]);
    assert_eq!(model.tokenizer.encode_plain(" Mary").unwrap(), vec![5099]);
    let tokens: Vec<String> = r["clean_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(model.tokenizer.token_texts(&clean), tokens);
}

#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn gguf_tokenizer_matches_python_on_tricky_strings() {
    let model = smollm2();
    let reference = fixture_json("gguf_tokenizer_reference.json");
    let mut failures = Vec::new();
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = model.tokenizer.encode_plain(text).unwrap();
        if got != expected {
            failures.push(format!("{text:?}: got {got:?}, python {expected:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "tokenization differs from Python:\n{}",
        failures.join("\n")
    );
}

#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn residual_sweep_reproduces_transformers_reference() {
    let model = smollm2();
    let r = fixture_json("smollm2_ioi.json");
    let result = sweep(model, Schedule::Fast);
    assert_eq!(result.shape, [30, 16]);
    assert!(
        (result.clean_logit_diff - 5.1367).abs() <= 1e-3,
        "clean LD {}",
        result.clean_logit_diff
    );
    assert!(
        (result.corrupted_logit_diff + 3.8286).abs() <= 1e-3,
        "corrupted LD {}",
        result.corrupted_logit_diff
    );
    let value = |l: usize, p: usize| result.values[l][p].expect("computed");
    assert!(
        (value(29, 15) - 1.0).abs() <= 1e-6,
        "layer 29, last position: {}",
        value(29, 15)
    );
    for l in 0..30 {
        for p in 0..9 {
            assert_eq!(value(l, p), 0.0, "layer {l}, position {p} is a no-op");
            assert!(result.skipped[l][p]);
        }
    }
    assert!((value(20, 9) - 0.58).abs() <= 0.01, "(20, 9) = {}", value(20, 9));
    assert!((value(23, 15) - 0.92).abs() <= 0.01, "(23, 15) = {}", value(23, 15));
    // Every cell, normalized and raw, against the reference.
    let mut worst = (0.0f64, 0, 0);
    for l in 0..30 {
        for p in 0..16 {
            let expected = r["matrix"][l][p].as_f64().unwrap();
            let raw = r["patched_logit_diff"][l][p].as_f64().unwrap();
            assert!(
                (value(l, p) - expected).abs() <= 0.01,
                "({l}, {p}): {} vs {expected}",
                value(l, p)
            );
            let err = (result.patched_logit_diff[l][p].unwrap() - raw).abs();
            if err > worst.0 {
                worst = (err, l, p);
            }
        }
    }
    assert!(
        worst.0 <= 5e-3,
        "largest raw logit-difference error {} at {:?}",
        worst.0,
        (worst.1, worst.2)
    );
    // The inspector's data: top-k per cell, the patched run at (29, 15) predicts like the clean run.
    assert_eq!(result.top_k[29][15].len(), 10);
    assert_eq!(result.top_k[29][15][0].id, result.clean_top_k[0].id);
    assert_eq!(result.clean_top_k[0].token, " John");
    // Answer logits: patching the last layer at the last position reproduces the clean run's.
    let [a, b] = result.answer_logits[29][15].unwrap();
    assert!((a - result.clean_answer_logits[0]).abs() < 1e-4 && (b - result.clean_answer_logits[1]).abs() < 1e-4);
    assert!((f64::from(a - b) - result.patched_logit_diff[29][15].unwrap()).abs() < 1e-4);
}
