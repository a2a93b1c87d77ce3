//! The real app driven headlessly with egui_kittest: type prompts, run a sweep on a small model,
//! click a cell, cancel, and see each bad input's message.

mod common;

use std::time::{Duration, Instant};

use common::app::{harness, wait_until};
use common::{IOI_CLEAN, IOI_CORRUPTED, TempDir, fixture_json, smollm2_gguf, write_tiny, write_tiny_model};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use patchbay::app::{PatchbayApp, StartOptions};
use patchbay::patching::{Schedule, SweepOptions};

fn click_at(h: &mut Harness<'static, PatchbayApp>, pos: egui::Pos2) {
    h.hover_at(pos);
    h.step();
    // Press and release in one frame, as kittest's own `click` does.
    h.hover_at(pos);
    for pressed in [true, false] {
        h.event(egui::Event::PointerButton {
            pos,
            button: egui::PointerButton::Primary,
            pressed,
            modifiers: egui::Modifiers::NONE,
        });
    }
    h.run_steps(3);
}

#[test]
fn typed_prompts_sweep_and_clicked_cell_shows_in_inspector() {
    let dir = TempDir::new("gui-sweep");
    let mut h = harness(&write_tiny(&dir, "tiny-qwen3"));
    wait_until(&mut h, "the model to load", |a| a.model().is_some());

    // Type the prompts as a user would.
    h.state_mut().settings_mut().clean.clear();
    h.state_mut().settings_mut().corrupted.clear();
    h.run_steps(2);
    h.get_by_label("Clean prompt").click();
    h.run_steps(1);
    h.get_by_label("Clean prompt").type_text(IOI_CLEAN);
    h.run_steps(2);
    h.get_by_label("Corrupted prompt").click();
    h.run_steps(1);
    h.get_by_label("Corrupted prompt").type_text(IOI_CORRUPTED);
    h.run_steps(3);
    assert_eq!(h.state_mut().settings_mut().clean, IOI_CLEAN);
    assert_eq!(h.state_mut().settings_mut().corrupted, IOI_CORRUPTED);
    // The prompts are shown as token chips (position + token, spaces made visible).
    assert!(h.query_by_label("9·Mary").is_some(), "clean chip at position 9");
    assert!(h.query_by_label("9·John").is_some(), "corrupted chip at position 9");
    assert_eq!(h.query_all_by_label("12·bottle").count(), 2);

    h.get_by_label("Run").click();
    wait_until(&mut h, "the sweep to finish", |a| {
        a.result().is_some_and(|r| r.complete) && !a.is_busy()
    });
    let result = h.state().result().unwrap().clone();
    assert_eq!(result.shape, [3, 16]);
    assert_eq!(result.done_cells(), 48);

    // Click the cell at layer 2, last position.
    let pos = h.state().cell_screen_pos(2, 15).expect("heatmap drawn");
    click_at(&mut h, pos);
    assert_eq!(h.state().selected(), Some((2, 15)));
    assert!(
        h.query_by_label_contains("layer 2, position 15").is_some(),
        "inspector names the cell"
    );
    let top = &result.top_k[2][15][0];
    assert!(
        h.query_all_by_label(&format!("{:?}", top.token)).count() >= 1,
        "inspector lists the patched run top token"
    );
    assert!(h.query_by_label("patched run").is_some());
    // The answer logits of the patched, clean and corrupted runs.
    assert!(h.query_by_label("logit(\" John\")").is_some());
    let [a, b] = result.answer_logits[2][15].expect("computed");
    assert!(
        h.query_all_by_label(&format!("{:+.3}", a - b)).count() >= 1,
        "patched LD in the inspector (the last layer at the last position equals the clean run's)"
    );

    // Arrow keys move the selection.
    h.key_press(egui::Key::ArrowUp);
    h.run_steps(2);
    assert_eq!(h.state().selected(), Some((1, 15)));
}

