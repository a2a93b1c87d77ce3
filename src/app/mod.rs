//! The desktop app: prompts and answers on the left, the live heatmap in the middle, the cell
//! inspector on the right, the model on top. The UI never runs the model: it talks to the
//! [`Worker`] through commands and events.

mod dataset;
mod files;
pub mod heatmap;
mod inspector;
mod model_panel;
mod pickers;
pub mod presets;
mod prompts;
mod settings;
mod status;

use std::path::PathBuf;
use std::time::Instant;

use crossbeam_channel::Receiver;
use egui::{Color32, RichText, Ui};

use crate::export;
use crate::model::{DownloadProgress, LoadProgress, ModelSource};
use crate::patching::{HeadPatterns, PatternRequest, Progress, SweepOptions, SweepRequest, SweepResult};
use crate::worker::{Command, Event, ModelInfo, Worker, demo_model_path};
use heatmap::Heatmap;
use prompts::Tokens;
pub use settings::{DatasetStart, Overrides, Settings, StartOptions};

/// Highlight for tokens that differ between the prompts.
const DIFF_FILL: Color32 = Color32::from_rgb(150, 95, 20);
const ERROR_TEXT: Color32 = Color32::from_rgb(230, 90, 80);
const OK_TEXT: Color32 = Color32::from_rgb(110, 190, 120);

/// Shown over a finished heatmap once the prompts, answers or component on the left no longer
/// match it.
const STALE_NOTE: &str =
    "This heatmap is from the previous prompts (or answers, or component): press Run for the current ones.";
/// How opaque such a heatmap is drawn.
const STALE_OPACITY: f32 = 0.35;

/// A model load in progress.
struct Loading {
    spec: String,
    stage: String,
    download: Option<DownloadProgress>,
    started: Instant,
}

/// The sweep on the heatmap: running or finished.
struct SweepView {
    result: SweepResult,
    /// The cells' share of the work, for the progress bar and the ETA.
    progress: Progress,
    started: Instant,
    elapsed: Option<f64>,
}

/// The Patchbay window.
pub struct PatchbayApp {
    settings: Settings,
    worker: Worker,
    model: Option<ModelInfo>,
    loading: Option<Loading>,
    model_error: Option<String>,
    sweep: Option<SweepView>,
    sweep_error: Option<String>,
    selected: Option<(usize, usize)>,
    heatmap: Heatmap,
    sweep_options: SweepOptions,
    run_on_load: bool,
    /// A dataset to open once the model has loaded (command line).
    dataset_on_load: Option<settings::DatasetStart>,
    message: Option<(String, bool)>,
    file_task: Option<Receiver<Result<String, String>>>,
    pending_pick: Option<Receiver<Option<PathBuf>>>,
    demo_model: Option<PathBuf>,
    clean_tokens: Tokens,
    corrupted_tokens: Tokens,
    correct_tokens: Tokens,
    incorrect_tokens: Tokens,
    /// A large sweep's cell count, while it waits for the user's confirmation.
    confirm_cells: Option<usize>,
    /// The head cell whose attention patterns were last asked of the worker, and the answer once
    /// it came.
    patterns: Option<(PatternRequest, Option<PatternAnswer>)>,
    /// Work (cost-model units) per second of the last complete sweep on this model: what the
    /// estimate beside Run is based on.
    work_rate: Option<f64>,
    /// Sweeps started since the app opened.
    sweeps_started: usize,
    /// Datasets: the pairs loaded and the dataset sweep on the heatmap.
    dataset: dataset::DatasetState,
    /// A dataset sweep's progress, in pairs.
    dataset_progress: Progress,
    /// What saved figures and .npy draw of a sweep with an estimate.
    figure_view: crate::patching::estimate::EstimateView,
}

/// The worker's answer to a head cell's attention patterns.
type PatternAnswer = Result<Box<HeadPatterns>, String>;

