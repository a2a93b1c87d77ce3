//! The prompts panel: a teaching preset, the clean and corrupted prompt editors with their tokens
//! as chips, the answer pickers, the component, Run / Cancel and saving.

use std::sync::Arc;

use egui::{Color32, RichText, Ui};

use super::presets::presets;

use super::pickers::estimate_view_name;
use super::{DIFF_FILL, ERROR_TEXT, OK_TEXT, PatchbayApp};
use crate::model::TextTokenizer;
use crate::patching::Layout;
use crate::patching::cost::CostModel;
use crate::patching::estimate::EstimateView;

/// A prompt editor grows to this height, then scrolls.
const EDITOR_MAX_HEIGHT: f32 = 96.0;
/// A prompt's token chips take at most this height, then scroll.
const CHIPS_MAX_HEIGHT: f32 = 100.0;
/// Suggested answers shown from the clean and corrupted runs' top predictions.
const SUGGESTIONS: usize = 5;

impl PatchbayApp {
    /// The whole left panel, top to bottom.
    pub(super) fn prompt_panel(&mut self, ui: &mut Ui) {
        self.preset_picker(ui);
        let tokenizer = self.model.as_ref().map(|m| m.tokenizer.clone());
        let mismatch = self.prompt_editors(ui, tokenizer.as_ref());
        ui.add_space(6.0);
        let answers_ok = self.answer_pickers(ui, tokenizer.as_ref());
        ui.add_space(6.0);
        self.patch_pickers(ui);
        ui.add_space(6.0);
        self.run_controls(ui, mismatch, answers_ok);
        ui.add_space(6.0);
        self.output_controls(ui);
        ui.add_space(6.0);
        self.dataset_panel(ui);
    }

    /// The teaching presets, and the chosen one's note on what to look for. With a model loaded,
    /// a preset its tokenizer cannot run (an answer of two tokens, prompts of different lengths)
    /// is marked, and says why.
    fn preset_picker(&mut self, ui: &mut Ui) {
        let tokenizer = self.model.as_ref().map(|m| m.tokenizer.clone());
        let prepend_bos = self.prepend_bos();
        let fit = |p: &super::presets::Preset| match &tokenizer {
            Some(t) => p.fits(t, prepend_bos),
            None => Ok(()),
        };
        egui::ComboBox::from_label("Preset")
            .selected_text(self.settings.preset.clone().unwrap_or_else(|| "custom".into()))
            .width(260.0)
            .show_ui(ui, |ui| {
                for p in presets() {
                    let misfit = fit(p).err();
                    let label = match misfit {
                        Some(_) => format!("{} (does not fit)", p.name),
                        None => p.name.clone(),
                    };
                    let response = ui.selectable_label(self.settings.preset.as_deref() == Some(p.name.as_str()), label);
                    let response = match &misfit {
                        Some(why) => response.on_hover_text(format!("Does not fit this model: {why}")),
                        None => response,
                    };
                    if response.clicked() {
                        self.settings.apply_preset(p);
                    }
                }
            });
        if let Some(p) = presets()
            .iter()
            .find(|p| Some(&p.name) == self.settings.preset.as_ref())
        {
            if let Err(why) = fit(p) {
                ui.label(
                    RichText::new(format!(
                        "This preset does not fit {}: {why}. Edit the answers or prompts to suit it.",
                        self.model
                            .as_ref()
                            .map_or_else(String::new, |m| m.source.display_name())
                    ))
                    .color(ERROR_TEXT),
                );
            }
            egui::CollapsingHeader::new("What to look for")
                .default_open(true)
                .show(ui, |ui| ui.label(&p.explanation));
        }
    }

    /// The clean and corrupted prompt editors, each with its tokens as chips once a model is
    /// loaded. Returns whether the prompts' token counts differ (flagged here, before Run).
    fn prompt_editors(&mut self, ui: &mut Ui, tokenizer: Option<&Arc<TextTokenizer>>) -> bool {
        let before = (self.settings.clean.clone(), self.settings.corrupted.clone());

        let bos = Some(self.prepend_bos());
        prompt_editor(ui, "Clean prompt", "clean", &mut self.settings.clean);
        if let Some(t) = tokenizer {
            // Both first: each row's chips mark where it differs from the other prompt.
            self.clean_tokens.update(&self.settings.clean, t, bos);
            self.corrupted_tokens.update(&self.settings.corrupted, t, bos);
            chip_row(ui, "clean", &self.clean_tokens, &self.corrupted_tokens);
        }
        prompt_editor(ui, "Corrupted prompt", "corrupted", &mut self.settings.corrupted);
        if let Some(t) = tokenizer {
            self.corrupted_tokens.update(&self.settings.corrupted, t, bos);
            chip_row(ui, "corrupted", &self.corrupted_tokens, &self.clean_tokens);
        }
        bos_toggle(ui, &mut self.settings.prepend_bos, tokenizer.map(|t| t.as_ref()));
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
        mismatch
    }