#[test]
fn bad_inputs_show_their_messages() {
    let dir = TempDir::new("gui-bad");
    let mut h = harness(&write_tiny(&dir, "tiny-qwen3"));
    wait_until(&mut h, "the model to load", |a| a.model().is_some());

    // A multi-token answer is flagged and Run is disabled.
    h.state_mut().settings_mut().correct = " Johnathan".into();
    h.run_steps(3);
    assert!(h.query_by_label_contains("answers must be one token").is_some());
    h.get_by_label("Run").click();
    h.run_steps(3);
    assert!(h.state().result().is_none(), "Run is disabled");
    h.state_mut().settings_mut().correct = " John".into();

    // Prompts of different token lengths are flagged before Run.
    h.state_mut().settings_mut().corrupted =
        "After John and Mary went to the big store, John gave a bottle of milk to".into();
    h.run_steps(3);
    assert!(h.query_by_label_contains("Token counts differ").is_some());

    // An empty prompt is refused by the worker with a message.
    h.state_mut().settings_mut().corrupted = IOI_CORRUPTED.into();
    h.state_mut().settings_mut().clean = String::new();
    h.run_steps(2);
    h.get_by_label("Run").click();
    wait_until(&mut h, "the refusal", |a| a.sweep_error().is_some());
    assert!(h.query_by_label_contains("clean prompt is empty").is_some());

    // A missing model file: a message, and the loaded model stays usable.
    h.state_mut().load_model("/nonexistent/model.gguf");
    h.run_steps(3);
    assert!(h.query_by_label_contains("model not found").is_some());
    assert!(h.state().model().is_some());
}

/// Run shows the cells a sweep computes; above the limit it asks first, and "Don't run" runs nothing.
#[test]
fn a_large_sweep_asks_before_it_runs() {
    let dir = TempDir::new("gui-large");
    let mut h = harness(&write_tiny(&dir, "tiny-qwen3"));
    wait_until(&mut h, "the model to load", |a| a.model().is_some());
    h.run_steps(3);
    // IOI on the 3-layer model: positions 9..16 differ onwards, 3 × 7 cells.
    assert!(h.query_by_label_contains("21 cells to compute").is_some());

    // The limit (20,000 cells by default) set low, and prompts long enough to pass it.
    h.state_mut().settings_mut().confirm_above_cells = 50;
    h.state_mut().settings_mut().clean = format!("{IOI_CLEAN} {IOI_CLEAN}");
    h.state_mut().settings_mut().corrupted = format!("{IOI_CORRUPTED} {IOI_CLEAN}");
    h.run_steps(3);
    let cells = h.state().cells_to_compute().expect("equally long prompts");
    assert!(cells > 50, "{cells} cells");
    h.get_by_label("Run").click();
    h.run_steps(3);
    assert!(h.query_by_label_contains("A large sweep").is_some(), "the confirmation");
    h.get_by_label("Don't run").click();
    h.run_steps(5);
    assert!(h.query_by_label_contains("A large sweep").is_none());
    assert!(h.state().result().is_none() && !h.state().is_busy(), "nothing ran");
}

/// The app on SmolLM2, part-way through a deliberately slow sweep (naive, one cell per forward),
/// with a few computed cells beyond the 270 skipped ones.
fn smollm2_mid_sweep() -> Harness<'static, PatchbayApp> {
    let gguf = smollm2_gguf();
    let mut h = harness(&gguf.to_string_lossy());
    wait_until(&mut h, "SmolLM2 to load", |a| a.model().is_some());
    h.state_mut().set_sweep_options(SweepOptions {
        schedule: Schedule::Naive,
        batch_cells: 1,
        ..SweepOptions::default()
    });
    h.get_by_label("Run").click();
    wait_until(&mut h, "the first computed cells", |a| {
        a.result().is_some_and(|r| r.done_cells() > 272)
    });
    h
}

#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn cancel_mid_sweep_keeps_finished_cells() {
    let mut h = smollm2_mid_sweep();
    // The status bar: the elapsed time and an ETA from the work reported so far.
    h.run_steps(2);
    assert!(h.query_by_label_contains("· eta ").is_some(), "no ETA while running");
    h.get_by_label("Cancel").click();
    wait_until(&mut h, "the cancel", |a| {
        a.result().is_some_and(|r| !r.complete) && !a.is_busy()
    });
    let r = h.state().result().unwrap();
    let kept = r.done_cells();
    assert!(kept > 272 && kept < 480, "kept {kept}");
    assert!(h.query_by_label_contains("sweep cancelled").is_some());
}

