//! Every site, direction and metric against HF transformers driven by plain PyTorch hooks
//! (tests/fixtures/patching_reference.json, made by tests/fixtures/make_patching_reference.py):
//! the tiny random models (GQA and MHA, head_dim ≠ hidden / heads) and the SmolLM2 GGUF.

mod common;

use std::sync::atomic::AtomicBool;

use common::reference::check_sweep;
use common::{fixture_json, ioi_request, smollm2, tiny, tiny_request};
use patchbay::patching::{Component, Direction, Schedule, Sweep, SweepOptions};

#[test]
fn tiny_models_match_hf_on_every_site_direction_and_metric() {
    let reference = fixture_json("patching_reference.json");
    let models = reference["models"].as_object().unwrap();
    for (name, entry) in models.iter().filter(|(n, _)| n.starts_with("tiny-")) {
        let (_dir, model) = tiny(name);
        assert_eq!(
            model.config.head_dim as u64,
            entry["head_dim"].as_u64().unwrap(),
            "{name}"
        );
        for sweep in entry["sweeps"].as_array().unwrap() {
            check_sweep(
                &model,
                tiny_request(Component::ResidPost),
                sweep,
                entry,
                name,
                Schedule::Fast,
            );
        }
    }
}

#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn smollm2_matches_hf_on_heads_noising_and_metrics() {
    let reference = fixture_json("patching_reference.json");
    let entry = &reference["models"]["SmolLM2-135M-Instruct"];
    let model = smollm2();
    for sweep in entry["sweeps"].as_array().unwrap() {
        check_sweep(
            model,
            ioi_request(Component::ResidPost),
            sweep,
            entry,
            "SmolLM2",
            Schedule::Fast,
        );
    }
}

#[test]
fn a_by_position_sweep_of_a_component_without_heads_is_refused_with_a_message() {
    let (_dir, model) = tiny("tiny-qwen3");
    let mut request = tiny_request(Component::ResidPost);
    request.by_position = true;
    let err = Sweep::prepare(&model, &request, 5).err().expect("refused");
    assert!(
        err.to_string().contains("--by-position applies to head components"),
        "{err}"
    );
    // Noising the same sweep works, and its no-op cells are the clean run's.
    request.by_position = false;
    request.direction = Direction::Noising;
    let result = Sweep::prepare(&model, &request, 5)
        .unwrap()
        .run(&SweepOptions::default(), &AtomicBool::new(false), &mut |_| {})
        .unwrap();
    assert_eq!(result.patched_logit_diff[0][0], Some(result.clean_logit_diff));
}

#[test]
fn a_head_cells_attention_patterns_follow_what_was_patched() {
    use patchbay::patching::{CellAt, PatternRequest, head_patterns};
    let (_dir, model) = tiny("tiny-qwen3");
    let ids = |text: &str| model.tokenizer.encode_prompt(text).unwrap();
    let request = tiny_request(Component::ResidPost);
    let (clean_ids, corrupted_ids) = (ids(&request.clean), ids(&request.corrupted));
    let ask = |component: Component, head: usize| PatternRequest {
        clean_ids: clean_ids.clone(),
        corrupted_ids: corrupted_ids.clone(),
        component,
        direction: Direction::Denoising,
        by_position: false,
        at: CellAt {
            layer: 1,
            position: None,
            head: Some(head),
            part: 0,
        },
    };
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
    // Patching the pattern itself: the patched run attends as the clean one.
    let p = head_patterns(&model, &ask(Component::HeadPattern, 2)).unwrap();
    assert_eq!(p.query_heads, [2]);
    assert!(close(&p.patched[0], &p.clean[0]));
    assert!(
        !close(&p.clean[0], &p.corrupted[0]),
        "the runs differ at the last position"
    );
    for row in [&p.clean[0], &p.corrupted[0], &p.patched[0]] {
        assert_eq!(row.len(), clean_ids.len());
        assert!(
            (row.iter().sum::<f32>() - 1.0).abs() < 1e-4,
            "a distribution over sources"
        );
    }
    // Patching the head's output comes after its pattern: the corrupted run's is unchanged.
    let p = head_patterns(&model, &ask(Component::HeadOut, 2)).unwrap();
    assert!(close(&p.patched[0], &p.corrupted[0]));
    // A key/value head shows every query head it serves (tiny-qwen3: 4 query heads, 2 kv heads).
    let p = head_patterns(&model, &ask(Component::HeadK, 1)).unwrap();
    assert_eq!(p.query_heads, [2, 3]);
    assert_eq!(p.patched.len(), 2);
    // Cells without heads have no pattern to show.
    let err = head_patterns(&model, &ask(Component::ResidPost, 0)).unwrap_err();
    assert!(err.to_string().contains("head cells only"), "{err}");
}
