//! The fast schedule (causal cones, packed) computes the same cells as the naive one (one full
//! forward per cell), for every component, on the random-weight models and on SmolLM2.

mod common;

use std::sync::atomic::AtomicBool;

use common::{ioi_request, smollm2, tiny, tiny_configs, tiny_request};
use patchbay::model::{DeviceChoice, DtypeChoice, Model, ModelSource};
use patchbay::patching::result::SweepResult;
use patchbay::patching::{Component, Direction, Metric};
use patchbay::patching::{Schedule, Sweep, SweepEvent, SweepOptions, TokenSweepRequest};

/// The bar: both schedules agree within this in raw logit difference on every cell.
const SCHEDULE_TOLERANCE: f64 = 1e-4;

fn options(schedule: Schedule) -> SweepOptions {
    SweepOptions {
        schedule,
        // Rows per naive forward: the cells are the same, the test just runs faster.
        batch_cells: 32,
        ..SweepOptions::default()
    }
}

fn run(prepared: Sweep, schedule: Schedule) -> SweepResult {
    let mut streamed = 0;
    let options = options(schedule);
    let progress = prepared.progress(&options);
    let (mut work, mut work_reports) = (0.0, 0);
    let result = prepared
        .run_observed(&options, &AtomicBool::new(false), &mut |event| match event {
            SweepEvent::Cell(_) => streamed += 1,
            SweepEvent::Work(w) => {
                assert!(w > 0.0, "work is only taken back after a failed block");
                work += w;
                work_reports += 1;
            }
            SweepEvent::Estimated(_) | SweepEvent::Planned { .. } => panic!("no estimate was asked for"),
        })
        .unwrap();
    // The work reported adds up to the progress's total: the bar ends full, never past it.
    assert_eq!(work, progress.total(), "{schedule:?}");
    if schedule == Schedule::Fast && !result.component.has_heads() {
        // Layer by layer within each block, then its cells' unembeddings. (A block of the last
        // layer's head cells runs no layer, only the unembedding.)
        let forwards = &result.timing.forwards;
        assert!(
            work_reports >= 2 * forwards.len(),
            "{work_reports} reports, {} forwards",
            forwards.len()
        );
    }
    assert!(result.complete);
    assert_eq!(streamed, result.layout().len(), "every cell is streamed once");
    assert_eq!(result.done_cells(), streamed);
    assert_eq!(result.timing.schedule, schedule);
    assert_forwards_account_for_the_cells(&result, schedule);
    result
}

/// `timing.forwards` holds every forward after the baselines, with its cells and its work: the
/// naive schedule's full forwards, or the fast one's cones (each a patch at (L, P) running layers
/// from its start layer on positions P..), the last layer's cells aside (computed with the
/// baselines, except for resid_pre).
fn assert_forwards_account_for_the_cells(result: &SweepResult, schedule: Schedule) {
    let per_position = [
        Component::ResidPre,
        Component::ResidPost,
        Component::ResidMid,
        Component::AttnOut,
        Component::MlpOut,
    ];
    if !per_position.contains(&result.component) {
        return;
    }
    let (layers, seq) = (result.layers(), result.positions());
    let first_diff = result.skipped[0].iter().take_while(|&&s| s).count();
    let forwards = &result.timing.forwards;
    let cells: usize = forwards.iter().map(|f| f.cells).sum();
    let token_layers: usize = forwards.iter().map(|f| f.token_layers).sum();
    assert!(
        forwards
            .iter()
            .all(|f| f.cells > 0 && f.forward_seconds >= 0.0 && f.cells_seconds >= 0.0)
    );
    match schedule {
        Schedule::Naive => {
            assert_eq!(cells, result.timing.cells_computed);
            assert!(forwards.iter().all(|f| f.token_layers == f.cells * layers * seq));
        }
        Schedule::Fast => {
            let (start, last_layer_cells) = match result.component {
                Component::ResidPre => (0, 0),
                _ => (1, seq - first_diff),
            };
            assert_eq!(cells, result.timing.cells_computed - last_layer_cells);
            let cones: usize = (0..layers)
                .filter(|&l| l + start < layers)
                .flat_map(|l| (first_diff..seq).map(move |p| (layers - l - start) * (seq - p)))
                .sum();
            assert_eq!(token_layers, cones, "{:?}", result.component);
        }
    }
}