impl PatchbayApp {
    /// Creates the app, restoring settings and starting the model load.
    pub fn new(cc: &eframe::CreationContext<'_>, start: StartOptions) -> Self {
        let mut settings: Settings = if start.fresh {
            Settings::default()
        } else {
            cc.storage
                .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
                .unwrap_or_default()
        };
        if let Some(m) = &start.model {
            settings.model = m.clone();
        }
        start.overrides.clone().apply(&mut settings);
        let ctx = cc.egui_ctx.clone();
        let worker = Worker::spawn(move || ctx.request_repaint());
        let mut app = Self {
            heatmap: Heatmap::new(settings.auto_range, settings.metric),
            settings,
            worker,
            model: None,
            loading: None,
            model_error: None,
            sweep: None,
            sweep_error: None,
            selected: None,
            sweep_options: SweepOptions::default(),
            run_on_load: start.run_on_load,
            dataset_on_load: start.dataset.clone(),
            message: None,
            file_task: None,
            pending_pick: None,
            demo_model: start.demo_model.or_else(demo_model_path),
            clean_tokens: Tokens::default(),
            corrupted_tokens: Tokens::default(),
            correct_tokens: Tokens::default(),
            incorrect_tokens: Tokens::default(),
            confirm_cells: None,
            dataset: dataset::DatasetState::default(),
            dataset_progress: Progress::default(),
            figure_view: crate::patching::estimate::EstimateView::Exact,
            patterns: None,
            work_rate: None,
            sweeps_started: 0,
        };
        let spec = app.settings.model.clone();
        app.load_model(&spec);
        app
    }

    /// Starts loading a model (a repo id, a folder or a .gguf path).
    pub fn load_model(&mut self, spec: &str) {
        let source = match ModelSource::parse(spec) {
            Ok(s) => s,
            Err(e) => {
                self.model_error = Some(e.to_string());
                return;
            }
        };
        self.settings.model = spec.to_owned();
        self.model_error = None;
        self.loading = Some(Loading {
            spec: spec.to_owned(),
            stage: "starting".into(),
            download: None,
            started: Instant::now(),
        });
        self.worker.send(Command::LoadModel {
            source,
            device: self.settings.device,
            dtype: self.settings.dtype,
        });
    }

    /// Whether prompts get the model's BOS on request: asked for, and the model has one.
    pub fn prepend_bos(&self) -> bool {
        self.settings.prepend_bos
            && self
                .model
                .as_ref()
                .is_some_and(|m| m.tokenizer.bos().is_some() && !m.tokenizer.adds_bos())
    }

    /// Starts a sweep with the current prompts (cancelling a running one).
    pub fn run_sweep(&mut self) {
        self.sweep_error = None;
        let request = SweepRequest {
            clean: self.settings.clean.clone(),
            corrupted: self.settings.corrupted.clone(),
            correct: self.settings.correct.clone(),
            incorrect: self.settings.incorrect.clone(),
            component: self.settings.component,
            direction: self.settings.direction,
            by_position: self.settings.by_position && self.settings.component.has_heads(),
            prepend_bos: self.prepend_bos(),
        };
        let options = SweepOptions {
            estimate: self.settings.estimate,
            exact: self.settings.exact(),
            ..self.sweep_options
        };
        if !self.worker.send(Command::RunSweep { request, options }) {
            self.sweep_error = Some("the worker is not accepting work (busy queue); try again".into());
        }
    }

    /// Whether the prompts, answers or component being edited differ from those `result` swept.
    pub fn settings_differ_from(&self, result: &SweepResult) -> bool {
        if self.dataset.run.is_some() {
            return false; // a dataset's heatmap answers its pairs, not the prompts on the left
        }
        let s = &self.settings;
        s.clean != result.clean.text
            || s.corrupted != result.corrupted.text
            || s.correct != result.correct.text
            || s.incorrect != result.incorrect.text
            || s.component != result.component
            || s.direction != result.direction
            || (s.by_position && s.component.has_heads()) != result.by_position
            || self.prepend_bos() != result.prepend_bos
    }

    /// Asks a running sweep to stop; finished cells stay.
    pub fn cancel(&mut self) {
        self.worker.cancel();
    }

    /// The current (possibly partial) result.
    pub fn result(&self) -> Option<&SweepResult> {
        self.sweep.as_ref().map(|s| &s.result)
    }

    /// Whether the worker is loading or sweeping.
    pub fn is_busy(&self) -> bool {
        self.worker.is_busy() || self.loading.is_some()
    }

    /// The dataset sweep on the heatmap, running or finished.
    pub fn dataset_result(&self) -> Option<&crate::dataset::result::DatasetResult> {
        self.dataset.run.as_ref().map(|r| &r.result)
    }

    /// Whether a dataset sweep's mean over pairs is on the heatmap (rather than one pair).
    pub fn dataset_shows_mean(&self) -> bool {
        self.dataset.run.as_ref().is_some_and(|r| r.showing.is_none())
    }

