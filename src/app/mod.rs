//! The desktop app: prompts and answers on the left, the live heatmap in the middle, the cell
//! inspector on the right, the model on top. The UI never runs the model: it talks to the
//! [`Worker`] through commands and events.

pub mod heatmap;
pub mod presets;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, bounded};
use egui::{Color32, RichText, Ui};
use serde::{Deserialize, Serialize};

use crate::export;
use crate::model::{DEFAULT_MODEL, DeviceChoice, DownloadProgress, LoadProgress, ModelSource, TextTokenizer};
use crate::patching::Component;
use crate::patching::result::{SweepResult, TopToken};
use crate::patching::sweep::{Progress, SweepOptions, SweepRequest};
use crate::worker::{Command, Event, ModelInfo, Worker, demo_model_path};
use heatmap::Heatmap;
use presets::{Preset, presets};

/// How many recently used models the picker remembers.
const RECENT_MODELS: usize = 8;
/// Suggested answers shown from the clean and corrupted runs' top predictions.
const SUGGESTIONS: usize = 5;
/// Highlight for tokens that differ between the prompts.
const DIFF_FILL: Color32 = Color32::from_rgb(150, 95, 20);
const ERROR_TEXT: Color32 = Color32::from_rgb(230, 90, 80);
const OK_TEXT: Color32 = Color32::from_rgb(110, 190, 120);

/// What persists between runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub model: String,
    pub recent_models: Vec<String>,
    pub device: DeviceChoice,
    /// "auto", "f32", "bf16" or "f16".
    pub dtype: String,
    pub clean: String,
    pub corrupted: String,
    pub correct: String,
    pub incorrect: String,
    pub component: Component,
    pub preset: Option<String>,
    pub auto_range: bool,
}

impl Default for Settings {
    fn default() -> Self {
        let mut s = Self {
            model: DEFAULT_MODEL.to_owned(),
            recent_models: Vec::new(),
            device: DeviceChoice::Cpu,
            dtype: "auto".to_owned(),
            clean: String::new(),
            corrupted: String::new(),
            correct: String::new(),
            incorrect: String::new(),
            component: Component::ResidPost,
            preset: None,
            auto_range: false,
        };
        if let Some(p) = presets().first() {
            s.apply_preset(p);
        }
        s
    }
}

impl Settings {
    fn apply_preset(&mut self, p: &Preset) {
        self.clean = p.clean.clone();
        self.corrupted = p.corrupted.clone();
        self.correct = p.correct.clone();
        self.incorrect = p.incorrect.clone();
        self.component = p.component;
        self.preset = Some(p.name.clone());
    }

    fn remember_model(&mut self, spec: &str) {
        self.recent_models.retain(|m| m != spec);
        self.recent_models.insert(0, spec.to_owned());
        self.recent_models.truncate(RECENT_MODELS);
    }
}

/// How the app starts (command line and tests).
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Load this model instead of the remembered one.
    pub model: Option<String>,
    /// The demo model to offer when the chosen one cannot be loaded.
    pub demo_model: Option<PathBuf>,
    /// Ignore remembered settings (tests).
    pub fresh: bool,
    /// Start a sweep as soon as the model has loaded (demos, screenshots).
    pub run_on_load: bool,
    /// Settings given on the command line, over the remembered ones.
    pub overrides: Overrides,
}

/// Settings to start with instead of the remembered ones (`patchbay gui --clean … --device …`).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub clean: Option<String>,
    pub corrupted: Option<String>,
    pub correct: Option<String>,
    pub incorrect: Option<String>,
    pub component: Option<Component>,
    pub device: Option<DeviceChoice>,
    /// "auto", "f32", "bf16" or "f16".
    pub dtype: Option<String>,
}

impl Overrides {
    fn apply(self, settings: &mut Settings) {
        let prompts_given = self.clean.is_some() || self.corrupted.is_some();
        let set = |field: &mut String, value: Option<String>| {
            if let Some(v) = value {
                *field = v;
            }
        };
        set(&mut settings.clean, self.clean);
        set(&mut settings.corrupted, self.corrupted);
        set(&mut settings.correct, self.correct);
        set(&mut settings.incorrect, self.incorrect);
        set(&mut settings.dtype, self.dtype);
        if let Some(c) = self.component {
            settings.component = c;
        }
        if let Some(d) = self.device {
            settings.device = d;
        }
        if prompts_given {
            // The prompts are the user's own now, not the preset's.
            settings.preset = None;
        }
    }
}