/// Every cell agrees: raw logit difference, skipped flag, and the top-k logits.
fn assert_same_cells(naive: &SweepResult, fast: &SweepResult, what: &str) {
    assert_eq!(naive.shape, fast.shape);
    assert_eq!(naive.timing.cells_computed, fast.timing.cells_computed, "{what}");
    assert_eq!(naive.skipped, fast.skipped, "{what}: skipped cells");
    let layout = naive.layout();
    let mut worst = (0.0f64, layout.at(0));
    for (i, at) in layout.cells().enumerate() {
        let a = naive.patched_logit_diff.flat()[i].expect("naive computed every cell");
        let b = fast.patched_logit_diff.flat()[i].expect("fast computed every cell");
        if (a - b).abs() > worst.0 {
            worst = ((a - b).abs(), at);
        }
        let (ka, kb) = (&naive.top_k.flat()[i], &fast.top_k.flat()[i]);
        assert_eq!(ka.len(), kb.len(), "{what} {at:?}: top-k length");
        for (x, y) in ka.iter().zip(kb) {
            assert!(
                (f64::from(x.logit) - f64::from(y.logit)).abs() <= SCHEDULE_TOLERANCE,
                "{what} {at:?}: top-k logits {} vs {}",
                x.logit,
                y.logit
            );
        }
        for m in Metric::ALL {
            let (x, y) = (naive.metric_at(m, i), fast.metric_at(m, i));
            // A rank moves by one where two of a random model's crowded logits tie within rounding.
            let tolerance = match m {
                Metric::Rank => 1.0,
                _ => SCHEDULE_TOLERANCE * x.unwrap_or(0.0).abs().max(1.0) * 10.0,
            };
            let close = match (x, y) {
                (Some(x), Some(y)) => (x - y).abs() <= tolerance,
                (x, y) => x == y,
            };
            assert!(close, "{what} {at:?}: {m} {x:?} vs {y:?}");
        }
    }
    assert!(
        worst.0 <= SCHEDULE_TOLERANCE,
        "{what}: naive and fast differ by {:e} in raw logit difference at {:?}",
        worst.0,
        worst.1
    );
}

/// Every site a sweep can patch: each component, head components also by position.
fn sites() -> Vec<(Component, bool)> {
    Component::ALL
        .into_iter()
        .flat_map(|c| {
            let by_position: &[bool] = if c.has_heads() { &[false, true] } else { &[false] };
            by_position.iter().map(move |&b| (c, b))
        })
        .collect()
}

#[test]
fn tiny_models_agree_on_every_site_and_direction() {
    // The tiny models include GQA (tiny-qwen3: 4 query heads sharing 2 key/value heads) and MHA.
    for (name, _) in tiny_configs() {
        let (_dir, model) = tiny(&name);
        for (component, by_position) in sites() {
            for direction in Direction::ALL {
                let mut request = tiny_request(component);
                request.direction = direction;
                request.by_position = by_position;
                let naive = run(Sweep::prepare(&model, &request, 10).unwrap(), Schedule::Naive);
                let fast = run(Sweep::prepare(&model, &request, 10).unwrap(), Schedule::Fast);
                let what = format!("{name} {component} by_position={by_position} {direction}");
                assert_same_cells(&naive, &fast, &what);
                // The no-op cells hold the target run's numbers: corrupted when denoising, clean
                // when noising.
                let target = match direction {
                    Direction::Denoising => fast.corrupted_logit_diff,
                    Direction::Noising => fast.clean_logit_diff,
                };
                for (i, &skipped) in fast.skipped.flat().iter().enumerate() {
                    if skipped {
                        assert_eq!(fast.patched_logit_diff.flat()[i], Some(target), "{what}");
                    }
                }
            }
        }
    }
}

