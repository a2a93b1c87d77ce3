//! The app driven headless with egui_kittest: a harness on a model, and waiting for the worker.

use std::time::{Duration, Instant};

use egui_kittest::Harness;
use patchbay::app::{PatchbayApp, StartOptions};

/// The longest a test waits for the worker (a load, a sweep).
pub const WAIT: Duration = Duration::from_secs(120);

/// The app in a 1400 × 860 window, fresh settings, loading `model`.
pub fn harness(model: &str) -> Harness<'static, PatchbayApp> {
    let start = StartOptions {
        model: Some(model.to_owned()),
        fresh: true,
        ..Default::default()
    };
    Harness::builder()
        .with_size(egui::vec2(1400.0, 860.0))
        .with_max_steps(100_000)
        .allow_missing_glyphs()
        .build_eframe(move |cc| PatchbayApp::new(cc, start))
}

/// Steps the app until `done` holds (the worker runs in real time).
pub fn wait_until(h: &mut Harness<'static, PatchbayApp>, what: &str, done: impl Fn(&PatchbayApp) -> bool) {
    let start = Instant::now();
    while !done(h.state()) {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        h.step();
        std::thread::sleep(Duration::from_millis(10));
    }
    h.run_steps(3);
}
