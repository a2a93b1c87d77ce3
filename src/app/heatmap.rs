//! The live heatmap: one texture pixel per cell (NEAREST filtering), re-uploaded when cells arrive,
//! shown in an egui_plot with token and layer axes, our own hit-testing, and a colorbar.
//! (egui_plot's `Heatmap` lays out a label per cell per frame and panics on min ≥ max.)

use egui::{Color32, ColorImage, TextureHandle, TextureOptions, Ui, Vec2};
use egui_plot::{GridInput, GridMark, Line, Plot, PlotImage, PlotPoint};

use crate::export::colormap::Scale;
use crate::patching::result::SweepResult;
use crate::patching::{Axis, Metric, View};

/// Colour of cells not computed yet.
pub const PENDING: Color32 = Color32::from_gray(60);
/// Texture pixels per cell side when a sweep has an estimate (room for the hatching).
const HATCH: usize = 4;
/// The grey estimated cells are drawn towards: a third of the way for the cell, two thirds for
/// its hatching, so the estimate's colours stay readable and exact cells stand out.
const ESTIMATE_GREY: u8 = 110;

/// `c` moved `share` of the way to [`ESTIMATE_GREY`].
fn towards_grey(c: Color32, share: f32) -> Color32 {
    let mix = |a: u8| (f32::from(a) * (1.0 - share) + f32::from(ESTIMATE_GREY) * share) as u8;
    Color32::from_rgb(mix(c.r()), mix(c.g()), mix(c.b()))
}

/// The estimate of `metric` per cell, when the result has one and the metric is estimated
/// (the logit difference and the normalized metric; the others are not linear in the activation).
pub fn estimate_grid(result: &SweepResult, metric: Metric) -> Option<&[Option<f64>]> {
    let e = result.estimate.as_ref()?;
    match metric {
        Metric::LogitDiff => Some(e.logit_diff.flat()),
        Metric::Normalized => Some(e.normalized.flat()),
        _ => None,
    }
}
const COLORBAR_WIDTH: f32 = 64.0;
/// Room egui_plot takes left of the plot for the layer axis (on top of `Plot::width`).
const Y_AXIS_WIDTH: f32 = 60.0;
/// Height of the rotated token labels under the plot.
const LABEL_STRIP: f32 = 96.0;

/// What the user did with the heatmap this frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HeatmapResponse {
    /// (row, column) of the view under the pointer: (layer, position) or (layer, head).
    pub hovered: Option<(usize, usize)>,
    /// (row, column) clicked.
    pub clicked: Option<(usize, usize)>,
}

/// Texture and view state of the heatmap.
#[derive(Default)]
pub struct Heatmap {
    texture: Option<TextureHandle>,
    dirty: bool,
    reset_view: bool,
    /// Fit the colour scale to the data instead of the metric's fixed one.
    pub auto_range: bool,
    /// The metric shown.
    pub metric: Metric,
    /// The view shown of a three-axis grid (a block sweep's component, a by-position head
    /// sweep's position).
    pub slice: usize,
    transform: Option<egui_plot::PlotTransform>,
}

/// The colour scale in use for a result.
pub fn color_scale(result: &SweepResult, metric: Metric, auto: bool) -> Scale {
    Scale::for_metric(result, metric, auto)
}

/// Plot y coordinate of a layer's centre: layer 0 at the top, as px.imshow draws it.
fn layer_y(layer: usize) -> f64 {
    -(layer as f64) - 0.5
}

fn unit_marks(input: GridInput, centre: impl Fn(f64) -> Option<f64>) -> Vec<GridMark> {
    let (lo, hi) = input.bounds;
    let span = (hi - lo).max(1.0);
    // Fewer labels when zoomed out far: keep roughly ≥ 1 mark per base step.
    let step = (input.base_step_size.max(1.0).log2().ceil().exp2()).max(1.0) as i64;
    let step = if span > 60.0 { step.max(2) } else { step };
    (lo.floor() as i64 - 1..=hi.ceil() as i64 + 1)
        .filter(|i| i.rem_euclid(step) == 0)
        .filter_map(|i| {
            centre(i as f64).map(|value| GridMark {
                value,
                step_size: step as f64,
            })
        })
        .collect()
}

impl Heatmap {
    /// A heatmap of `metric` with its fixed or a data-driven colour scale.
    pub fn new(auto_range: bool, metric: Metric) -> Self {
        Self {
            auto_range,
            metric,
            ..Self::default()
        }
    }

