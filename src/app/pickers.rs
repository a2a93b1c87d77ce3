//! The patch pickers under the answers: component and by position, direction with how to read
//! it, the metric shown, and whether Run draws an attribution-patching estimate first.

use egui::{RichText, Ui};

use super::PatchbayApp;
use super::settings::Verify;
use crate::patching::estimate::{EstimateMethod, EstimateView};
use crate::patching::{Component, Direction, Metric};

impl PatchbayApp {
    /// What to patch (component, by position), in which direction, and the metric shown.
    pub(super) fn patch_pickers(&mut self, ui: &mut Ui) {
        egui::ComboBox::from_label("Component")
            .selected_text(self.settings.component.name())
            .show_ui(ui, |ui| {
                for c in Component::ALL {
                    ui.selectable_value(&mut self.settings.component, c, c.name())
                        .on_hover_text(c.describe());
                }
            })
            .response
            .on_hover_text(self.settings.component.describe());
        let heads = self.settings.component.has_heads();
        ui.add_enabled(
            heads,
            egui::Checkbox::new(&mut self.settings.by_position, "by position"),
        )
        .on_hover_text(
            "One cell per (layer, position, head) rather than per (layer, head): pick the position above the heatmap",
        )
        .on_disabled_hover_text("Only head components have a per-head cell at each position");
        egui::ComboBox::from_label("Direction")
            .selected_text(self.settings.direction.name())
            .show_ui(ui, |ui| {
                for d in Direction::ALL {
                    ui.selectable_value(&mut self.settings.direction, d, d.name())
                        .on_hover_text(d.reading());
                }
            });
        ui.label(RichText::new(self.settings.direction.reading()).small())
            .on_hover_text("Heimersheim & Nanda, \"How to use and interpret activation patching\" (2024)");
        let before = self.settings.metric;
        egui::ComboBox::from_label("Metric")
            .selected_text(self.settings.metric.name())
            .show_ui(ui, |ui| {
                for m in Metric::ALL {
                    ui.selectable_value(&mut self.settings.metric, m, m.name())
                        .on_hover_text(m.definition());
                }
            })
            .response
            .on_hover_text(format!(
                "{}. Every metric is computed for every cell: switching redraws at once.",
                self.settings.metric.definition()
            ));
        if self.settings.metric != before {
            self.heatmap.metric = self.settings.metric;
            self.heatmap.mark_dirty();
        }
        self.estimate_pickers(ui);
    }

    /// Whether Run draws an attribution-patching estimate first, and which cells it verifies.
    fn estimate_pickers(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            let mut on = self.settings.estimate.is_some();
            ui.checkbox(&mut on, "Estimate first").on_hover_text(
                "Attribution patching: every cell estimated at once from one forward and one backward \
                     (drawn pale and hatched), then exact cells replace it, largest estimated effect first",
            );
            if on != self.settings.estimate.is_some() {
                self.settings.estimate = on.then_some(EstimateMethod::AtpStar);
            }
            if let Some(method) = &mut self.settings.estimate {
                egui::ComboBox::from_label("method")
                    .selected_text(method.label())
                    .show_ui(ui, |ui| {
                        for m in EstimateMethod::ALL {
                            ui.selectable_value(method, m, m.label()).on_hover_text(match m {
                                EstimateMethod::AtpStar => {
                                    "AtP*: queries and keys through the exact attention softmax (Kramár et al. 2024)"
                                }
                                EstimateMethod::Atp => "AtP: first order through everything (Nanda 2023)",
                            });
                        }
                    });
            }
        });
        if self.settings.estimate.is_none() {
            return;
        }
        ui.horizontal(|ui| {
            egui::ComboBox::from_label("verified exactly")
                .selected_text(match self.settings.verify {
                    Verify::All => "all cells",
                    Verify::Top => "the top",
                    Verify::None => "none",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.settings.verify, Verify::All, "all cells");
                    ui.selectable_value(&mut self.settings.verify, Verify::Top, "the top");
                    ui.selectable_value(&mut self.settings.verify, Verify::None, "none");
                })
                .response
                .on_hover_text("Which cells are computed exactly after the estimate, most important first");
            if self.settings.verify == Verify::Top {
                let label = ui.label("cells:");
                ui.add(egui::DragValue::new(&mut self.settings.verify_top).range(1..=1_000_000))
                    .labelled_by(label.id)
                    .on_hover_text("How many cells, by estimated effect");
            }
        });
    }
}

/// A figure view's name in the picker.
pub(super) fn estimate_view_name(v: EstimateView) -> &'static str {
    match v {
        EstimateView::Exact => "the exact cells",
        EstimateView::Estimate => "the estimate",
        EstimateView::Difference => "exact − estimate",
    }
}
