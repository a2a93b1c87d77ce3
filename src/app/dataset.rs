//! Datasets in the app: generate pairs for the loaded tokenizer or open a file of them, run them
//! all, watch the mean heatmap fill in as pairs complete, open any pair's own heatmap, and see a
//! cell's distribution over pairs with its outliers named.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded};
use egui::{Color32, RichText, Ui};

use super::{ERROR_TEXT, PatchbayApp, SweepView};
use crate::dataset::result::DatasetResult;
use crate::dataset::run::DatasetRequest;
use crate::dataset::templates::{Template, generate};
use crate::dataset::{Dataset, PromptPair};
use crate::patching::{Cell, Metric, Progress, SweepResult};
use crate::worker::Command;

/// The mean is recomputed at most this often while pairs come in.
const REFRESH: Duration = Duration::from_millis(200);
/// Values further than this many standard deviations from a cell's mean are named as outliers.
const OUTLIER_SD: f64 = 2.0;

/// The dataset side of the app.
#[derive(Default)]
pub(super) struct DatasetState {
    /// Pairs ready to run (generated or opened).
    pub(super) loaded: Option<Dataset>,
    pub(super) error: Option<String>,
    pending_open: Option<Receiver<Option<PathBuf>>>,
    /// The running or finished dataset sweep.
    pub(super) run: Option<DatasetRun>,
}

/// A dataset sweep on the heatmap.
pub(super) struct DatasetRun {
    pub(super) result: DatasetResult,
    /// The pair whose own heatmap is shown; None: the mean over pairs.
    pub(super) showing: Option<usize>,
    dirty: bool,
    refreshed: Instant,
    started: Instant,
    elapsed: Option<f64>,
}

