//! The inspector: the selected cell's patched run beside the clean and corrupted runs (answer
//! logits, logit differences, top-10 next tokens) and, for a head cell, the head's attention
//! pattern in the three runs (computed by the worker on demand).

use egui::{Color32, RichText, Ui};

use super::{ERROR_TEXT, PatchbayApp, heatmap};
use crate::patching::{HeadPatterns, PatternRequest};
use crate::patching::{SweepResult, TopToken};
use crate::worker::Command;

impl PatchbayApp {
    pub(super) fn inspector(&mut self, ui: &mut Ui) {
        ui.heading("Inspector");
        if self.sweep.is_none() && self.dataset.run.is_none() {
            ui.label("Run a sweep, then click a cell to see what the patched model predicts.");
            return;
        }
        if self.dataset.run.is_some() {
            self.dataset_inspector(ui);
            ui.separator();
        }
        let Some(view) = &self.sweep else { return };
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
        if r.estimate.is_some() {
            estimate_scatter(ui, r, self.heatmap.metric);
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
        if self.dataset.run.as_ref().is_some_and(|d| d.showing.is_none()) {
            // The mean over pairs has no run of its own: its distribution is above.
            return;
        }
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
        let at = layout.view_cell(&v, l, p);
        let wanted = (r.component.has_heads()
            && !r.skipped.flat()[cell]
            && r.patched_logit_diff.flat()[cell].is_some())
        .then(|| PatternRequest {
            clean_ids: r.clean.token_ids.clone(),
            corrupted_ids: r.corrupted.token_ids.clone(),
            component: r.component,
            direction: r.direction,
            by_position: r.by_position,
            at,
        });
        let labels = r.position_labels();
        let head_names = r.head_labels();
        egui::ScrollArea::vertical().show(ui, |ui| {
            if let Some(request) = wanted {
                if self.patterns.as_ref().is_none_or(|(asked, _)| *asked != request)
                    && self.worker.send(Command::HeadPatterns(request.clone()))
                {
                    self.patterns = Some((request, None));
                }
                ui.add_space(4.0);
                match &self.patterns {
                    Some((_, Some(Ok(patterns)))) => pattern_table(ui, patterns, &labels),
                    Some((_, Some(Err(e)))) => {
                        ui.label(RichText::new(format!("attention pattern: {e}")).color(ERROR_TEXT));
                    }
                    _ => {
                        ui.label(format!(
                            "computing {}'s attention pattern…",
                            head_names[at.head.unwrap_or(0)]
                        ));
                    }
                }
            }
            top_table(ui, "patched run", &r.top_k.flat()[cell], r);
            top_table(ui, "clean run", &r.clean_top_k, r);
            top_table(ui, "corrupted run", &r.corrupted_top_k, r);
        });
    }
}

/// Width of one source position's square in the attention table.
const PATTERN_CELL: f32 = 14.0;

/// The head's attention at the last position over the source positions: a row of squares per run
/// (darker = more attention), per query head; hover a square for its token and weight.
fn pattern_table(ui: &mut Ui, p: &HeadPatterns, labels: &[String]) {
    ui.label(
        RichText::new(format!(
            "attention from the last position (layer {})",
            p.request.at.layer
        ))
        .strong(),
    );
    egui::ScrollArea::horizontal().id_salt("pattern").show(ui, |ui| {
        egui::Grid::new("pattern rows")
            .num_columns(2)
            .spacing([6.0, 2.0])
            .show(ui, |ui| {
                for (i, &h) in p.query_heads.iter().enumerate() {
                    for (run, rows) in [
                        ("clean", &p.clean),
                        ("corrupted", &p.corrupted),
                        ("patched", &p.patched),
                    ] {
                        ui.label(RichText::new(format!("H{h} {run}")).small());
                        let row = &rows[i];
                        let (rect, response) = ui.allocate_exact_size(
                            egui::vec2(PATTERN_CELL * row.len() as f32, PATTERN_CELL),
                            egui::Sense::hover(),
                        );
                        let painter = ui.painter_at(rect);
                        for (s, &w) in row.iter().enumerate() {
                            let x = rect.left() + PATTERN_CELL * s as f32;
                            let shade = (255.0 * (1.0 - w.clamp(0.0, 1.0))) as u8;
                            let square = egui::Rect::from_min_size(
                                egui::pos2(x, rect.top()),
                                egui::vec2(PATTERN_CELL - 1.0, PATTERN_CELL - 1.0),
                            );
                            painter.rect_filled(square, 0.0, Color32::from_rgb(shade, shade, 255));
                        }
                        if let Some(pos) = response.hover_pos() {
                            let s = (((pos.x - rect.left()) / PATTERN_CELL) as usize).min(row.len().saturating_sub(1));
                            response.on_hover_text(format!(
                                "{}: {:.3}",
                                labels.get(s).map_or("?", String::as_str),
                                row[s]
                            ));
                        }
                        ui.end_row();
                    }
                }
            });
    });
    // The strongest source in the patched run, in words.
    if let Some((s, w)) = p
        .patched
        .first()
        .and_then(|row| row.iter().copied().enumerate().max_by(|a, b| a.1.total_cmp(&b.1)))
    {
        ui.label(
            RichText::new(format!(
                "patched run attends most to {} ({w:.2})",
                labels.get(s).map_or("?", String::as_str)
            ))
            .small(),
        );
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

/// Height of the estimate-against-exact scatter.
const SCATTER_HEIGHT: f32 = 170.0;

/// The verified cells' estimate (x) against their exact value (y), with the diagonal: how far the
/// estimate can be trusted on the cells not verified yet.
fn estimate_scatter(ui: &mut Ui, r: &SweepResult, metric: crate::patching::Metric) {
    use crate::patching::Metric;
    use egui_plot::{Line, Plot, Points};
    let Some(e) = &r.estimate else { return };
    // The estimate has the logit difference and the normalized metric; other metrics show the latter.
    let (exact, est, name) = match metric {
        Metric::LogitDiff => (r.patched_logit_diff.flat(), e.logit_diff.flat(), "logit_diff"),
        _ => (r.values.flat(), e.normalized.flat(), "normalized"),
    };
    let points: Vec<[f64; 2]> = exact
        .iter()
        .zip(est)
        .zip(r.skipped.flat())
        .filter(|(_, skipped)| !**skipped)
        .filter_map(|((x, e), _)| Some([(*e)?, (*x)?]))
        .collect();
    egui::CollapsingHeader::new(format!(
        "{} estimate vs exact ({} cells)",
        e.method.label(),
        points.len()
    ))
    .default_open(true)
    .show(ui, |ui| {
        let (lo, hi) = points
            .iter()
            .flatten()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let (lo, hi) = if lo < hi { (lo, hi) } else { (-1.0, 1.0) };
        Plot::new("estimate scatter")
            .height(SCATTER_HEIGHT)
            .data_aspect(1.0)
            .x_axis_label(format!("estimate ({name})"))
            .y_axis_label("exact")
            .allow_scroll(false)
            .show(ui, |plot| {
                plot.line(Line::new("exact = estimate", vec![[lo, lo], [hi, hi]]).color(Color32::from_gray(140)));
                plot.points(
                    Points::new("verified cells", points)
                        .radius(2.5)
                        .color(Color32::from_rgb(90, 150, 230)),
                );
            });
    });
}
