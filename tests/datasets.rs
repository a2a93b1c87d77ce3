//! Prompt-pair datasets: each pair's cells in a dataset sweep are its single-pair sweep's, the
//! aggregates are the mean, standard deviation and count over pairs, named positions line pairs
//! of different lengths up, bad lines are named and skipped, and a cancel keeps finished pairs.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use common::{TempDir, tiny, tiny_request};
use patchbay::dataset::run::{DatasetEvent, DatasetRequest, run};
use patchbay::dataset::templates::{Template, generate};
use patchbay::dataset::{Dataset, PromptPair};
use patchbay::patching::{Component, Direction, Metric, Sweep, SweepOptions};

fn pair(clean: &str, corrupted: &str, correct: &str, incorrect: &str) -> PromptPair {
    PromptPair {
        clean: clean.into(),
        corrupted: corrupted.into(),
        correct: correct.into(),
        incorrect: incorrect.into(),
        label: None,
        positions: Vec::new(),
    }
}

/// IOI pairs in the tiny vocabulary, all 16 tokens.
fn tiny_pairs() -> Vec<PromptPair> {
    let base = tiny_request(Component::ResidPost);
    let swap = |s: &str| s.replace("Mary", "#").replace("John", "Mary").replace('#', "John");
    vec![
        pair(&base.clean, &base.corrupted, " John", " Mary"),
        pair(&swap(&base.clean), &swap(&base.corrupted), " Mary", " John"),
        pair(&base.corrupted, &base.clean, " Mary", " John"),
    ]
}

fn request(dataset: Dataset) -> DatasetRequest {
    DatasetRequest {
        dataset,
        component: Component::ResidPost,
        direction: Direction::Denoising,
        by_position: false,
        prepend_bos: false,
    }
}