struct Loading {
    spec: String,
    stage: String,
    download: Option<DownloadProgress>,
    started: Instant,
}

struct SweepView {
    result: SweepResult,
    /// The cells' share of the work, for the progress bar and the ETA.
    progress: Progress,
    started: Instant,
    elapsed: Option<f64>,
}

/// A prompt's tokens, recomputed when the text or the tokenizer changes.
#[derive(Default)]
struct Tokens {
    text: String,
    tokenizer: usize,
    ids: Vec<u32>,
    tokens: Vec<String>,
    error: Option<String>,
}

impl Tokens {
    fn update(&mut self, text: &str, tokenizer: &Arc<TextTokenizer>, prompt: bool) {
        let key = Arc::as_ptr(tokenizer) as usize;
        if self.text == text && self.tokenizer == key {
            return;
        }
        self.text = text.to_owned();
        self.tokenizer = key;
        let ids = if prompt {
            tokenizer.encode_prompt(text)
        } else {
            tokenizer.encode_plain(text)
        };
        match ids {
            Ok(ids) => {
                self.tokens = tokenizer.token_texts(&ids);
                self.ids = ids;
                self.error = None;
            }
            Err(e) => {
                self.ids.clear();
                self.tokens.clear();
                self.error = Some(e.to_string());
            }
        }
    }
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
    message: Option<(String, bool)>,
    file_task: Option<Receiver<Result<String, String>>>,
    pending_pick: Option<Receiver<Option<PathBuf>>>,
    demo_model: Option<PathBuf>,
    clean_tokens: Tokens,
    corrupted_tokens: Tokens,
    correct_tokens: Tokens,
    incorrect_tokens: Tokens,
}

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
            heatmap: Heatmap::with_auto_range(settings.auto_range),
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
            message: None,
            file_task: None,
            pending_pick: None,
            demo_model: start.demo_model.or_else(demo_model_path),
            clean_tokens: Tokens::default(),
            corrupted_tokens: Tokens::default(),
            correct_tokens: Tokens::default(),
            incorrect_tokens: Tokens::default(),
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
        let dtype = match self.settings.dtype.as_str() {
            "auto" | "" => None,
            name => match crate::model::parse_dtype(name) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.loading = None;
                    self.model_error = Some(e.to_string());
                    return;
                }
            },
        };
        self.worker.send(Command::LoadModel {
            source,
            device: self.settings.device,
            dtype,
        });
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
        };
        if !self.worker.send(Command::RunSweep {
            request,
            options: self.sweep_options,
        }) {
            self.sweep_error = Some("the worker is not accepting work (busy queue); try again".into());
        }
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
                    if std::mem::take(&mut self.run_on_load) {
                        self.run_sweep();
                    }
                }
                Event::ModelFailed(msg) => {
                    self.loading = None;
                    self.model_error = Some(msg);
                }
                Event::SweepStarted(result, progress) => {
                    self.sweep = Some(SweepView {
                        result: *result,
                        progress,
                        started: Instant::now(),
                        elapsed: None,
                    });
                    self.selected = None;
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
                Event::SweepFinished(result) => {
                    if let Some(s) = &mut self.sweep {
                        s.elapsed = Some(s.started.elapsed().as_secs_f64());
                        s.result = *result;
                        self.heatmap.mark_dirty();
                        let kept = format!(
                            "{} of {} cells kept",
                            s.result.done_cells(),
                            s.result.layers() * s.result.positions()
                        );
                        if let Some(e) = &s.result.error {
                            self.sweep_error = Some(format!("the sweep stopped early ({kept}): {e}"));
                        } else if !s.result.complete {
                            self.message = Some((format!("sweep cancelled: {kept}"), false));
                        }
                    }
                }
                Event::SweepFailed(msg) => self.sweep_error = Some(msg),
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

    fn model_panel(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            ui.heading("Patchbay");
            ui.separator();
            ui.label("Model");
            let edit = ui.add(
                egui::TextEdit::singleline(&mut self.settings.model)
                    .hint_text("Hub repo id, model folder or .gguf file")
                    .desired_width(320.0),
            );
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if ui
                .button("Load")
                .on_hover_text("Load this model (Hub repo id, folder or .gguf)")
                .clicked()
                || enter
            {
                let spec = self.settings.model.clone();
                self.load_model(&spec);
            }
            if ui
                .button("Open…")
                .on_hover_text("Pick a .gguf file or a model folder")
                .clicked()
            {
                self.pick_model_file();
            }
            ui.menu_button("Recent", |ui| {
                if self.settings.recent_models.is_empty() {
                    ui.label("no models yet");
                }
                for m in self.settings.recent_models.clone() {
                    if ui.button(&m).clicked() {
                        self.load_model(&m);
                        ui.close();
                    }
                }
            });
            egui::ComboBox::from_label("Device")
                .selected_text(match self.settings.device {
                    DeviceChoice::Cpu => "CPU".to_owned(),
                    DeviceChoice::Cuda(n) => format!("CUDA:{n}"),
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.settings.device, DeviceChoice::Cpu, "CPU");
                    ui.selectable_value(&mut self.settings.device, DeviceChoice::Cuda(0), "CUDA:0");
                });
            egui::ComboBox::from_label("Dtype")
                .selected_text(self.settings.dtype.as_str())
                .show_ui(ui, |ui| {
                    for d in ["auto", "f32", "bf16", "f16"] {
                        ui.selectable_value(&mut self.settings.dtype, d.to_owned(), d);
                    }
                })
                .response
                .on_hover_text("auto: f32 on CPU, bf16 on CUDA. Press Load to apply a change.");
        });
        ui.horizontal_wrapped(|ui| {
            if let Some(l) = &self.loading {
                ui.spinner();
                let mut text = format!("loading {}: {}", l.spec, l.stage);
                if let Some(d) = &l.download {
                    let secs = l.started.elapsed().as_secs_f64().max(1e-3);
                    text.push_str(&format!(
                        " — {:.1} / {:.1} MB ({:.1} MB/s)",
                        d.downloaded as f64 / 1e6,
                        d.total as f64 / 1e6,
                        d.downloaded as f64 / 1e6 / secs
                    ));
                    if d.total > 0 {
                        ui.add(egui::ProgressBar::new(d.downloaded as f32 / d.total as f32).desired_width(160.0));
                    }
                }
                ui.label(text);
            } else if let Some(m) = &self.model {
                ui.label(
                    RichText::new(format!(
                        "{} · {} layers · d={} · {} on {} · loaded in {:.1} s",
                        m.source.display_name(),
                        m.config.num_layers,
                        m.config.hidden_size,
                        m.dtype,
                        m.device,
                        m.load_seconds
                    ))
                    .color(OK_TEXT),
                );
            }
            if let Some(err) = self.model_error.clone() {
                ui.label(RichText::new(err.as_str()).color(ERROR_TEXT));
                if let Some(demo) = self.demo_model.clone()
                    && ui
                        .button("Use the demo model (SmolLM2-135M) with the IOI preset")
                        .clicked()
                {
                    if let Some(p) = presets().first() {
                        self.settings.apply_preset(p);
                    }
                    self.run_on_load = true;
                    self.load_model(&demo.to_string_lossy());
                }
            }
        });
    }

    fn pick_model_file(&mut self) {
        let (tx, rx) = bounded(1);
        std::thread::spawn(move || {
            let picked = rfd::FileDialog::new()
                .set_title("Open a .gguf file (or cancel to pick a folder)")
                .add_filter("GGUF model", &["gguf"])
                .pick_file()
                .or_else(|| rfd::FileDialog::new().set_title("Open a model folder").pick_folder());
            let _ = tx.send(picked);
        });
        // Resolved in `poll_pick` on later frames.
        self.pending_pick = Some(rx);
    }

    fn prompt_panel(&mut self, ui: &mut Ui) {
        egui::ComboBox::from_label("Preset")
            .selected_text(self.settings.preset.clone().unwrap_or_else(|| "custom".into()))
            .width(260.0)
            .show_ui(ui, |ui| {
                for p in presets() {
                    if ui
                        .selectable_label(self.settings.preset.as_deref() == Some(p.name.as_str()), &p.name)
                        .clicked()
                    {
                        self.settings.apply_preset(p);
                    }
                }
            });
        if let Some(p) = presets()
            .iter()
            .find(|p| Some(&p.name) == self.settings.preset.as_ref())
        {
            egui::CollapsingHeader::new("What to look for")
                .default_open(true)
                .show(ui, |ui| ui.label(RichText::new(&p.explanation).small()));
        }
        let tokenizer = self.model.as_ref().map(|m| m.tokenizer.clone());
        let before = (self.settings.clean.clone(), self.settings.corrupted.clone());

        ui.add_space(4.0);
        let label = ui.label(RichText::new("Clean prompt").strong());
        ui.add(
            egui::TextEdit::multiline(&mut self.settings.clean)
                .desired_rows(2)
                .desired_width(ui.available_width())
                .id_salt("clean"),
        )
        .labelled_by(label.id);
        if let Some(t) = &tokenizer {
            self.clean_tokens.update(&self.settings.clean, t, true);
            self.corrupted_tokens.update(&self.settings.corrupted, t, true);
            token_chips(ui, &self.clean_tokens, &self.corrupted_tokens);
        }
        ui.add_space(4.0);
        let label = ui.label(RichText::new("Corrupted prompt").strong());
        ui.add(
            egui::TextEdit::multiline(&mut self.settings.corrupted)
                .desired_rows(2)
                .desired_width(ui.available_width())
                .id_salt("corrupted"),
        )
        .labelled_by(label.id);
        if let Some(t) = &tokenizer {
            self.corrupted_tokens.update(&self.settings.corrupted, t, true);
            token_chips(ui, &self.corrupted_tokens, &self.clean_tokens);
        }
        if (self.settings.clean.clone(), self.settings.corrupted.clone()) != before {
            self.settings.preset = None;
        }
        let mismatch = tokenizer.is_some()
            && !self.clean_tokens.ids.is_empty()
            && !self.corrupted_tokens.ids.is_empty()
            && self.clean_tokens.ids.len() != self.corrupted_tokens.ids.len();
        if mismatch {
            ui.label(
                RichText::new(format!(
                    "Token counts differ: clean {} vs corrupted {}. Patching compares positions one to one, so edit the prompts until they match.",
                    self.clean_tokens.ids.len(),
                    self.corrupted_tokens.ids.len()
                ))
                .color(ERROR_TEXT),
            );
        }

        ui.add_space(6.0);
        let suggestions = self
            .sweep
            .as_ref()
            .map(|s| (s.result.clean_top_k.clone(), s.result.corrupted_top_k.clone()));
        let mut answers_ok = true;
        egui::Grid::new("answers").num_columns(2).show(ui, |ui| {
            for (label, correct) in [("Correct answer", true), ("Incorrect answer", false)] {
                let label_id = ui.label(label).id;
                ui.vertical(|ui| {
                    let field = if correct {
                        &mut self.settings.correct
                    } else {
                        &mut self.settings.incorrect
                    };
                    ui.add(egui::TextEdit::singleline(field).desired_width(120.0).id_salt(label))
                        .labelled_by(label_id);
                    if let Some(t) = &tokenizer {
                        let tokens = if correct {
                            &mut self.correct_tokens
                        } else {
                            &mut self.incorrect_tokens
                        };
                        tokens.update(field, t, false);
                        answers_ok &= answer_status(ui, tokens);
                    }
                    if let Some((clean_top, corrupted_top)) = &suggestions {
                        let top = if correct { clean_top } else { corrupted_top };
                        ui.horizontal_wrapped(|ui| {
                            ui.label(
                                RichText::new(if correct {
                                    "clean run's top:"
                                } else {
                                    "corrupted run's top:"
                                })
                                .small(),
                            );
                            for t in top.iter().take(SUGGESTIONS) {
                                if ui
                                    .small_button(format!("{:?}", t.token))
                                    .on_hover_text(format!("p = {:.3}", t.prob))
                                    .clicked()
                                {
                                    let field = if correct {
                                        &mut self.settings.correct
                                    } else {
                                        &mut self.settings.incorrect
                                    };
                                    *field = t.token.clone();
                                }
                            }
                        });
                    }
                });
                ui.end_row();
            }
        });

        ui.add_space(6.0);
        egui::ComboBox::from_label("Component")
            .selected_text(self.settings.component.name())
            .show_ui(ui, |ui| {
                for c in Component::ALL {
                    ui.selectable_value(&mut self.settings.component, c, c.name());
                }
            });
        ui.add_space(6.0);
        ui.horizontal(|ui| {
            let ready = self.model.is_some() && self.loading.is_none();
            let reason = if !ready {
                Some("load a model first")
            } else if mismatch {
                Some("the prompts must have the same number of tokens")
            } else if !answers_ok {
                Some("each answer must be exactly one token")
            } else {
                None
            };
            let run = ui.add_enabled(reason.is_none(), egui::Button::new(RichText::new("Run").strong()));
            let run = match reason {
                Some(r) => run.on_disabled_hover_text(r),
                None => run.on_hover_text("Patch every layer × position (a running sweep is cancelled)"),
            };
            if run.clicked() {
                self.run_sweep();
            }
            if ui
                .add_enabled(self.sweep_running(), egui::Button::new("Cancel"))
                .clicked()
            {
                self.cancel();
            }
        });
        if let Some(err) = &self.sweep_error {
            ui.label(RichText::new(err.as_str()).color(ERROR_TEXT));
        }
        ui.add_space(6.0);
        ui.horizontal(|ui| {
            let has = self.sweep.is_some();
            if ui
                .add_enabled(has, egui::Button::new("Save figure…"))
                .on_hover_text("PNG or SVG, drawn from the data")
                .clicked()
            {
                self.save_dialog(true);
            }
            if ui
                .add_enabled(has, egui::Button::new("Export data…"))
                .on_hover_text("JSON, CSV or NPY (as the CLI writes)")
                .clicked()
            {
                self.save_dialog(false);
            }
        });
        if ui
            .checkbox(&mut self.settings.auto_range, "colour range from data")
            .changed()
        {
            self.heatmap.auto_range = self.settings.auto_range;
            self.heatmap.mark_dirty();
        }
        if let Some((msg, is_error)) = &self.message {
            ui.label(RichText::new(msg).color(if *is_error { ERROR_TEXT } else { OK_TEXT }));
        }
    }

    fn save_dialog(&mut self, figure: bool) {
        let Some(result) = self.result().cloned() else { return };
        let range = heatmap::color_range(&result, self.heatmap.auto_range);
        let name = format!(
            "patchbay-{}-{}",
            result.model.id.replace(['/', ' '], "_"),
            result.component
        );
        let (tx, rx) = bounded(1);
        self.file_task = Some(rx);
        std::thread::spawn(move || {
            let dialog = rfd::FileDialog::new();
            let dialog = if figure {
                dialog
                    .add_filter("PNG image", &["png"])
                    .add_filter("SVG image", &["svg"])
                    .set_file_name(format!("{name}.png"))
            } else {
                dialog
                    .add_filter("JSON (everything)", &["json"])
                    .add_filter("CSV (one row per cell)", &["csv"])
                    .add_filter("NumPy (values matrix)", &["npy"])
                    .set_file_name(format!("{name}.json"))
            };
            let outcome = match dialog.save_file() {
                None => Err("nothing saved (dialog cancelled, or no file dialog available: install zenity or xdg-desktop-portal)".to_owned()),
                Some(path) => save_to(&result, &path, figure, range),
            };
            let _ = tx.send(outcome);
        });
    }

    fn inspector(&mut self, ui: &mut Ui) {
        ui.heading("Inspector");
        let Some(view) = &self.sweep else {
            ui.label("Run a sweep, then click a cell to see what the patched model predicts.");
            return;
        };
        let r = &view.result;
        ui.label(format!(
            "clean LD {:+.4} · corrupted LD {:+.4}",
            r.clean_logit_diff, r.corrupted_logit_diff
        ));
        ui.label(
            RichText::new(format!(
                "LD = logit({:?}) − logit({:?})",
                r.correct.token, r.incorrect.token
            ))
            .small(),
        );
        for w in &r.warnings {
            ui.label(RichText::new(w).color(ERROR_TEXT).small());
        }
        ui.separator();
        let Some((l, p)) = self.selected.filter(|&(l, p)| l < r.layers() && p < r.positions()) else {
            ui.label("Click a cell (arrow keys move the selection).");
            top_table(ui, "clean run", &r.clean_top_k, r);
            top_table(ui, "corrupted run", &r.corrupted_top_k, r);
            return;
        };
        heatmap::cell_summary(ui, r, &heatmap::position_labels(r), l, p);
        let (c, i) = (&r.correct.token, &r.incorrect.token);
        egui::Grid::new("answer logits")
            .num_columns(4)
            .striped(true)
            .show(ui, |ui| {
                ui.label("");
                ui.label(RichText::new(format!("logit({c:?})")).small());
                ui.label(RichText::new(format!("logit({i:?})")).small());
                ui.label(RichText::new("LD").small());
                ui.end_row();
                let rows = [
                    ("patched", r.answer_logits[l][p]),
                    ("clean", Some(r.clean_answer_logits)),
                    ("corrupted", Some(r.corrupted_answer_logits)),
                ];
                for (name, logits) in rows {
                    ui.label(name);
                    match logits {
                        Some([a, b]) => {
                            ui.label(format!("{a:.3}"));
                            ui.label(format!("{b:.3}"));
                            ui.label(format!("{:+.3}", a - b));
                        }
                        None => {
                            ui.label("—");
                            ui.label("—");
                            ui.label("—");
                        }
                    }
                    ui.end_row();
                }
            });
        egui::ScrollArea::vertical().show(ui, |ui| {
            top_table(ui, "patched run", &r.top_k[l][p], r);
            top_table(ui, "clean run", &r.clean_top_k, r);
            top_table(ui, "corrupted run", &r.corrupted_top_k, r);
        });
    }

    fn status_bar(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            let Some(view) = &self.sweep else {
                ui.label("no sweep yet");
                return;
            };
            let r = &view.result;
            let total = r.layers() * r.positions();
            let done = r.done_cells();
            let secs = view.elapsed.unwrap_or_else(|| view.started.elapsed().as_secs_f64());
            // The bar and the ETA follow the work, not the cell count (see `Progress`).
            let fraction = if view.elapsed.is_some() {
                done as f32 / total.max(1) as f32
            } else {
                view.progress.fraction() as f32
            };
            ui.add(
                egui::ProgressBar::new(fraction)
                    .desired_width(220.0)
                    .text(format!("{:.0}% · {done}/{total} cells", fraction * 100.0)),
            );
            let state = match view.elapsed {
                Some(_) if r.complete => format!(
                    "done in {secs:.2} s ({} computed, {} skipped)",
                    r.timing.cells_computed, r.timing.cells_skipped
                ),
                Some(_) if r.error.is_some() => format!("stopped by an error after {secs:.1} s"),
                Some(_) => format!("cancelled after {secs:.1} s"),
                None => match view.progress.eta(secs) {
                    Some(eta) => format!("running {secs:.1} s · eta {eta:.1} s"),
                    None => format!("running {secs:.1} s"),
                },
            };
            ui.label(state);
            ui.separator();
            ui.label(format!("{} · {} · {}", r.model.id, r.component, r.metric));
        });
    }

    fn keyboard(&mut self, ctx: &egui::Context) {
        let Some(r) = self.result() else { return };
        let (layers, positions) = (r.layers(), r.positions());
        if ctx.egui_wants_keyboard_input() {
            return;
        }
        let Some((l, p)) = self.selected else { return };
        let (mut l, mut p) = (l, p);
        ctx.input(|i| {
            if i.key_pressed(egui::Key::ArrowUp) {
                l = l.saturating_sub(1);
            }
            if i.key_pressed(egui::Key::ArrowDown) {
                l = (l + 1).min(layers - 1);
            }
            if i.key_pressed(egui::Key::ArrowLeft) {
                p = p.saturating_sub(1);
            }
            if i.key_pressed(egui::Key::ArrowRight) {
                p = (p + 1).min(positions - 1);
            }
        });
        self.selected = Some((l, p));
    }
}

