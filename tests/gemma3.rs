//! The real Gemma 3 270M (Q4_K_M GGUF, scripts/fetch-gemma3.sh) end to end on IOI against HF
//! transformers loading the same file (tests/fixtures/make_gemma3_gguf_reference.py →
//! gemma3_gguf_reference.json): the SentencePiece tokenizer's ids, BOS at position 0, both
//! logit differences, the clean top-10 and every cell of the resid_post and resid_pre sweeps.

mod common;

use std::sync::OnceLock;

use common::reference::LOGIT_TOLERANCE;
use common::{fixture_json, gemma3_gguf, ids, ioi_request, sweep_with};
use patchbay::model::{DeviceChoice, DtypeChoice, Family, Model, ModelSource};
use patchbay::patching::{Component, Schedule};

fn gemma3() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        Model::load(
            &ModelSource::Gguf(gemma3_gguf()),
            DeviceChoice::Cpu,
            DtypeChoice::Auto,
            &mut |_| {},
        )
        .expect("Gemma 3 270M loads")
    })
}

fn reference() -> serde_json::Value {
    fixture_json("gemma3_gguf_reference.json")
}

#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the Gemma 3 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn gemma3_tokenizes_like_transformers_with_bos_at_position_0() {
    let model = gemma3();
    let reference = reference();
    assert_eq!(model.config.family, Family::Gemma3);
    assert_eq!(
        model.tokenizer.bos(),
        Some(reference["bos_id"].as_u64().unwrap() as u32)
    );
    let valid = ioi_request(Component::ResidPost).validate(model).unwrap();
    assert_eq!(valid.clean.token_ids, ids(&reference["clean_ids"]));
    assert_eq!(valid.corrupted.token_ids, ids(&reference["corrupted_ids"]));
    assert_eq!(valid.clean.tokens[0], "<bos>", "BOS is chip 0");
    assert_eq!(valid.first_diff(), 10, "BOS is never a difference");
    assert_eq!(valid.correct.token_id as u64, reference["correct_id"].as_u64().unwrap());
    assert_eq!(
        valid.incorrect.token_id as u64,
        reference["incorrect_id"].as_u64().unwrap()
    );
    for case in reference["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            model.tokenizer.encode_plain(text).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
    }
}

#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the Gemma 3 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn gemma3_ioi_sweeps_match_transformers_on_every_cell() {
    let model = gemma3();
    let reference = reference();
    let close = |got: f64, want: &serde_json::Value, what: &str| {
        let want = want.as_f64().unwrap();
        assert!((got - want).abs() <= LOGIT_TOLERANCE, "{what}: {got} vs HF {want}");
    };
    for (component, schedules) in [
        (Component::ResidPost, &Schedule::ALL[..]),
        (Component::ResidPre, &[Schedule::Fast][..]),
    ] {
        for &schedule in schedules {
            let result = sweep_with(model, &ioi_request(component), schedule, 10);
            close(result.clean_logit_diff, &reference["clean_logit_diff"], "clean LD");
            close(
                result.corrupted_logit_diff,
                &reference["corrupted_logit_diff"],
                "corrupted LD",
            );
            for (i, top) in result.clean_top_k.iter().enumerate() {
                close(
                    f64::from(top.logit),
                    &reference["clean_top10"][i][1],
                    "clean top-k logit",
                );
            }
            assert_eq!(
                result.clean_top_k[0].id as u64,
                reference["clean_top10"][0][0].as_u64().unwrap()
            );
            let cells = &reference["patched_logit_diff"][component.name()];
            for l in 0..result.layers() {
                for p in 0..result.positions() {
                    close(
                        result.patched_logit_diff[l][p].expect("every cell"),
                        &cells[l][p],
                        &format!("{component} {} at layer {l}, position {p}", schedule.name()),
                    );
                }
            }
        }
    }
}