#[test]
fn each_pair_equals_its_single_sweep_and_the_aggregate_is_their_mean() {
    let (_dir, model) = tiny("tiny-qwen3");
    let dataset = Dataset {
        name: "tiny ioi".into(),
        pairs: tiny_pairs(),
        position_names: Vec::new(),
        dropped: Vec::new(),
    };
    let req = request(dataset);
    let mut result = run(
        &model,
        &req,
        &SweepOptions::default(),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    assert!(result.complete);
    for (i, r) in result.swept() {
        let single = Sweep::prepare(&model, &req.pair_request(i).unwrap(), 10)
            .unwrap()
            .run(&SweepOptions::default(), &AtomicBool::new(false), &mut |_| {})
            .unwrap();
        for (a, b) in r.patched_logit_diff.flat().iter().zip(single.patched_logit_diff.flat()) {
            assert!((a.unwrap() - b.unwrap()).abs() <= 1e-5, "pair {i}: {a:?} vs {b:?}");
        }
    }
    result.aggregate();
    let agg = result.aggregate.as_ref().unwrap();
    let (shape, stacked) = result.stacked(Metric::Normalized);
    assert_eq!(shape, [3, 3, 16]);
    let cells = 3 * 16;
    for c in 0..cells {
        let column: Vec<f64> = (0..3).map(|p| stacked[p * cells + c]).collect();
        let mean = column.iter().sum::<f64>() / 3.0;
        let sd = (column.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 3.0).sqrt();
        let got = |g: &patchbay::patching::grid::Grid<Option<f64>>| g.flat()[c].unwrap();
        assert!((got(&agg.mean["normalized"]) - mean).abs() < 1e-12);
        assert!((got(&agg.sd["normalized"]) - sd).abs() < 1e-12);
        assert_eq!(agg.n["normalized"].flat()[c], 3);
    }
    // The mean as a single-sweep result draws like one.
    let view = result.mean_view().unwrap();
    assert_eq!(view.shape, [3, 16]);
    assert!(
        view.model.id.contains("tiny ioi, mean over 3 pairs"),
        "{}",
        view.model.id
    );
}

#[test]
fn template_pairs_of_different_lengths_line_up_on_named_positions() {
    let (_dir, model) = tiny("tiny-qwen3");
    let dataset = generate(Template::Ioi, 6, 3, &model.tokenizer, false).unwrap();
    assert!(!dataset.pairs.is_empty());
    let req = request(dataset.clone());
    let mut result = run(
        &model,
        &req,
        &SweepOptions::default(),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    result.aggregate();
    let layout = result.layout().unwrap();
    assert_eq!(layout.positions, 5, "IO, S1, S1+1, S2, END");
    // Each aggregate cell reads each pair at its own token index.
    let last = layout.layers - 1;
    for (p, r) in result.swept() {
        let end = dataset.pairs[p].positions[4];
        assert_eq!(end, r.positions() - 1);
        let at = layout.at(last * 5 + 4);
        assert_eq!(result.pair_cell(p, at), Some(last * r.positions() + end));
    }
    // Patching the last layer at END restores every pair's clean run: normalized 1 on average.
    let mean = result.aggregate.as_ref().unwrap().mean["normalized"].flat()[last * 5 + 4].unwrap();
    assert!((mean - 1.0).abs() < 1e-6, "{mean}");
}

#[test]
fn bad_pairs_are_named_and_the_others_run_and_a_cancel_keeps_finished_pairs() {
    let (_dir, model) = tiny("tiny-qwen3");
    let dir = TempDir::new("pairs-file");
    let file = dir.0.join("pairs.jsonl");
    let good = tiny_pairs();
    let mut text = String::new();
    text.push_str(&serde_json::to_string(&good[0]).unwrap());
    text.push_str("\n{\"clean\": \"x\"\n");
    text.push_str(&serde_json::to_string(&good[1]).unwrap());
    // A pair of another length: the dataset has no named positions to line it up.
    text.push('\n');
    text.push_str(&serde_json::to_string(&pair("John and Mary went", "John and John went", " to", " and")).unwrap());
    text.push('\n');
    std::fs::write(&file, text).unwrap();
    let dataset = Dataset::load(&file).unwrap();
    assert_eq!(dataset.pairs.len(), 3);
    assert_eq!(dataset.dropped[0].what, "line 2");
    let req = request(dataset);
    let result = run(
        &model,
        &req,
        &SweepOptions::default(),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(result.swept().count(), 2);
    let err = result.pairs[2].error.as_deref().unwrap();
    assert!(err.contains("named positions"), "{err}");

    // Cancel once the first cell a forward computed arrives: every cell that came is kept, the
    // pairs say they are incomplete.
    let cancel = AtomicBool::new(false);
    let mut arrived = 0;
    let result = run(&model, &req, &SweepOptions::default(), &cancel, &mut |e| {
        if let DatasetEvent::Cell { cell, .. } = e {
            arrived += 1;
            if !cell.skipped && cell.at.layer < 2 {
                cancel.store(true, Ordering::SeqCst);
            }
        }
    })
    .unwrap();
    assert!(!result.complete);
    let kept: usize = result.swept().map(|(_, r)| r.done_cells()).sum();
    assert_eq!(kept, arrived, "every cell reported is kept");
    assert!(result.swept().all(|(_, r)| !r.complete));
}

#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn every_template_fits_smollm2_and_names_its_positions() {
    let t = &common::smollm2().tokenizer;
    for template in Template::ALL {
        let d = generate(template, 8, 0, t, false).unwrap();
        assert_eq!(d.pairs.len(), 8, "{template:?}: {:?}", d.dropped);
        for p in &d.pairs {
            let ids = t.encode_prompt(&p.clean).unwrap();
            assert_eq!(p.positions.len(), d.position_names.len());
            assert_eq!(*p.positions.last().unwrap(), ids.len() - 1, "END is the last token");
            let text = |i: usize| t.token_text(ids[p.positions[i]]);
            match template {
                Template::Ioi => assert_eq!(text(0), p.correct),
                Template::GreaterThan => assert_eq!(text(2), "0", "the year's last digit: {p:?}"),
                Template::Factual => assert!(p.clean.contains(text(1).trim()), "{p:?}"),
            }
        }
    }
}