/// Writes a figure or data file; the format follows the extension.
pub fn save_to(result: &SweepResult, path: &std::path::Path, figure: bool, range: f64) -> Result<String, String> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let outcome = if figure {
        export::figure::save(result, path, Some(range))
    } else {
        match ext.as_str() {
            "json" => export::data::save(result, Some(path), None, None),
            "csv" => export::data::save(result, None, Some(path), None),
            "npy" => export::data::save(result, None, None, Some(path)),
            _ => Err(crate::Error::Io {
                message: "data is exported as .json, .csv or .npy".into(),
                path: path.to_owned(),
            }),
        }
    };
    outcome
        .map(|()| format!("saved {}", path.display()))
        .map_err(|e| e.to_string())
}

/// Shows whitespace so tokens like " John" and "\n" are readable on a chip.
fn visible(token: &str) -> String {
    token.replace(' ', "·").replace('\n', "↵").replace('\t', "⇥")
}

fn token_chips(ui: &mut Ui, tokens: &Tokens, other: &Tokens) {
    if let Some(e) = &tokens.error {
        ui.label(RichText::new(e).color(ERROR_TEXT));
        return;
    }
    ui.horizontal_wrapped(|ui| {
        ui.spacing_mut().item_spacing = egui::vec2(3.0, 3.0);
        for (i, (id, text)) in tokens.ids.iter().zip(&tokens.tokens).enumerate() {
            let differs = other.ids.get(i).is_some_and(|o| o != id)
                || (other.ids.len() != tokens.ids.len() && i >= other.ids.len());
            let fill = if differs {
                DIFF_FILL
            } else {
                ui.visuals().faint_bg_color
            };
            // One label per chip, so the wrapped row moves whole chips to the next line.
            let mut job = egui::text::LayoutJob::default();
            let weak = if differs {
                Color32::BLACK
            } else {
                ui.visuals().weak_text_color()
            };
            let strong = ui.visuals().strong_text_color();
            job.append(
                &format!("{i}"),
                0.0,
                egui::TextFormat {
                    font_id: egui::FontId::proportional(9.0),
                    color: weak,
                    background: fill,
                    valign: egui::Align::Center,
                    ..Default::default()
                },
            );
            job.append(
                &visible(text),
                2.0,
                egui::TextFormat {
                    font_id: egui::FontId::monospace(13.0),
                    color: strong,
                    background: fill,
                    ..Default::default()
                },
            );
            ui.add(egui::Label::new(job).extend()).on_hover_text(format!(
                "position {i}, token id {id}{}",
                if differs { " (differs)" } else { "" }
            ));
        }
    });
}

