//! The model bar: which model (Hub repo id, folder or GGUF file, recent ones), device and dtype,
//! and the load's progress or the loaded model's summary.

use crossbeam_channel::bounded;
use egui::{RichText, Ui};

use super::presets::presets;
use super::{ERROR_TEXT, OK_TEXT, PatchbayApp};
use crate::model::{DeviceChoice, DtypeChoice};

impl PatchbayApp {
    /// The model bar: the picker row, then the load's state.
    pub(super) fn model_panel(&mut self, ui: &mut Ui) {
        self.model_picker(ui);
        self.model_status(ui);
    }

    /// The model field with Load, Open… and Recent, then the device and the dtype.
    fn model_picker(&mut self, ui: &mut Ui) {
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
                .selected_text(self.settings.dtype.name())
                .show_ui(ui, |ui| {
                    for d in DtypeChoice::ALL {
                        ui.selectable_value(&mut self.settings.dtype, d, d.name());
                    }
                })
                .response
                .on_hover_text("auto: f32 on CPU, bf16 on CUDA. Press Load to apply a change.");
        });
    }

    /// The load in progress (stage, download), the loaded model's summary, or why it failed (with
    /// the demo model one click away).
    fn model_status(&mut self, ui: &mut Ui) {
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
                        m.dtype.as_str(),
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
        // Picked up by `handle_events` on a later frame.
        self.pending_pick = Some(rx);
    }
}