#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn closing_the_window_mid_sweep_returns_promptly() {
    let h = smollm2_mid_sweep();
    let start = Instant::now();
    drop(h);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "closing took {:?}",
        start.elapsed()
    );
}

/// `patchbay gui --clean … --corrupted … --correct … --incorrect … --component … --run`: the app
/// starts on those settings rather than the remembered ones and sweeps them once the model loads.
#[test]
fn command_line_settings_start_the_app_and_run() {
    let dir = TempDir::new("gui-overrides");
    let model = write_tiny(&dir, "tiny-qwen3");
    let clean = "When Tom and Anna went to the park, Anna gave a ball to";
    let corrupted = "When Tom and Anna went to the park, Tom gave a ball to";
    let start = StartOptions {
        model: Some(model),
        fresh: true,
        run_on_load: true,
        overrides: patchbay::app::Overrides {
            clean: Some(clean.into()),
            corrupted: Some(corrupted.into()),
            correct: Some(" Tom".into()),
            incorrect: Some(" Anna".into()),
            component: Some(patchbay::patching::Component::MlpOut),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut h = Harness::builder()
        .with_size(egui::vec2(1400.0, 860.0))
        .with_max_steps(100_000)
        .allow_missing_glyphs()
        .build_eframe(move |cc| PatchbayApp::new(cc, start));
    wait_until(&mut h, "the sweep to finish", |a| {
        a.result().is_some_and(|r| r.complete) && !a.is_busy()
    });
    let result = h.state().result().unwrap().clone();
    assert_eq!(result.clean.text, clean);
    assert_eq!(result.corrupted.text, corrupted);
    assert_eq!(
        (result.correct.text.as_str(), result.incorrect.text.as_str()),
        (" Tom", " Anna")
    );
    assert_eq!(result.component, patchbay::patching::Component::MlpOut);
    // The editors show them, and no preset claims them.
    assert_eq!(h.state_mut().settings_mut().clean, clean);
    assert_eq!(h.state_mut().settings_mut().preset, None);
}

/// Every preset's name and note draws with the bundled fonts (the harness panics on a missing
/// glyph unless told otherwise), and the note is body-size text.
#[test]
fn presets_draw_without_missing_glyphs() {
    let dir = TempDir::new("gui-glyphs");
    let start = StartOptions {
        model: Some(write_tiny(&dir, "tiny-qwen3")),
        fresh: true,
        ..Default::default()
    };
    let mut h = Harness::builder()
        .with_size(egui::vec2(1400.0, 860.0))
        .with_max_steps(100_000)
        .build_eframe(move |cc| PatchbayApp::new(cc, start));
    wait_until(&mut h, "the model to load", |a| a.model().is_some());
    for preset in patchbay::app::presets::presets() {
        h.state_mut().settings_mut().preset = Some(preset.name.clone());
        h.run_steps(2);
        assert!(h.query_by_label(&preset.explanation).is_some(), "{}", preset.name);
    }
    h.get_by_label("Preset").click();
    h.run_steps(3);
    for preset in patchbay::app::presets::presets() {
        // Listed, with "(does not fit)" where the tiny vocabulary cannot run it.
        assert!(
            h.query_by_label_contains(&preset.name).is_some(),
            "{} listed",
            preset.name
        );
    }
}

/// Once the prompts change after a sweep, the heatmap says it belongs to the previous ones and
/// the previous runs' suggestions go; "Save to" writes where no file dialog exists.
#[test]
fn a_previous_heatmap_is_marked_and_results_save_to_a_typed_path() {
    let dir = TempDir::new("gui-stale");
    let mut h = harness(&write_tiny(&dir, "tiny-qwen3"));
    wait_until(&mut h, "the model to load", |a| a.model().is_some());
    h.get_by_label("Run").click();
    wait_until(&mut h, "the sweep", |a| {
        a.result().is_some_and(|r| r.complete) && !a.is_busy()
    });
    let stale = "This heatmap is from the previous prompts";
    assert!(h.query_by_label_contains(stale).is_none());
    assert!(h.query_by_label("clean run's top:").is_some());

    h.state_mut().settings_mut().clean = IOI_CORRUPTED.into();
    h.state_mut().settings_mut().corrupted = IOI_CLEAN.into();
    h.run_steps(3);
    assert!(
        h.query_by_label_contains(stale).is_some(),
        "marked as the previous prompts'"
    );
    assert!(
        h.query_by_label("clean run's top:").is_none(),
        "the previous runs' suggestions go"
    );
    h.state_mut().settings_mut().clean = IOI_CLEAN.into();
    h.state_mut().settings_mut().corrupted = IOI_CORRUPTED.into();
    h.run_steps(3);
    assert!(h.query_by_label_contains(stale).is_none());

    // "Save to": a typed file name, in the format its extension names.
    let out = dir.0.join("typed.csv");
    h.state_mut().settings_mut().save_path = out.to_string_lossy().into_owned();
    h.run_steps(2);
    h.get_by_label("Save").click_accesskit();
    wait_until(&mut h, "the save", |a| a.message().is_some());
    assert_eq!(
        h.state().message().map(|(_, error)| *error),
        Some(false),
        "{:?}",
        h.state().message()
    );
    assert!(std::fs::read_to_string(&out).unwrap().starts_with("layer,position,"));
    h.state_mut().settings_mut().save_path = dir.0.join("no-such-folder/r.json").to_string_lossy().into_owned();
    h.run_steps(2);
    h.get_by_label("Save").click_accesskit();
    wait_until(&mut h, "the refusal", |a| a.message().is_some_and(|(_, error)| *error));
    assert!(h.query_by_label_contains("the folder does not exist").is_some());
}

#[test]
fn a_head_sweep_draws_layers_by_heads_switches_metric_at_once_and_shows_the_pattern() {
    let dir = TempDir::new("gui-heads");
    let mut h = harness(&write_tiny(&dir, "tiny-qwen3"));
    wait_until(&mut h, "the model to load", |a| a.model().is_some());
    {
        let s = h.state_mut().settings_mut();
        s.clean = IOI_CLEAN.into();
        s.corrupted = IOI_CORRUPTED.into();
        s.component = patchbay::patching::Component::HeadOut;
        s.direction = patchbay::patching::Direction::Noising;
    }
    h.run_steps(3);
    // 3 layers × 4 heads, every position of a head at once.
    assert!(
        h.query_by_label("12 cells to compute").is_some(),
        "cell count beside Run"
    );
    h.get_by_label("Run").click();
    wait_until(&mut h, "the head sweep to finish", |a| {
        a.result().is_some_and(|r| r.complete) && !a.is_busy()
    });
    let result = h.state().result().unwrap().clone();
    assert_eq!(result.shape, [3, 4]);
    // With one sweep's speed known, Run also says about how long the next one takes.
    assert!(
        h.query_by_label_contains("12 cells to compute, about").is_some(),
        "a time estimate beside Run"
    );
    assert_eq!(result.direction, patchbay::patching::Direction::Noising);
    assert!(
        h.query_by_label_contains("head_out (noising), normalized").is_some(),
        "the title names the component, direction and metric"
    );

    // Switching the metric redraws from the stored cells: no new sweep starts.
    let sweeps_before = result.timing.sweep_seconds;
    h.get_by_label("Metric").click();
    h.run_steps(2);
    h.get_by_label("kl").click();
    h.run_steps(3);
    assert_eq!(h.state().shown().metric, patchbay::patching::Metric::Kl);
    assert!(!h.state().is_busy());
    assert_eq!(h.state().result().unwrap().timing.sweep_seconds, sweeps_before);
    assert!(h.query_by_label_contains("head_out (noising), kl").is_some());

    // A head cell shows its attention pattern in the three runs, computed on demand.
    let pos = h.state().cell_screen_pos(2, 1).expect("heatmap drawn");
    click_at(&mut h, pos);
    assert_eq!(h.state().selected(), Some((2, 1)));
    let start = Instant::now();
    while h.query_by_label_contains("attention from the last position").is_none() {
        assert!(start.elapsed() < Duration::from_secs(60), "the pattern never came");
        h.step();
        std::thread::sleep(Duration::from_millis(10));
    }
    for run in ["H1 clean", "H1 corrupted", "H1 patched"] {
        assert!(h.query_by_label(run).is_some(), "{run} row");
    }
}

#[test]
fn gpt2_prepend_bos_is_offered_shown_as_chip_0_and_recorded() {
    let dir = TempDir::new("gui-gpt2-bos");
    let config = &fixture_json("family_reference.json")["models"]["tiny-gpt2"]["config"];
    write_tiny_model(&dir.0, config);
    let mut h = harness(&dir.0.to_string_lossy());
    wait_until(&mut h, "the model to load", |a| a.model().is_some());
    // Off by default, as in HF: the subject is at position 9.
    assert!(h.query_by_label("9·Mary").is_some());
    h.get_by_label("Prepend BOS").click();
    h.run_steps(3);
    assert!(h.state_mut().settings_mut().prepend_bos);
    assert_eq!(
        h.query_all_by_label("0<|endoftext|>").count(),
        2,
        "BOS is chip 0 of both prompts"
    );
    assert!(h.query_by_label("10·Mary").is_some(), "every position moves by one");
    h.get_by_label("Run").click();
    wait_until(&mut h, "the sweep to finish", |a| {
        a.result().is_some_and(|r| r.complete) && !a.is_busy()
    });
    let result = h.state().result().unwrap().clone();
    assert!(result.prepend_bos, "recorded in the result");
    assert_eq!(result.shape, [3, 17]);

    // A preset whose answers the tiny vocabulary splits is marked, and says why.
    h.get_by_label("Preset").click();
    h.run_steps(2);
    let misfit = h
        .query_all_by_label_contains("(does not fit)")
        .next()
        .expect("a preset marked as not fitting the tiny vocabulary");
    misfit.click();
    h.run_steps(3);
    assert!(
        h.query_by_label_contains("This preset does not fit").is_some(),
        "the reason is shown under the picker"
    );
}

#[test]
fn the_estimate_is_drawn_first_then_the_top_cells_verified_and_both_shown() {
    let dir = TempDir::new("gui-estimate");
    let mut h = harness(&write_tiny(&dir, "tiny-qwen3"));
    wait_until(&mut h, "the model to load", |a| a.model().is_some());
    // The default: an AtP* estimate first. Verify only the top 5, through the picker.
    assert!(h.query_by_label("Estimate first").is_some());
    h.get_by_label("verified exactly").click();
    h.run_steps(2);
    h.get_by_label("the top").click();
    h.run_steps(2);
    h.state_mut().settings_mut().verify_top = 5;
    h.get_by_label("Run").click();
    wait_until(&mut h, "the sweep to finish", |a| {
        a.result().is_some_and(|r| r.complete) && !a.is_busy()
    });
    let r = h.state().result().unwrap().clone();
    let estimate = r.estimate.as_ref().expect("the sweep drew an estimate");
    assert!(estimate.logit_diff.flat().iter().all(Option::is_some));
    let verified = r.verified.as_ref().unwrap().flat().iter().filter(|v| **v).count();
    let skipped = r.skipped.flat().iter().filter(|s| **s).count();
    // The no-op cells, the last layer's (free with the baselines) and the top 5.
    assert_eq!(verified, skipped + 7 + 5);
    assert!(
        h.query_by_label_contains("verified · max |exact − est|").is_some(),
        "the status bar says how far the estimate was off"
    );
    assert!(
        h.query_by_label_contains("AtP* estimate vs exact").is_some(),
        "the scatter"
    );
    // An unverified cell shows its estimate, marked as one.
    let layout = r.layout();
    let unverified = (0..layout.len())
        .find(|&i| !r.verified.as_ref().unwrap().flat()[i])
        .expect("an unverified cell");
    let at = layout.at(unverified);
    let pos = h
        .state()
        .cell_screen_pos(at.layer, at.position.unwrap())
        .expect("heatmap drawn");
    click_at(&mut h, pos);
    assert!(h.query_by_label_contains("not verified yet; AtP* estimate").is_some());
    assert!(h.query_by_label_contains("normalized ≈").is_some());
    // Figures and .npy can draw the estimate: every cell has a value then.
    // (Through accesskit: the controls sit below the fold of the left panel at this size.)
    h.get_by_label("figures show").click_accesskit();
    h.run_steps(2);
    h.get_by_label("the estimate").click_accesskit();
    h.run_steps(2);
    let npy = dir.0.join("estimate.npy");
    h.state_mut().settings_mut().save_path = npy.to_string_lossy().into_owned();
    h.run_steps(2);
    h.get_by_label("Save").click_accesskit();
    wait_until(&mut h, "the save", |a| a.message().is_some());
    let bytes = std::fs::read(&npy).unwrap();
    let header = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert!(
        bytes[10 + header..]
            .chunks_exact(8)
            .all(|b| f64::from_le_bytes(b.try_into().unwrap()).is_finite()),
        "the estimate of every cell"
    );
}

#[test]
fn a_generated_dataset_runs_shows_its_mean_a_cells_distribution_and_each_pair() {
    let dir = TempDir::new("gui-dataset");
    // Tall enough for the dataset controls at the bottom of the left panel.
    let start = StartOptions {
        model: Some(write_tiny(&dir, "tiny-qwen3")),
        fresh: true,
        ..Default::default()
    };
    let mut h = Harness::builder()
        .with_size(egui::vec2(1400.0, 1500.0))
        .with_max_steps(100_000)
        .allow_missing_glyphs()
        .build_eframe(move |cc| PatchbayApp::new(cc, start));
    wait_until(&mut h, "the model to load", |a| a.model().is_some());
    h.state_mut().settings_mut().dataset_n = 4;
    h.get_by_label("Dataset: many pairs, averaged").click();
    h.run_steps(2);
    h.get_by_label("Generate").click();
    h.run_steps(2);
    assert!(h.query_by_label_contains("columns: IO, S1, S1+1, S2, END").is_some());
    h.get_by_label("Run dataset").click();
    wait_until(&mut h, "the dataset to finish", |a| {
        a.dataset_finished() && !a.is_busy()
    });
    h.run_steps(3);
    let d = h.state().dataset_result().unwrap().clone();
    assert!(d.complete);
    let n = d.swept().count();
    assert!(n >= 1);
    // The heatmap shows the mean over pairs on the named positions.
    let mean = h.state().result().unwrap().clone();
    assert_eq!(mean.shape, [3, 5]);
    assert!(
        h.query_by_label_contains(&format!("showing the mean over {n} pairs"))
            .is_some()
    );
    // A cell's distribution over pairs.
    let pos = h.state().cell_screen_pos(1, 4).expect("heatmap drawn");
    click_at(&mut h, pos);
    assert!(
        h.query_by_label_contains(&format!("over {n} pairs: mean")).is_some(),
        "the selected cell's distribution"
    );
    // A pair's own heatmap, and back.
    h.query_all_by_label_contains(", S ")
        .next()
        .expect("pair 0 in the list (its label names IO and S)")
        .click();
    h.run_steps(3);
    assert!(h.query_by_label_contains("showing pair 0 alone").is_some());
    let own = h.state().result().unwrap().shape.clone();
    assert_eq!(own[0], 3);
    assert_ne!(own[1], 5, "the pair's own token positions");
    h.get_by_label("← the mean over pairs").click();
    h.run_steps(3);
    assert_eq!(h.state().result().unwrap().shape, [3, 5]);
    // Save writes the dataset (each pair and the aggregate) while the mean is shown.
    let saved = dir.0.join("dataset.json");
    h.state_mut().settings_mut().save_path = saved.to_string_lossy().into_owned();
    h.run_steps(2);
    h.get_by_label("Save").click();
    wait_until(&mut h, "the save", |a| a.message().is_some());
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(json["format"], "patchbay-dataset/1");
    assert_eq!(json["pairs"].as_array().unwrap().len(), d.pairs.len());
}