/// Prompts that differ at their first token (cones with no cached prefix), only at their last (one
/// position to patch: the baselines share every other token), in two places, and not at all
/// (nothing to compute).
#[test]
fn tiny_models_agree_wherever_the_prompts_differ() {
    let cases: [(&str, Vec<u32>, Vec<u32>); 4] = [
        ("first token", vec![5, 17, 33, 8, 90, 12], vec![6, 17, 33, 8, 90, 12]),
        ("last token", vec![5, 17, 33, 8, 90, 12], vec![5, 17, 33, 8, 90, 13]),
        (
            "two tokens",
            vec![5, 17, 33, 8, 90, 12, 7],
            vec![5, 17, 34, 8, 90, 11, 7],
        ),
        ("identical", vec![5, 17, 33, 8], vec![5, 17, 33, 8]),
    ];
    for (name, _) in tiny_configs() {
        let (_dir, model) = tiny(&name);
        for (case, clean_ids, corrupted_ids) in &cases {
            for (component, by_position) in sites() {
                let request = TokenSweepRequest {
                    clean_ids: clean_ids.clone(),
                    corrupted_ids: corrupted_ids.clone(),
                    correct_id: 3,
                    incorrect_id: 4,
                    component,
                    direction: Direction::Noising,
                    by_position,
                };
                let naive = run(Sweep::prepare_tokens(&model, &request, 5).unwrap(), Schedule::Naive);
                let fast = run(Sweep::prepare_tokens(&model, &request, 5).unwrap(), Schedule::Fast);
                assert_same_cells(&naive, &fast, &format!("{name} {component} ({case})"));
                if *case == "identical" {
                    assert_eq!(fast.timing.cells_computed, 0);
                }
            }
        }
    }
}