    /// Cells changed: re-upload the texture next frame.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Screen position of a cell's centre in the last drawn frame.
    pub fn cell_screen_pos(&self, layer: usize, position: usize) -> Option<egui::Pos2> {
        let t = self.transform.as_ref()?;
        Some(t.position_from_point(&PlotPoint::new(position as f64 + 0.5, layer_y(layer))))
    }

    /// Fit the whole grid in view next frame.
    pub fn reset_view(&mut self) {
        self.reset_view = true;
    }

    /// The view of `result` this heatmap shows.
    pub fn view(&self, result: &SweepResult) -> View {
        result.layout().view(self.slice)
    }

    /// One texture pixel per cell; with an estimate, [`HATCH`] × [`HATCH`] per cell so that cells
    /// still showing the estimate are drawn pale and hatched, the exact ones solid.
    fn image(result: &SweepResult, view: &View, metric: Metric, scale: &Scale) -> ColorImage {
        let layout = result.layout();
        let (layers, positions) = (view.rows, view.cols);
        let values = result.metric_grid(metric).map(|g| g.flat());
        let estimate = estimate_grid(result, metric);
        let px = if result.estimate.is_some() { HATCH } else { 1 };
        let (width, height) = (positions.max(1) * px, layers.max(1) * px);
        let mut pixels = vec![PENDING; width * height];
        let rgb = |v: f64| {
            let [r, g, b] = scale.color(v);
            Color32::from_rgb(r, g, b)
        };
        for l in 0..layers {
            for p in 0..positions {
                let i = layout.index(layout.view_cell(view, l, p));
                let value = values.and_then(|v| v.get(i).copied().flatten());
                let (color, estimated) = match (value, result.patched_logit_diff.flat()[i]) {
                    (Some(v), _) => (rgb(v), false),
                    (None, Some(_)) => (Color32::from_gray(247), false), // computed, metric undefined
                    (None, None) => match estimate.and_then(|e| e[i]) {
                        Some(v) => (rgb(v), true),
                        None => (PENDING, false),
                    },
                };
                for y in 0..px {
                    for x in 0..px {
                        pixels[(l * px + y) * width + p * px + x] = if !estimated {
                            color
                        } else if (x + y) % HATCH == 0 {
                            towards_grey(color, 0.65)
                        } else {
                            towards_grey(color, 0.3)
                        };
                    }
                }
            }
        }
        ColorImage::new([width, height], pixels)
    }