    /// The correct and incorrect answers, each checked to be one token, with the clean and
    /// corrupted runs' top predictions one click away. Returns whether both are single tokens.
    fn answer_pickers(&mut self, ui: &mut Ui, tokenizer: Option<&Arc<TextTokenizer>>) -> bool {
        // The last runs' top predictions, while they are runs of these prompts.
        let suggestions = self
            .sweep
            .as_ref()
            .filter(|s| {
                s.result.clean.text == self.settings.clean && s.result.corrupted.text == self.settings.corrupted
            })
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
                    if let Some(t) = tokenizer {
                        let tokens = if correct {
                            &mut self.correct_tokens
                        } else {
                            &mut self.incorrect_tokens
                        };
                        tokens.update(field, t, None);
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
        answers_ok
    }

    /// Run (enabled once the inputs can be swept, else saying why) and Cancel.
    fn run_controls(&mut self, ui: &mut Ui, mismatch: bool, answers_ok: bool) {
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
                self.request_run();
            }
            if ui
                .add_enabled(self.sweep_running(), egui::Button::new("Cancel"))
                .clicked()
            {
                self.cancel();
            }
            if let Some(cost) = self.planned_cost().filter(|_| reason.is_none()) {
                let cells = cost.layout.cells_to_compute(cost.first_diff);
                let time = match self.work_rate {
                    Some(rate) => format!(", about {}", fmt_seconds(cost.total(&self.sweep_options) / rate)),
                    None => String::new(),
                };
                ui.label(RichText::new(format!("{cells} cells to compute{time}")).small())
                    .on_hover_text(
                        "the cells from the first position where the prompts differ (earlier ones are free \
                         no-ops); the time is estimated from the last sweep's speed on this model",
                    );
            }
        });
        if let Some(err) = &self.sweep_error {
            ui.label(RichText::new(err.as_str()).color(ERROR_TEXT));
        }
    }

    /// The cells the current prompts' sweep computes: those from the first position where the
    /// prompts' tokens differ (earlier ones are free no-ops). None until both tokenize alike.
    pub fn cells_to_compute(&self) -> Option<usize> {
        self.planned_cost()
            .map(|cost| cost.layout.cells_to_compute(cost.first_diff))
    }

    /// The cost model of the sweep Run would start. None until both prompts tokenize alike.
    fn planned_cost(&self) -> Option<CostModel> {
        let cfg = &self.model.as_ref()?.config;
        let (clean, corrupted) = (&self.clean_tokens.ids, &self.corrupted_tokens.ids);
        if clean.is_empty() || clean.len() != corrupted.len() {
            return None;
        }
        let first_diff = clean
            .iter()
            .zip(corrupted)
            .position(|(a, b)| a != b)
            .unwrap_or(clean.len());
        let component = self.settings.component;
        let by_position = self.settings.by_position && component.has_heads();
        let layout = Layout::for_model(component, by_position, cfg, clean.len());
        Some(CostModel::new(layout, first_diff, cfg))
    }

    /// Run, as the button does: at once, or after a confirmation when the sweep is large.
    pub fn request_run(&mut self) {
        match self.cells_to_compute() {
            Some(cells) if cells > self.settings.confirm_above_cells => self.confirm_cells = Some(cells),
            _ => self.run_sweep(),
        }
    }

    /// The confirmation a large sweep asks for before it runs.
    pub(super) fn confirm_large_sweep(&mut self, ctx: &egui::Context) {
        let Some(cells) = self.confirm_cells else { return };
        let modal = egui::Modal::new(egui::Id::unique("confirm large sweep")).show(ctx, |ui| {
            ui.heading("A large sweep");
            ui.label(format!(
                "This sweep has {cells} cells to compute (more than {}): with a long prompt that \
                 differs early, that can take a long while. The status bar shows an ETA once it runs, and Cancel \
                 keeps the cells done.",
                self.settings.confirm_above_cells
            ));
            ui.horizontal(|ui| {
                if ui.button("Run anyway").clicked() {
                    self.confirm_cells = None;
                    self.run_sweep();
                }
                if ui.button("Don't run").clicked() {
                    self.confirm_cells = None;
                }
            });
        });
        if modal.should_close() {
            self.confirm_cells = None;
        }
    }

    /// Save figure…, Export data…, the colour range and the last save's message.
    fn output_controls(&mut self, ui: &mut Ui) {
        if self.sweep.as_ref().is_some_and(|s| s.result.estimate.is_some()) {
            egui::ComboBox::from_label("figures show")
                .selected_text(estimate_view_name(self.figure_view))
                .show_ui(ui, |ui| {
                    for v in [EstimateView::Exact, EstimateView::Estimate, EstimateView::Difference] {
                        ui.selectable_value(&mut self.figure_view, v, estimate_view_name(v));
                    }
                })
                .response
                .on_hover_text(
                    "What a saved figure or .npy draws of a sweep with an estimate (JSON and CSV hold both)",
                );
        }
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
        ui.horizontal(|ui| {
            let label = ui.label("Save to");
            let field = ui
                .add(
                    egui::TextEdit::singleline(&mut self.settings.save_path)
                        .hint_text("results.json, fig.png, …")
                        .desired_width(200.0),
                )
                .labelled_by(label.id)
                .on_hover_text(".json, .csv or .npy for data, .png or .svg for the figure; relative to the folder the app started in");
            let ready = self.sweep.is_some() && !self.settings.save_path.trim().is_empty();
            let enter = field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if ui.add_enabled(ready, egui::Button::new("Save")).clicked() || (ready && enter) {
                self.save_to_typed_path();
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
}

/// A prompt's tokens, recomputed when the text or the tokenizer changes.
#[derive(Default)]
pub(super) struct Tokens {
    text: String,
    tokenizer: usize,
    ids: Vec<u32>,
    tokens: Vec<String>,
    error: Option<String>,
    /// How `text` was encoded (see [`Tokens::update`]).
    prompt: Option<bool>,
}

impl Tokens {
    /// Tokenizes `text` as a prompt (`Some(prepend_bos)`) or as an answer (`None`), unless it
    /// already is.
    pub(super) fn update(&mut self, text: &str, tokenizer: &Arc<TextTokenizer>, prompt: Option<bool>) {
        let key = Arc::as_ptr(tokenizer) as usize;
        if self.text == text && self.tokenizer == key && self.prompt == prompt {
            return;
        }
        self.text = text.to_owned();
        self.tokenizer = key;
        self.prompt = prompt;
        let ids = match prompt {
            Some(prepend_bos) => tokenizer.encode_prompt_with(text, prepend_bos),
            None => tokenizer.encode_plain(text),
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

/// "Prepend BOS": for tokenizers that add none (GPT-2), the model's BOS before both prompts, as
/// TransformerLens does by default. Off matches HF; shown as position 0 in the chips when on.
fn bos_toggle(ui: &mut Ui, prepend_bos: &mut bool, tokenizer: Option<&TextTokenizer>) {
    let (enabled, why) = match tokenizer {
        None => (false, "Load a model first"),
        Some(t) if t.adds_bos() => (false, "This model's tokenizer already puts its BOS at position 0"),
        Some(t) if t.bos().is_none() => (false, "This model names no BOS token"),
        Some(_) => (true, ""),
    };
    ui.add_enabled(enabled, egui::Checkbox::new(prepend_bos, "Prepend BOS"))
        .on_hover_text(
            "Put the model's BOS token before both prompts. GPT-2's tokenizer adds none (HF's default, and \
             Patchbay's); TransformerLens prepends one by default. The choice is recorded in saved results.",
        )
        .on_disabled_hover_text(why);
}

/// A titled prompt editor. A long prompt scrolls inside it rather than pushing Run out of the panel.
fn prompt_editor(ui: &mut Ui, title: &str, salt: &str, text: &mut String) {
    ui.add_space(4.0);
    let label = ui.label(RichText::new(title).strong());
    let width = ui.available_width();
    egui::ScrollArea::vertical()
        .id_salt(format!("{salt} editor"))
        .max_height(EDITOR_MAX_HEIGHT)
        .show(ui, |ui| {
            ui.add(
                egui::TextEdit::multiline(text)
                    .desired_rows(2)
                    .desired_width(width)
                    .id_salt(salt),
            )
            .labelled_by(label.id);
        });
}

/// A prompt's tokens as chips, scrolling past [`CHIPS_MAX_HEIGHT`].
fn chip_row(ui: &mut Ui, salt: &str, tokens: &Tokens, other: &Tokens) {
    egui::ScrollArea::vertical()
        .id_salt(format!("{salt} chips"))
        .max_height(CHIPS_MAX_HEIGHT)
        .show(ui, |ui| token_chips(ui, tokens, other));
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

/// "0.8 s", "12 s", "4 min".
fn fmt_seconds(seconds: f64) -> String {
    if seconds < 10.0 {
        format!("{seconds:.1} s")
    } else if seconds < 120.0 {
        format!("{seconds:.0} s")
    } else {
        format!("{:.0} min", seconds / 60.0)
    }
}