#[test]
fn cancelling_a_fast_sweep_keeps_the_cells_it_finished() {
    let (name, _) = tiny_configs().remove(0);
    let (_dir, model) = tiny(&name);
    for (component, by_position) in [(Component::ResidPost, false), (Component::HeadOut, true)] {
        let request = TokenSweepRequest {
            clean_ids: (10..26).collect(),
            corrupted_ids: (10..26).map(|i| if i == 19 { 99 } else { i }).collect(),
            correct_id: 3,
            incorrect_id: 4,
            component,
            direction: Default::default(),
            by_position,
        };
        let cancel = AtomicBool::new(false);
        let mut computed = 0;
        let result = Sweep::prepare_tokens(&model, &request, 5)
            .unwrap()
            .run(&options(Schedule::Fast), &cancel, &mut |cell| {
                if !cell.skipped {
                    computed += 1;
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .unwrap();
        assert!(!result.complete, "{component}");
        let layout = result.layout();
        assert!(
            computed > 0 && computed < layout.cells_to_compute(9),
            "{component}: {computed} cells before stopping"
        );
        assert_eq!(result.timing.cells_computed, computed, "{component}");
        assert_eq!(
            result.done_cells(),
            computed + result.timing.cells_skipped,
            "{component}"
        );
    }
}

/// Multi-head attention (as many key/value heads as query heads) as well as the GQA of the
/// reference models: both schedules agree on every site and direction.
#[test]
fn an_mha_model_agrees_on_every_site_and_direction() {
    let (_, mut config) = tiny_configs()
        .into_iter()
        .find(|(n, _)| n == "tiny-llama")
        .expect("tiny-llama");
    config["num_key_value_heads"] = config["num_attention_heads"].clone();
    let dir = common::TempDir::new("tiny-mha");
    common::write_tiny_model(&dir.0, &config);
    let model = common::load_folder(&dir.0);
    assert_eq!(model.config.num_heads, model.config.num_kv_heads);
    for (component, by_position) in sites() {
        for direction in Direction::ALL {
            let mut request = tiny_request(component);
            request.direction = direction;
            request.by_position = by_position;
            let naive = run(Sweep::prepare(&model, &request, 10).unwrap(), Schedule::Naive);
            let fast = run(Sweep::prepare(&model, &request, 10).unwrap(), Schedule::Fast);
            assert_same_cells(
                &naive,
                &fast,
                &format!("MHA {component} by_position={by_position} {direction}"),
            );
        }
    }
}

fn smollm2_agrees(component: Component) {
    let model = smollm2();
    let request = ioi_request(component);
    let naive = run(Sweep::prepare(model, &request, 10).unwrap(), Schedule::Naive);
    let fast = run(Sweep::prepare(model, &request, 10).unwrap(), Schedule::Fast);
    assert_eq!(fast.timing.cells_computed, 30 * 7);
    assert_same_cells(&naive, &fast, &format!("SmolLM2 {component}"));
}

// Naive SmolLM2 sweeps take ~25 s each in a debug build: the residual stream and the attention
// output (the one whose cone starts after a recomputed MLP) here; the tiny models cover all four.
#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn smollm2_resid_post_agrees() {
    smollm2_agrees(Component::ResidPost);
}

#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn smollm2_attn_out_agrees() {
    smollm2_agrees(Component::AttnOut);
}

/// The benchmark's notebook-loop baseline runs a forward for the no-op cells too; they come out
/// equal to the corrupted run, which is what the other schedules fill in without computing.
#[test]
fn naive_with_no_op_cells_computes_them_as_no_ops() {
    let (name, _) = tiny_configs().remove(0);
    let (_dir, model) = tiny(&name);
    let request = TokenSweepRequest {
        clean_ids: vec![5, 17, 33, 8, 90, 12, 7],
        corrupted_ids: vec![5, 17, 33, 8, 91, 12, 7],
        correct_id: 3,
        incorrect_id: 4,
        component: Component::ResidPost,
        direction: Default::default(),
        by_position: false,
    };
    let notebook = SweepOptions {
        skip_noops: false,
        ..options(Schedule::Naive)
    };
    let prepared = Sweep::prepare_tokens(&model, &request, 5).unwrap();
    let first_diff = prepared.first_diff();
    assert_eq!(first_diff, 4);
    let all = prepared.run(&notebook, &AtomicBool::new(false), &mut |_| {}).unwrap();
    let fast = run(Sweep::prepare_tokens(&model, &request, 5).unwrap(), Schedule::Fast);
    assert_eq!(all.timing.cells_computed, all.layers() * all.positions());
    assert_eq!(all.timing.cells_skipped, 0);
    for l in 0..all.layers() {
        for p in 0..all.positions() {
            assert!(!all.skipped[l][p]);
            assert_eq!(fast.skipped[l][p], p < first_diff, "{name} ({l}, {p})");
            let (a, b) = (
                all.patched_logit_diff[l][p].unwrap(),
                fast.patched_logit_diff[l][p].unwrap(),
            );
            assert!((a - b).abs() < SCHEDULE_TOLERANCE, "{name} ({l}, {p}): {a} vs {b}");
        }
    }
}

/// In bf16 the engine takes the paths it takes on a GPU: candle's matmul instead of the skinny
/// kernel, the batched-tensor cone attention, silu then multiply. candle runs bf16 on the CPU too, so
/// this checks those paths here: the two schedules agree, and both follow the f32 sweep, within
/// bf16's precision.
#[test]
fn bf16_sweeps_take_the_device_paths_and_follow_f32() {
    for (name, _) in tiny_configs() {
        let (dir, f32_model) = tiny(&name);
        let bf16_model = Model::load(
            &ModelSource::Folder(dir.0.clone()),
            DeviceChoice::Cpu,
            DtypeChoice::Bf16,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(bf16_model.dtype(), candle_core::DType::BF16);
        for component in [Component::ResidPost, Component::AttnOut] {
            let request = tiny_request(component);
            let reference = run(Sweep::prepare(&f32_model, &request, 5).unwrap(), Schedule::Fast);
            let naive = run(Sweep::prepare(&bf16_model, &request, 5).unwrap(), Schedule::Naive);
            let fast = run(Sweep::prepare(&bf16_model, &request, 5).unwrap(), Schedule::Fast);
            // bf16 keeps ~3 significant digits: compare against the scale of the answer logits.
            let scale = reference
                .answer_logits
                .flat()
                .iter()
                .flatten()
                .flatten()
                .fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
            let gap = |a: &SweepResult, b: &SweepResult| {
                a.patched_logit_diff
                    .flat()
                    .iter()
                    .zip(b.patched_logit_diff.flat())
                    .map(|(x, y)| (x.unwrap() - y.unwrap()).abs())
                    .fold(0.0f64, f64::max)
            };
            let (schedules, precision) = (gap(&naive, &fast), gap(&fast, &reference));
            eprintln!("{name} {component}: scale {scale:.4}, naive-fast {schedules:.2e}, bf16-f32 {precision:.2e}");
            assert!(
                schedules <= 0.05 * scale,
                "{name} {component}: schedules differ by {schedules}"
            );
            assert!(
                precision <= 0.1 * scale,
                "{name} {component}: bf16 is {precision} off f32"
            );
            assert_eq!(naive.skipped, fast.skipped);
        }
    }
}
