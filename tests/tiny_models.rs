//! Random-weight Qwen3, Qwen2, Llama and Llama 3 models built in code, checked against HF
//! transformers run on the same weights (tests/fixtures/make_tiny_reference.py → tiny_reference.json),
//! with both schedules.

mod common;

use common::reference::{check_model, entry};
use patchbay::patching::Schedule;

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
