//! The status bar (progress by the work done, ETA, the sweep's state) and the keyboard's moves of
//! the selected cell.

use egui::Ui;

use super::PatchbayApp;

impl PatchbayApp {
    pub(super) fn status_bar(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            let Some(view) = &self.sweep else {
                ui.label("no sweep yet");
                return;
            };
            let r = &view.result;
            let total = r.layout().len();
            let done = r.done_cells();
            let secs = view.elapsed.unwrap_or_else(|| view.started.elapsed().as_secs_f64());
            // The bar and the ETA follow the work, not the cell count (see `Progress`).
            let fraction = if view.elapsed.is_some() {
                done as f32 / total.max(1) as f32
            } else {
                view.progress.fraction() as f32
            };
            let counted = match self.dataset_result() {
                Some(d) => format!(
                    "{}/{} pairs",
                    d.pairs
                        .iter()
                        .filter(|p| p.error.is_some() || p.result.as_ref().is_some_and(|r| r.complete))
                        .count(),
                    d.pairs.len()
                ),
                None => format!("{done}/{total} cells"),
            };
            ui.add(
                egui::ProgressBar::new(fraction)
                    .desired_width(220.0)
                    .text(format!("{:.0}% · {counted}", fraction * 100.0)),
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
            let state = match (self.dataset_result(), view.elapsed) {
                (Some(d), Some(_)) => format!(
                    "dataset {} in {secs:.1} s: {} pairs swept{}",
                    if d.complete { "done" } else { "stopped" },
                    d.swept().count(),
                    d.aggregate
                        .as_ref()
                        .map_or(String::new(), |a| format!(", mean over {}", a.pairs))
                ),
                _ => state,
            };
            ui.label(state);
            if let (Some(e), Some(a)) = (&r.estimate, crate::patching::estimate::agreement(r)) {
                ui.separator();
                let num = |v: Option<f64>, d: usize| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.d$}"));
                ui.label(format!(
                    "{} estimate · {}/{} verified · max |exact − est| {} · rank ρ {}",
                    e.method.label(),
                    a.verified,
                    a.cells,
                    num(a.max_abs_error, 3),
                    num(a.rank_correlation, 2)
                ))
                .on_hover_text(
                    "How far the estimate has been off on the cells verified so far: the largest difference in raw \
                     logit difference, and Spearman's rank correlation of exact and estimated values",
                );
            }
            ui.separator();
            ui.label(format!(
                "{} · {}{} · {} · {}",
                r.model.id,
                r.component,
                if r.by_position { " by position" } else { "" },
                r.direction,
                self.heatmap.metric
            ));
        });
    }

    pub(super) fn keyboard(&mut self, ctx: &egui::Context) {
        let Some(r) = self.result() else { return };
        let view = self.heatmap.view(r);
        let (layers, positions) = (view.rows.max(1), view.cols.max(1));
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