    /// Draws the heatmap with its colorbar and returns hover/click.
    pub fn show(&mut self, ui: &mut Ui, result: &SweepResult, selected: Option<(usize, usize)>) -> HeatmapResponse {
        let scale = color_scale(result, self.metric, self.auto_range);
        let view = self.view(result);
        if self.texture.is_none() || self.dirty {
            let image = Self::image(result, &view, self.metric, &scale);
            match &mut self.texture {
                Some(t) if t.size() == image.size => t.set(image, TextureOptions::NEAREST),
                _ => {
                    self.texture = Some(
                        ui.ctx()
                            .load_texture("patchbay-heatmap", image, TextureOptions::NEAREST),
                    )
                }
            }
            self.dirty = false;
        }
        let (layers, positions) = (view.rows, view.cols);
        let labels = result.column_labels(&view);
        let mut out = HeatmapResponse::default();
        let avail = ui.available_size();
        let plot_size = Vec2::new(
            (avail.x - COLORBAR_WIDTH - Y_AXIS_WIDTH - 12.0).max(100.0),
            (avail.y - LABEL_STRIP).max(100.0),
        );
        ui.horizontal_top(|ui| {
            ui.vertical(|ui| {
                let mut plot = Plot::new("heatmap")
                    .width(plot_size.x)
                    .height(plot_size.y)
                    .show_grid(false)
                    .show_axes([false, true])
                    .allow_double_click_reset(true)
                    .default_x_bounds(0.0, positions as f64)
                    .default_y_bounds(-(layers as f64), 0.0)
                    .y_grid_spacer(move |input| {
                        unit_marks(input, |i| {
                            let layer = -i - 1.0;
                            (layer >= 0.0 && layer < layers as f64).then_some(i + 0.5)
                        })
                    })
                    .y_axis_formatter(|mark, _| format!("{}", (-mark.value - 0.5).round() as i64))
                    .y_axis_label("layer")
                    .label_formatter(|_| None)
                    .show_x(false)
                    .show_y(false);
                if std::mem::take(&mut self.reset_view) {
                    plot = plot.reset();
                }
                let texture = self.texture.as_ref().map(|t| t.id());
                let response = plot.show(ui, |plot_ui| {
                    if let Some(id) = texture {
                        plot_ui.image(PlotImage::new(
                            "cells",
                            id,
                            PlotPoint::new(positions as f64 / 2.0, -(layers as f64) / 2.0),
                            Vec2::new(positions as f32, layers as f32),
                        ));
                    }
                    if let Some((l, p)) = selected {
                        let (x0, x1) = (p as f64, p as f64 + 1.0);
                        let (y0, y1) = (layer_y(l) - 0.5, layer_y(l) + 0.5);
                        plot_ui.line(
                            Line::new("selected", vec![[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
                                .color(Color32::from_rgb(255, 200, 0))
                                .width(3.0),
                        );
                    }
                    plot_ui.pointer_coordinate()
                });
                if let Some(pt) = response.inner {
                    let (p, l) = (pt.x.floor(), (-pt.y).floor());
                    if p >= 0.0 && l >= 0.0 && (p as usize) < positions && (l as usize) < layers {
                        out.hovered = Some((l as usize, p as usize));
                    }
                }
                let transform = response.transform;
                self.transform = Some(transform);
                let plot_response = response.response;
                // A click without a drag over a cell selects it. (The plot's own `clicked()` misses
                // clicks whose press and release land in different frames.)
                if plot_response.clicked() || ui.input(|i| i.pointer.primary_clicked()) {
                    out.clicked = out.hovered;
                }
                let plot_rect = plot_response.rect;
                if let Some((l, p)) = out.hovered {
                    plot_response.on_hover_ui_at_pointer(|ui| cell_summary(ui, result, &view, l, p));
                }
                let differs: Vec<bool> = match view.columns {
                    Axis::Position => (0..positions)
                        .map(|p| result.clean.tokens[p] != result.corrupted.tokens[p])
                        .collect(),
                    _ => vec![false; positions],
                };
                position_strip(ui, &transform, plot_rect, &labels, &differs);
            });
            colorbar(ui, &scale, plot_size.y);
        });
        out
    }
}

/// For a grid of three axes, the picker of the view shown (a block sweep's component, a by-position
/// head sweep's position). Returns whether the view changed.
pub fn view_picker(ui: &mut Ui, heatmap: &mut Heatmap, result: &SweepResult) -> bool {
    let layout = result.layout();
    let count = layout.view_count();
    if count <= 1 {
        return false;
    }
    let before = heatmap.slice;
    heatmap.slice = heatmap.slice.min(count - 1);
    ui.horizontal(|ui| {
        if result.component == crate::patching::Component::Block {
            ui.label("component");
            for (i, c) in crate::patching::Component::BLOCK_PARTS.iter().enumerate() {
                ui.selectable_value(&mut heatmap.slice, i, c.name());
            }
        } else {
            let labels = result.position_labels();
            egui::ComboBox::from_label("position")
                .selected_text(labels[heatmap.slice].clone())
                .show_ui(ui, |ui| {
                    for (p, label) in labels.iter().enumerate() {
                        ui.selectable_value(&mut heatmap.slice, p, label);
                    }
                });
            if ui.small_button("◀").on_hover_text("previous position").clicked() {
                heatmap.slice = heatmap.slice.saturating_sub(1);
            }
            if ui.small_button("▶").on_hover_text("next position").clicked() {
                heatmap.slice = (heatmap.slice + 1).min(count - 1);
            }
        }
    });
    let changed = heatmap.slice != before;
    if changed {
        heatmap.mark_dirty();
    }
    changed
}

/// Token labels under the plot, rotated to read bottom-up, one per visible position; thinned out
/// when cells are narrower than a line of text.
fn position_strip(
    ui: &mut Ui,
    transform: &egui_plot::PlotTransform,
    plot_rect: egui::Rect,
    labels: &[String],
    differs: &[bool],
) {
    let width = (plot_rect.right() - ui.cursor().left()).max(plot_rect.width());
    let (rect, _) = ui.allocate_exact_size(Vec2::new(width, LABEL_STRIP), egui::Sense::hover());
    let painter = ui.painter_at(rect);
    let font = egui::FontId::proportional(12.0);
    let cell_px = (transform.position_from_point(&PlotPoint::new(1.0, 0.0)).x
        - transform.position_from_point(&PlotPoint::new(0.0, 0.0)).x)
        .abs();
    let every = (14.0 / cell_px.max(0.1)).ceil().max(1.0) as usize;
    let text_color = ui.visuals().text_color();
    for (p, label) in labels.iter().enumerate().step_by(every) {
        let x = transform.position_from_point(&PlotPoint::new(p as f64 + 0.5, 0.0)).x;
        if x < plot_rect.left() || x > plot_rect.right() {
            continue;
        }
        let color = if differs[p] {
            Color32::from_rgb(240, 170, 60)
        } else {
            text_color
        };
        let galley = ui.painter().layout_no_wrap(label.clone(), font.clone(), color);
        // Rotated −90°: the text runs upwards from the bottom, ending just under the plot.
        let pos = egui::pos2(x - galley.size().y / 2.0, rect.top() + 4.0 + galley.size().x);
        painter.add(egui::epaint::TextShape::new(pos, galley, color).with_angle(-std::f32::consts::FRAC_PI_2));
    }
}

/// The cell's name and numbers, as the tooltip and the inspector show them.
pub fn cell_summary(ui: &mut Ui, r: &SweepResult, view: &View, row: usize, col: usize) {
    let layout = r.layout();
    let at = layout.view_cell(view, row, col);
    let i = layout.index(at);
    let mut name = format!("layer {}", at.layer);
    if let Some(p) = at.position {
        name += &format!(", position {p}: {}", r.position_labels()[p]);
    }
    if let Some(h) = at.head {
        name += &format!(", {}", r.head_labels()[h]);
    }
    if r.component == crate::patching::Component::Block {
        name = format!("{} · {name}", layout.component_of(at));
    }
    ui.label(egui::RichText::new(name).strong());
    match (r.skipped.flat()[i], r.patched_logit_diff.flat()[i]) {
        (true, _) => {
            ui.label("skipped: before the first differing token, patching is an exact no-op");
        }
        (false, Some(_)) => {
            for m in r.available_metrics() {
                let v = r.metric_at(m, i);
                ui.label(format!(
                    "{m} {}",
                    v.map(|v| format!("{v:+.4}")).unwrap_or_else(|| "undefined".into())
                ));
            }
        }
        (false, None) => match &r.estimate {
            Some(e) => {
                ui.label(format!("not verified yet; {} estimate:", e.method.label()));
                let (ld, norm) = (e.logit_diff.flat()[i], e.normalized.flat()[i]);
                let num = |v: Option<f64>| v.map_or_else(|| "undefined".into(), |v| format!("≈ {v:+.4}"));
                ui.label(format!("normalized {}", num(norm)));
                ui.label(format!("logit_diff {}", num(ld)));
                ui.label(
                    egui::RichText::new("the other metrics are not estimated: they are not linear in the activation")
                        .small(),
                );
            }
            None => {
                ui.label("not computed yet");
            }
        },
    }
    if let (Some(e), Some(exact)) = (&r.estimate, r.patched_logit_diff.flat()[i])
        && !r.skipped.flat()[i]
        && let Some(est) = e.logit_diff.flat()[i]
    {
        ui.label(format!(
            "{} estimate was {est:+.4} logit_diff (off by {:+.4})",
            e.method.label(),
            est - exact
        ));
    }
}

fn colorbar(ui: &mut Ui, scale: &Scale, height: f32) {
    let (rect, _) = ui.allocate_exact_size(Vec2::new(COLORBAR_WIDTH, height), egui::Sense::hover());
    let painter = ui.painter_at(rect);
    let bar = egui::Rect::from_min_size(
        rect.min + Vec2::new(4.0, 12.0),
        Vec2::new(16.0, (height - 40.0).max(40.0)),
    );
    let steps = 64;
    for i in 0..steps {
        let t0 = i as f32 / steps as f32;
        let v = scale.hi - (scale.hi - scale.lo) * (f64::from(i) + 0.5) / f64::from(steps);
        let [r, g, b] = scale.color(v);
        let y0 = bar.top() + t0 * bar.height();
        painter.rect_filled(
            egui::Rect::from_min_max(
                egui::pos2(bar.left(), y0),
                egui::pos2(bar.right(), y0 + bar.height() / steps as f32 + 0.5),
            ),
            0.0,
            Color32::from_rgb(r, g, b),
        );
    }
    let text = ui.visuals().text_color();
    for (k, v) in scale.ticks().into_iter().enumerate() {
        let y = bar.top() + bar.height() * k as f32 / 4.0;
        let label = if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:+.1}")
        };
        painter.text(
            egui::pos2(bar.right() + 4.0, y),
            egui::Align2::LEFT_CENTER,
            label,
            egui::FontId::proportional(11.0),
            text,
        );
    }
}