impl PatchbayApp {
    /// The dataset controls under Run: a template with n and seed, or a file; the loaded pairs and
    /// what was dropped; Run dataset.
    pub(super) fn dataset_panel(&mut self, ui: &mut Ui) {
        egui::CollapsingHeader::new("Dataset: many pairs, averaged")
            .default_open(self.dataset.loaded.is_some())
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    egui::ComboBox::from_label("template")
                        .selected_text(self.settings.dataset_template.name())
                        .show_ui(ui, |ui| {
                            for t in Template::ALL {
                                ui.selectable_value(&mut self.settings.dataset_template, t, t.name());
                            }
                        });
                    let n = ui.label("n");
                    ui.add(egui::DragValue::new(&mut self.settings.dataset_n).range(1..=10_000))
                        .labelled_by(n.id);
                    let seed = ui.label("seed");
                    ui.add(egui::DragValue::new(&mut self.settings.dataset_seed))
                        .labelled_by(seed.id);
                });
                ui.horizontal(|ui| {
                    let tokenizer = self.model.as_ref().map(|m| m.tokenizer.clone());
                    if ui
                        .add_enabled(tokenizer.is_some(), egui::Button::new("Generate"))
                        .on_hover_text("Pairs for this model's tokenizer; the same seed gives the same pairs")
                        .on_disabled_hover_text("Load a model first")
                        .clicked()
                        && let Some(t) = tokenizer
                    {
                        let s = &self.settings;
                        match generate(s.dataset_template, s.dataset_n, s.dataset_seed, &t, self.prepend_bos()) {
                            Ok(d) => (self.dataset.loaded, self.dataset.error) = (Some(d), None),
                            Err(e) => self.dataset.error = Some(e.to_string()),
                        }
                    }
                    if ui
                        .button("Open pairs…")
                        .on_hover_text("A JSONL or CSV file with clean, corrupted, correct, incorrect (and label)")
                        .clicked()
                    {
                        self.pick_pairs_file();
                    }
                    if self.dataset.loaded.is_some() && ui.button("Clear").clicked() {
                        self.dataset = DatasetState::default();
                    }
                });
                if let Some(e) = &self.dataset.error {
                    ui.label(RichText::new(e).color(ERROR_TEXT));
                }
                let Some(d) = &self.dataset.loaded else { return };
                ui.label(format!("{}: {} pairs", d.name, d.pairs.len()));
                if let Some(names) = d.named_positions() {
                    ui.label(RichText::new(format!("columns: {}", names.join(", "))).small());
                }
                for dropped in &d.dropped {
                    ui.label(RichText::new(format!("dropped {}: {}", dropped.what, dropped.why)).small());
                }
                let busy = self.is_busy();
                if ui
                    .add_enabled(!busy, egui::Button::new("Run dataset"))
                    .on_disabled_hover_text("A sweep is running")
                    .clicked()
                {
                    self.run_dataset();
                }
                let before = self.settings.exclude_flagged;
                ui.checkbox(
                    &mut self.settings.exclude_flagged,
                    "leave flagged pairs out of the mean",
                )
                .on_hover_text("Pairs the model gets wrong (clean LD ≤ 0) or whose clean and corrupted barely differ");
                if before != self.settings.exclude_flagged
                    && let Some(run) = &mut self.dataset.run
                {
                    run.dirty = true;
                }
            });
    }

    fn pick_pairs_file(&mut self) {
        let (tx, rx) = bounded(1);
        std::thread::spawn(move || {
            let picked = rfd::FileDialog::new()
                .set_title("Open prompt pairs")
                .add_filter("pairs", &["jsonl", "json", "csv"])
                .pick_file();
            let _ = tx.send(picked);
        });
        self.dataset.pending_open = Some(rx);
    }

    /// Loads a pairs file picked in the dialog (a later frame).
    pub(super) fn poll_pairs_file(&mut self) {
        let Some(rx) = &self.dataset.pending_open else { return };
        let Ok(picked) = rx.try_recv() else { return };
        self.dataset.pending_open = None;
        if let Some(path) = picked {
            self.open_pairs(&path);
        }
    }

    /// Opens or generates a dataset given on the command line; runs it when asked to run on load.
    pub(super) fn start_dataset(&mut self, start: super::settings::DatasetStart) {
        use super::settings::DatasetStart;
        match start {
            DatasetStart::File(path) => self.open_pairs(&path),
            DatasetStart::Template { template, n, seed } => {
                (
                    self.settings.dataset_template,
                    self.settings.dataset_n,
                    self.settings.dataset_seed,
                ) = (template, n, seed);
                if let Some(t) = self.model.as_ref().map(|m| m.tokenizer.clone()) {
                    match generate(template, n, seed, &t, self.prepend_bos()) {
                        Ok(d) => (self.dataset.loaded, self.dataset.error) = (Some(d), None),
                        Err(e) => self.dataset.error = Some(e.to_string()),
                    }
                }
            }
        }
        if std::mem::take(&mut self.run_on_load) && self.dataset.loaded.is_some() {
            self.run_dataset();
        }
    }

    /// Loads a pairs file.
    pub fn open_pairs(&mut self, path: &std::path::Path) {
        match Dataset::load(path) {
            Ok(d) => (self.dataset.loaded, self.dataset.error) = (Some(d), None),
            Err(e) => self.dataset.error = Some(e.to_string()),
        }
    }

    /// Sweeps every pair of the loaded dataset with the component, direction and BOS chosen.
    pub fn run_dataset(&mut self) {
        let Some(dataset) = self.dataset.loaded.clone() else {
            return;
        };
        let request = DatasetRequest {
            dataset,
            component: self.settings.component,
            direction: self.settings.direction,
            by_position: self.settings.by_position && self.settings.component.has_heads(),
            prepend_bos: self.prepend_bos(),
        };
        let mut result = DatasetResult::new(&request);
        result.exclude_flagged = self.settings.exclude_flagged;
        let pairs = request.dataset.pairs.len();
        if self.worker.send(Command::RunDataset {
            request: Box::new(request),
            options: self.sweep_options,
        }) {
            self.sweep_error = None;
            self.selected = None;
            self.sweep = None;
            self.dataset.run = Some(DatasetRun {
                result,
                showing: None,
                dirty: true,
                refreshed: Instant::now(),
                started: Instant::now(),
                elapsed: None,
            });
            self.dataset_progress = Progress::new(pairs as f64);
        } else {
            self.sweep_error = Some("the worker is not accepting work (busy queue); try again".into());
        }
    }

    pub(super) fn pair_started(&mut self, index: usize, result: SweepResult) {
        if let Some(run) = &mut self.dataset.run
            && let Some(p) = run.result.pairs.get_mut(index)
        {
            p.result = Some(result);
            run.dirty = true;
        }
    }

    pub(super) fn pair_cell(&mut self, index: usize, cell: Cell) {
        if let Some(run) = &mut self.dataset.run
            && let Some(r) = run.result.pairs.get_mut(index).and_then(|p| p.result.as_mut())
        {
            r.insert(cell);
            run.dirty = true;
        }
    }

    pub(super) fn pair_ended(&mut self, index: usize, outcome: Result<SweepResult, String>) {
        let elapsed = self
            .dataset
            .run
            .as_ref()
            .map_or(0.0, |r| r.started.elapsed().as_secs_f64());
        self.dataset_progress.work_done(1.0, elapsed);
        if let Some(run) = &mut self.dataset.run
            && let Some(p) = run.result.pairs.get_mut(index)
        {
            match outcome {
                Ok(r) => p.set_result(r),
                Err(e) => p.error = Some(e),
            }
            run.dirty = true;
        }
    }

    pub(super) fn on_dataset_finished(&mut self, result: DatasetResult) {
        if let Some(run) = &mut self.dataset.run {
            run.result = result;
            run.elapsed = Some(run.started.elapsed().as_secs_f64());
            run.dirty = true;
            run.refreshed = Instant::now() - REFRESH;
        }
    }

    /// Recomputes the mean (or picks the pair shown) for the heatmap, at most every [`REFRESH`].
    pub(super) fn refresh_dataset_view(&mut self) {
        let exclude = self.settings.exclude_flagged;
        let Some(run) = &mut self.dataset.run else { return };
        if !run.dirty || (run.elapsed.is_none() && run.refreshed.elapsed() < REFRESH) {
            return;
        }
        run.dirty = false;
        run.refreshed = Instant::now();
        run.result.exclude_flagged = exclude;
        run.result.aggregate();
        let view = match run.showing {
            Some(i) => run.result.pairs.get(i).and_then(|p| p.result.clone()),
            None => run.result.mean_view(),
        };
        if let Some(result) = view {
            let reset = self.sweep.as_ref().is_none_or(|s| s.result.shape != result.shape);
            self.sweep = Some(SweepView {
                result,
                progress: self.dataset_progress.clone(),
                started: run.started,
                elapsed: run.elapsed,
            });
            self.heatmap.mark_dirty();
            if reset {
                self.heatmap.reset_view();
            }
        }
    }

    /// The inspector's dataset part: what is shown, the pairs (click one for its own heatmap), and
    /// the selected cell's distribution over pairs.
    pub(super) fn dataset_inspector(&mut self, ui: &mut Ui) {
        let metric = self.heatmap.metric;
        let selected = self.selected;
        let Some(run) = &mut self.dataset.run else { return };
        let r = &run.result;
        let included = r.aggregate.as_ref().map_or(0, |a| a.pairs);
        ui.label(RichText::new(format!("{}: {} pairs", r.dataset, r.pairs.len())).strong());
        let mut show: Option<Option<usize>> = None;
        match run.showing {
            Some(i) => {
                ui.label(format!("showing pair {i} alone"));
                if ui.button("← the mean over pairs").clicked() {
                    show = Some(None);
                }
            }
            None => {
                ui.label(format!("showing the mean over {included} pairs"));
            }
        }
        if run.showing.is_none()
            && let (Some((l, p)), Some(layout)) = (selected, r.layout())
        {
            let view = layout.view(self.heatmap.slice);
            let i = layout.index(layout.view_cell(&view, l, p));
            distribution(ui, r, metric, i);
        }
        egui::CollapsingHeader::new("pairs (click one for its own heatmap)")
            .default_open(true)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .id_salt("pairs")
                    .max_height(220.0)
                    .show(ui, |ui| {
                        for (i, p) in r.pairs.iter().enumerate() {
                            let text =
                                pair_line(i, &p.pair, p.result.as_ref(), p.error.as_deref(), p.flagged.is_some());
                            let mut label = RichText::new(text).small().monospace();
                            if p.flagged.is_some() || p.error.is_some() {
                                label = label.color(ERROR_TEXT);
                            }
                            let response = ui.selectable_label(run.showing == Some(i), label);
                            let response = match (&p.flagged, &p.error) {
                                (Some(f), _) => response.on_hover_text(format!("flagged: {f}")),
                                (_, Some(e)) => response.on_hover_text(e),
                                _ => response,
                            };
                            if response.clicked() && p.result.is_some() {
                                show = Some(Some(i));
                            }
                        }
                    });
            });
        if let Some(s) = show {
            run.showing = s;
            run.dirty = true;
            run.refreshed = Instant::now() - REFRESH;
            self.selected = None;
        }
    }
}