    /// Whether the dataset sweep ended (every pair run, or cancelled).
    pub fn dataset_finished(&self) -> bool {
        self.dataset.run.as_ref().is_some_and(|r| r.elapsed().is_some())
    }

    /// The loaded model, if any.
    pub fn model(&self) -> Option<&ModelInfo> {
        self.model.as_ref()
    }

    /// Selects a heatmap cell (as a click does).
    pub fn select(&mut self, cell: Option<(usize, usize)>) {
        self.selected = cell;
    }

    /// How sweeps are computed (schedule, batch size).
    pub fn set_sweep_options(&mut self, options: SweepOptions) {
        self.sweep_options = options;
    }

    /// Screen position of a heatmap cell's centre as last drawn (for tests and automation).
    pub fn cell_screen_pos(&self, layer: usize, position: usize) -> Option<egui::Pos2> {
        self.heatmap.cell_screen_pos(layer, position)
    }

    /// The message line (saves, cancels) and whether it is an error.
    pub fn message(&self) -> Option<&(String, bool)> {
        self.message.as_ref()
    }

    /// The model error shown, if any.
    pub fn model_error(&self) -> Option<&str> {
        self.model_error.as_deref()
    }

    /// The sweep error shown, if any.
    pub fn sweep_error(&self) -> Option<&str> {
        self.sweep_error.as_deref()
    }

    /// What saved figures and `.npy` files show: the heatmap's metric and view.
    pub fn shown(&self) -> export::Shown {
        export::Shown {
            metric: self.heatmap.metric,
            view: self.heatmap.slice,
            auto_range: self.heatmap.auto_range,
        }
    }

    /// How many sweeps have started since the app opened.
    pub fn sweeps_started(&self) -> usize {
        self.sweeps_started
    }

    /// The selected cell.
    pub fn selected(&self) -> Option<(usize, usize)> {
        self.selected
    }

    /// Mutable access to the persisted settings (prompts, answers, component).
    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }

    fn handle_events(&mut self) {
        for event in self.worker.drain() {
            match event {
                Event::Loading(LoadProgress::Stage(s)) => {
                    if let Some(l) = &mut self.loading {
                        l.stage = s;
                    }
                }
                Event::Loading(LoadProgress::Download(d)) => {
                    if let Some(l) = &mut self.loading {
                        l.stage = format!("downloading {}", d.file);
                        l.download = Some(d);
                    }
                }
                Event::ModelLoaded(info) => {
                    if let Some(l) = self.loading.take() {
                        self.settings.remember_model(&l.spec);
                    }
                    self.model_error = None;
                    self.model = Some(info);
                    self.work_rate = None; // another model runs at another speed
                    if let Some(d) = self.dataset_on_load.take() {
                        self.start_dataset(d);
                    } else if std::mem::take(&mut self.run_on_load) {
                        self.run_sweep();
                    }
                }
                Event::ModelFailed(msg) => {
                    self.loading = None;
                    self.model_error = Some(msg);
                }
                Event::SweepStarted(result, progress) => {
                    self.sweeps_started += 1;
                    self.dataset.run = None; // a single pair's sweep replaces a dataset's
                    self.sweep = Some(SweepView {
                        result: *result,
                        progress,
                        started: Instant::now(),
                        elapsed: None,
                    });
                    self.selected = None;
                    // A by-position head sweep opens at the last position (where name movers act).
                    if let Some(s) = &self.sweep {
                        self.heatmap.slice = s.result.layout().default_view();
                    }
                    self.heatmap.mark_dirty();
                    self.heatmap.reset_view();
                }
                Event::Cell(cell) => {
                    if let Some(s) = &mut self.sweep {
                        s.result.insert(cell);
                        self.heatmap.mark_dirty();
                    }
                }
                Event::Work(work) => {
                    if let Some(s) = &mut self.sweep {
                        s.progress.work_done(work, s.started.elapsed().as_secs_f64());
                    }
                }
                Event::Estimated(estimate) => {
                    if let Some(s) = &mut self.sweep {
                        s.result.estimate = Some(*estimate);
                        self.heatmap.mark_dirty();
                    }
                }
                Event::Planned(work) => {
                    if let Some(s) = &mut self.sweep {
                        s.progress.set_total(work);
                    }
                }
                Event::SweepFinished(result) => {
                    if let Some(s) = &mut self.sweep {
                        s.elapsed = Some(s.started.elapsed().as_secs_f64());
                        s.result = *result;
                        self.heatmap.mark_dirty();
                        let t = &s.result.timing;
                        let cells_time = t.sweep_seconds - t.baseline_seconds;
                        if s.result.complete && t.cells_computed > 0 && cells_time > 0.0 {
                            self.work_rate = Some(s.progress.total() / cells_time);
                        }
                        let kept = format!("{} of {} cells kept", s.result.done_cells(), s.result.layout().len());
                        if let Some(e) = &s.result.error {
                            self.sweep_error = Some(format!("the sweep stopped early ({kept}): {e}"));
                        } else if !s.result.complete {
                            self.message = Some((format!("sweep cancelled: {kept}"), false));
                        }
                    }
                }
                Event::SweepFailed(msg) => self.sweep_error = Some(msg),
                Event::PairStarted(i, result) => self.pair_started(i, *result),
                Event::PairCell(i, cell) => self.pair_cell(i, cell),
                Event::PairFinished(i, result) => self.pair_ended(i, Ok(*result)),
                Event::PairFailed(i, error) => self.pair_ended(i, Err(error)),
                Event::DatasetFinished(result) => self.on_dataset_finished(*result),
                Event::HeadPatterns(request, outcome) => {
                    if let Some((asked, answer)) = &mut self.patterns
                        && *asked == *request
                    {
                        *answer = Some(outcome);
                    }
                }
            }
        }
        if let Some(rx) = &self.pending_pick
            && let Ok(picked) = rx.try_recv()
        {
            self.pending_pick = None;
            if let Some(path) = picked {
                self.load_model(&path.to_string_lossy());
            }
        }
        if let Some(rx) = &self.file_task
            && let Ok(outcome) = rx.try_recv()
        {
            self.message = Some(match outcome {
                Ok(m) => (m, false),
                Err(m) => (m, true),
            });
            self.file_task = None;
        }
    }

    fn sweep_running(&self) -> bool {
        self.sweep.as_ref().is_some_and(|s| s.elapsed.is_none()) && self.worker.is_busy()
    }
}

