//! GPT-2, Pythia (GPT-NeoX), Mistral, Gemma 2 and Gemma 3: random-weight tiny models built in code
//! against HF transformers run on the same weights (tests/fixtures/make_family_reference.py →
//! family_reference.json), every site of every family, both schedules, both config spellings.
//! Every sliding window (5) is shorter than the prompt (16 tokens).

mod common;

use common::reference::check_sweep;
use common::{TempDir, fixture_json, ids, load_folder, tiny_request, write_tiny_model};
use patchbay::model::ArchConfig;
use patchbay::model::synthetic::tensor_shapes;
use patchbay::patching::{Component, Schedule, Sweep, SweepRequest};

fn entry(name: &str) -> serde_json::Value {
    fixture_json("family_reference.json")["models"][name].clone()
}

/// Builds `name` from its `config_key` config, checks the weights and tokens are the reference's,
/// then runs every sweep the reference has with both schedules.
fn check_family(name: &str, config_key: &str) {
    let entry = entry(name);
    let config = &entry[config_key];
    let cfg = ArchConfig::from_hf_config(config).expect("the reference config parses");
    // The checkpoint layout is the one transformers writes, tensor for tensor.
    let shapes: Vec<(String, Vec<usize>)> = tensor_shapes(&cfg);
    let reference_shapes = entry["tensor_shapes"].as_object().unwrap();
    assert_eq!(shapes.len(), reference_shapes.len(), "{name}: tensor count");
    for (tensor, shape) in &shapes {
        let want: Vec<usize> = serde_json::from_value(reference_shapes[tensor].clone())
            .unwrap_or_else(|_| panic!("{name}: the reference has no {tensor}"));
        assert_eq!(&want, shape, "{name} {tensor}");
    }
    let dir = TempDir::new(&format!("{name}-{config_key}"));
    let sums = write_tiny_model(&dir.0, config);
    for (tensor, expected) in entry["tensor_sums"].as_object().unwrap() {
        let expected = expected.as_f64().unwrap();
        let got = sums[tensor];
        assert!(
            (got - expected).abs() <= 1e-9 * expected.abs().max(1.0),
            "{name} {tensor}: {got} vs {expected}"
        );
    }
    let model = load_folder(&dir.0);
    let base: SweepRequest = tiny_request(Component::ResidPost);
    assert_eq!(
        model.tokenizer.encode_prompt(&base.clean).unwrap(),
        ids(&entry["clean_ids"])
    );
    for sweep in entry["sweeps"].as_array().unwrap() {
        for schedule in Schedule::ALL {
            check_sweep(&model, base.clone(), sweep, &entry, name, schedule);
        }
    }
}

#[test]
fn gpt2_matches_transformers_on_every_site() {
    check_family("tiny-gpt2", "config");
    check_family("tiny-gpt2", "config_legacy");
}

#[test]
fn pythia_matches_transformers_on_every_site() {
    check_family("tiny-pythia", "config");
    check_family("tiny-pythia", "config_legacy");
}

#[test]
fn mistral_with_a_sliding_window_matches_transformers_on_every_site() {
    check_family("tiny-mistral", "config");
    check_family("tiny-mistral", "config_legacy");
}

#[test]
fn gemma2_with_softcaps_and_windows_matches_transformers_on_every_site() {
    check_family("tiny-gemma2", "config");
    check_family("tiny-gemma2", "config_legacy");
}

#[test]
fn gemma3_with_local_and_global_layers_matches_transformers_on_every_site() {
    check_family("tiny-gemma3", "config");
    check_family("tiny-gemma3", "config_legacy");
}

#[test]
fn resid_mid_of_a_parallel_residual_is_refused_with_a_message() {
    let entry = entry("tiny-pythia");
    let dir = TempDir::new("pythia-resid-mid");
    write_tiny_model(&dir.0, &entry["config"]);
    let model = load_folder(&dir.0);
    let err = Sweep::prepare(&model, &tiny_request(Component::ResidMid), 5)
        .err()
        .expect("resid_mid is refused")
        .to_string();
    assert!(err.contains("parallel"), "{err}");
}

#[test]
fn gpt2_prepends_its_bos_only_when_asked_and_matches_transformers_then() {
    let entry = entry("tiny-gpt2");
    let bos = &entry["bos_prepended"];
    let dir = TempDir::new("gpt2-bos");
    write_tiny_model(&dir.0, &entry["config"]);
    let model = load_folder(&dir.0);
    assert!(!model.tokenizer.adds_bos(), "GPT-2's tokenizer adds no BOS");
    assert_eq!(model.tokenizer.bos(), Some(entry["bos_id"].as_u64().unwrap() as u32));
    let plain = tiny_request(Component::ResidPost);
    assert_eq!(
        plain.validate(&model).unwrap().clean.token_ids,
        ids(&entry["clean_ids"]),
        "off by default, as in HF"
    );
    let base = SweepRequest {
        prepend_bos: true,
        ..plain
    };
    let valid = base.validate(&model).unwrap();
    assert_eq!(valid.clean.token_ids, ids(&bos["clean_ids"]));
    assert_eq!(valid.corrupted.token_ids, ids(&bos["corrupted_ids"]));
    assert_eq!(valid.clean.tokens[0], "<|endoftext|>", "BOS is chip 0");
    assert_eq!(
        valid.first_diff(),
        bos["first_differing_position"].as_u64().unwrap() as usize
    );
    for sweep in bos["sweeps"].as_array().unwrap() {
        for schedule in Schedule::ALL {
            check_sweep(&model, base.clone(), sweep, bos, "tiny-gpt2 with BOS", schedule);
        }
    }
    let result = Sweep::prepare(&model, &base, 5)
        .unwrap()
        .run(
            &Default::default(),
            &std::sync::atomic::AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap();
    assert!(result.prepend_bos, "recorded in the result");
    let json = serde_json::to_value(&result).unwrap();
    assert_eq!(json["prepend_bos"], true);
}
