//! The inspector: the selected cell's patched run beside the clean and corrupted runs (answer
//! logits, logit differences, top-10 next tokens).

use egui::{Color32, RichText, Ui};

use super::{ERROR_TEXT, PatchbayApp, heatmap};
use crate::patching::{SweepResult, TopToken};

impl PatchbayApp {
    pub(super) fn inspector(&mut self, ui: &mut Ui) {
        ui.heading("Inspector");
        let Some(view) = &self.sweep else {
            ui.label("Run a sweep, then click a cell to see what the patched model predicts.");
            return;
        };
        let r = &view.result;
        if view.elapsed.is_some() && self.settings_differ_from(r) {
            ui.label(RichText::new("These runs are the previous prompts'.").color(ERROR_TEXT));
        }
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
        let v = self.heatmap.view(r);
        let Some((l, p)) = self.selected.filter(|&(l, p)| l < v.rows && p < v.cols) else {
            ui.label("Click a cell (arrow keys move the selection).");
            top_table(ui, "clean run", &r.clean_top_k, r);
            top_table(ui, "corrupted run", &r.corrupted_top_k, r);
            return;
        };
        heatmap::cell_summary(ui, r, &v, l, p);
        let layout = r.layout();
        let cell = layout.index(layout.view_cell(&v, l, p));
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
                    ("patched", r.answer_logits.flat()[cell]),
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
            top_table(ui, "patched run", &r.top_k.flat()[cell], r);
            top_table(ui, "clean run", &r.clean_top_k, r);
            top_table(ui, "corrupted run", &r.corrupted_top_k, r);
        });
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