impl DatasetRun {
    /// Seconds the dataset sweep took, once it ended.
    pub(super) fn elapsed(&self) -> Option<f64> {
        self.elapsed
    }
}

/// "3 ABBA When… IO Mary, S John  +5.61 / -4.38".
fn pair_line(i: usize, pair: &PromptPair, r: Option<&SweepResult>, error: Option<&str>, flagged: bool) -> String {
    let label = pair
        .label
        .clone()
        .unwrap_or_else(|| pair.clean.chars().take(28).collect());
    let lds = match (r, error) {
        (Some(r), _) => format!("{:+.2} / {:+.2}", r.clean_logit_diff, r.corrupted_logit_diff),
        (None, Some(_)) => "not run".into(),
        (None, None) => "…".into(),
    };
    format!("{i:>3} {label:<34} {lds}{}", if flagged { " [flagged]" } else { "" })
}

/// Height of a cell's strip of values over pairs.
const STRIP_HEIGHT: f32 = 90.0;

/// A cell's values over the pairs: a strip (one dot per pair), mean ± sd and n, and the outliers
/// named.
fn distribution(ui: &mut Ui, r: &DatasetResult, metric: Metric, i: usize) {
    use egui_plot::{Plot, Points, VLine};
    let values = r.values_at(metric, i);
    if values.is_empty() {
        ui.label("no pair has a value at this cell yet");
        return;
    }
    let n = values.len() as f64;
    let mean = values.iter().map(|(_, v)| v).sum::<f64>() / n;
    let sd = (values.iter().map(|(_, v)| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    ui.label(format!(
        "{metric} over {} pairs: mean {mean:+.3}, sd {sd:.3}",
        values.len()
    ));
    // Deterministic jitter, so the strip does not move between frames.
    let points: Vec<[f64; 2]> = values
        .iter()
        .map(|&(p, v)| [v, ((p * 7919) % 13) as f64 / 13.0 - 0.5])
        .collect();
    Plot::new("cell distribution")
        .height(STRIP_HEIGHT)
        .show_y(false)
        .show_axes([true, false])
        .allow_scroll(false)
        .show(ui, |plot| {
            plot.vline(VLine::new("mean", mean).color(Color32::from_gray(150)));
            plot.points(
                Points::new("pairs", points)
                    .radius(3.0)
                    .color(Color32::from_rgb(90, 150, 230)),
            );
        });
    let outliers: Vec<String> = values
        .iter()
        .filter(|(_, v)| sd > 0.0 && (v - mean).abs() > OUTLIER_SD * sd)
        .map(|(p, v)| {
            let label = r.pairs[*p].pair.label.as_deref().unwrap_or("");
            format!("pair {p} ({label}): {v:+.3}")
        })
        .collect();
    if !outliers.is_empty() {
        ui.label(RichText::new(format!("outliers (> {OUTLIER_SD} sd): {}", outliers.join("; "))).small());
    }
}