impl eframe::App for PatchbayApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.handle_events();
        self.keyboard(ctx);
        if self.is_busy() {
            // The clock and ETA tick four times a second (the worker's events repaint too): each
            // frame costs CPU the sweep could use where the window is drawn in software (measured
            // under Xvfb: docs/BENCHMARKS.md, "Measurements behind the code").
            ctx.request_repaint_after(std::time::Duration::from_millis(250));
        }
    }

    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        self.confirm_large_sweep(&ui.ctx().clone());
        self.poll_pairs_file();
        self.refresh_dataset_view();
        egui::Panel::top("model").show(ui, |ui| {
            ui.add_space(4.0);
            self.model_panel(ui);
            ui.add_space(4.0);
        });
        egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
        egui::Panel::left("prompts")
            .resizable(true)
            .default_size(440.0)
            .max_size(600.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .auto_shrink([false, false])
                    .show(ui, |ui| self.prompt_panel(ui));
            });
        egui::Panel::right("inspector")
            .resizable(true)
            .default_size(300.0)
            .show(ui, |ui| self.inspector(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            let selected = self.selected;
            let shown = self.shown();
            match &self.sweep {
                Some(view) => {
                    let stale = self.settings_differ_from(&view.result) && view.elapsed.is_some();
                    ui.horizontal(|ui| {
                        ui.label(RichText::new(export::figure::title(&view.result, &shown)).strong());
                        if ui.small_button("Reset view").on_hover_text("Fit the whole grid (or double-click the plot)").clicked() {
                            self.heatmap.reset_view();
                        }
                    });
                    if stale {
                        ui.label(
                            RichText::new(STALE_NOTE)
                                .color(ERROR_TEXT),
                        );
                        // Dimmed: the cells answer the previous prompts, not the ones on the left.
                        ui.multiply_opacity(STALE_OPACITY);
                    }
                    if heatmap::view_picker(ui, &mut self.heatmap, &view.result) {
                        self.selected = None;
                    }
                    let response = self.heatmap.show(ui, &view.result, selected);
                    if let Some(cell) = response.clicked {
                        self.selected = Some(cell);
                    }
                }
                None => {
                    ui.centered_and_justified(|ui| {
                        ui.label("Pick a preset or type two prompts, then press Run.\nThe heatmap fills in as cells complete.");
                    });
                }
            }
        });
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.settings);
    }
}