/// Shows whether an answer is one token; returns true when it is.
fn answer_status(ui: &mut Ui, tokens: &Tokens) -> bool {
    if let Some(e) = &tokens.error {
        ui.label(RichText::new(e).color(ERROR_TEXT).small());
        return false;
    }
    match tokens.ids.as_slice() {
        [id] => {
            ui.label(
                RichText::new(format!("one token: {:?} = {id}", tokens.tokens[0]))
                    .color(OK_TEXT)
                    .small(),
            );
            true
        }
        [] => {
            ui.label(RichText::new("empty: give one token").color(ERROR_TEXT).small());
            false
        }
        ids => {
            let parts: Vec<String> = tokens.tokens.iter().map(|t| format!("{t:?}")).collect();
            ui.label(
                RichText::new(format!(
                    "{} tokens ({}): answers must be one token",
                    ids.len(),
                    parts.join(" + ")
                ))
                .color(ERROR_TEXT)
                .small(),
            );
            false
        }
    }
}

fn top_table(ui: &mut Ui, title: &str, top: &[TopToken], r: &SweepResult) {
    ui.add_space(4.0);
    ui.label(RichText::new(title).strong());
    if top.is_empty() {
        ui.label("—");
        return;
    }
    egui::Grid::new(title).striped(true).num_columns(3).show(ui, |ui| {
        ui.label(RichText::new("token").small());
        ui.label(RichText::new("logit").small());
        ui.label(RichText::new("prob").small());
        ui.end_row();
        for t in top {
            let color = if t.id == r.correct.token_id {
                Some(Color32::from_rgb(90, 150, 230))
            } else if t.id == r.incorrect.token_id {
                Some(ERROR_TEXT)
            } else {
                None
            };
            let token = RichText::new(format!("{:?}", t.token)).monospace();
            ui.label(match color {
                Some(c) => token.color(c).strong(),
                None => token,
            });
            ui.label(format!("{:.3}", t.logit));
            ui.label(format!("{:.3}", t.prob));
            ui.end_row();
        }
    });
}

impl eframe::App for PatchbayApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.handle_events();
        self.keyboard(ctx);
        if self.is_busy() {
            // The clock and ETA tick four times a second (the worker's events repaint too). Each
            // frame costs CPU the sweep could use where the window is drawn in software: at 10 Hz
            // a 43-token sweep took 48–54 s under Xvfb, at 4 Hz 43–46 s (35 s headless).
            ctx.request_repaint_after(std::time::Duration::from_millis(250));
        }
    }

    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
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
            match &self.sweep {
                Some(view) => {
                    ui.horizontal(|ui| {
                        ui.label(RichText::new(export::figure::title(&view.result)).strong());
                        if ui.small_button("Reset view").on_hover_text("Fit the whole grid (or double-click the plot)").clicked() {
                            self.heatmap.reset_view();
                        }
                    });
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
