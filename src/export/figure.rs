//! Standalone figures of a sweep (PNG and SVG), drawn from the data rather than grabbed from the
//! window: title naming model, component and metric; token tick labels; layer axis; colorbar.

use std::sync::Once;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::Shown;
use super::colormap::Scale;
use crate::error::{Error, Result};
use crate::patching::{Axis, SweepResult, View};

const FONT: &str = "sans-serif";
const CELL_W: i32 = 44;
const CELL_H: i32 = 22;
const LEFT: i32 = 90;
const TOP: i32 = 104;
const COLORBAR_GAP: i32 = 30;
const COLORBAR_W: i32 = 22;
const RIGHT: i32 = 110;
const BOTTOM: i32 = 150;
/// Colour of cells not computed (cancelled sweeps).
const MISSING: RGBColor = RGBColor(200, 200, 200);

fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // egui's bundled font: no system fonts needed, same look on every machine.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT);
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, epaint_default_fonts::UBUNTU_LIGHT);
    });
}

/// What one figure draws: a view of one metric on a colour scale.
struct Figure<'a> {
    r: &'a SweepResult,
    shown: Shown,
    view: View,
    scale: Scale,
}

impl<'a> Figure<'a> {
    fn new(r: &'a SweepResult, shown: &Shown) -> Self {
        Self {
            r,
            shown: *shown,
            view: r.layout().view(shown.view),
            scale: Scale::for_metric(r, shown.metric, shown.auto_range),
        }
    }
}

/// Pixel size of the figure for a result.
pub fn figure_size(result: &SweepResult, shown: &Shown) -> (u32, u32) {
    let view = result.layout().view(shown.view);
    let w = LEFT + CELL_W * view.cols as i32 + COLORBAR_GAP + COLORBAR_W + RIGHT;
    let h = TOP + CELL_H * view.rows as i32 + BOTTOM;
    (w.max(560) as u32, h as u32)
}

/// The figure's title: model, what was patched and how, the metric.
pub fn title(result: &SweepResult, shown: &Shown) -> String {
    let view = result.layout().view(shown.view);
    format!(
        "{} - {} ({}), {}",
        result.model.id,
        result.view_title(&view),
        result.direction,
        shown.metric
    )
}

/// The figure's drawing area.
type Area<DB> = DrawingArea<DB, plotters::coord::Shift>;

fn fail<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> Error {
    Error::Drawing(format!("drawing the figure failed: {e}"))
}

fn text(size: f64) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).color(&BLACK)
}

/// The whole figure: header, cells, axes, colorbar.
fn draw<DB: DrawingBackend>(root: Area<DB>, f: &Figure) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(fail)?;
    draw_header(&root, f)?;
    draw_cells(&root, f)?;
    draw_axes(&root, f)?;
    draw_colorbar(&root, f)?;
    root.present().map_err(fail)?;
    Ok(())
}

/// The title, both prompts with their answers and logit differences, and the metric.
fn draw_header<DB: DrawingBackend>(root: &Area<DB>, f: &Figure) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let r = f.r;
    root.draw(&Text::new(title(r, &f.shown), (LEFT, 18), text(20.0)))
        .map_err(fail)?;
    let grey = text(12.0).color(&RGBColor(80, 80, 80));
    let lines = [
        format!(
            "clean: {:?} -> {:?} (LD {:+.3})",
            r.clean.text, r.correct.token, r.clean_logit_diff
        ),
        format!(
            "corrupted: {:?} -> {:?} (LD {:+.3})",
            r.corrupted.text, r.incorrect.token, r.corrupted_logit_diff
        ),
        format!(
            "LD = logit({:?}) - logit({:?}) at the last position; {}: {}",
            r.correct.token,
            r.incorrect.token,
            f.shown.metric,
            f.shown.metric.definition()
        ),
    ];
    for (i, line) in lines.into_iter().enumerate() {
        root.draw(&Text::new(line, (LEFT, 44 + 15 * i as i32), grey.clone()))
            .map_err(fail)?;
    }
    Ok(())
}

/// The cells, layer 0 at the top as px.imshow draws a `[layer, pos]` matrix, and their frame.
fn draw_cells<DB: DrawingBackend>(root: &Area<DB>, f: &Figure) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (r, layout) = (f.r, f.r.layout());
    let (layers, positions) = (f.view.rows as i32, f.view.cols as i32);
    for l in 0..layers {
        for p in 0..positions {
            let i = layout.index(layout.view_cell(&f.view, l as usize, p as usize));
            let color = match r.metric_at(f.shown.metric, i) {
                Some(v) => {
                    let [red, g, b] = f.scale.color(v);
                    RGBColor(red, g, b)
                }
                None if r.patched_logit_diff.flat()[i].is_some() => RGBColor(247, 247, 247),
                None => MISSING,
            };
            let (x, y) = (LEFT + p * CELL_W, TOP + l * CELL_H);
            root.draw(&Rectangle::new([(x, y), (x + CELL_W, y + CELL_H)], color.filled()))
                .map_err(fail)?;
        }
    }
    root.draw(&Rectangle::new(
        [(LEFT, TOP), (LEFT + positions * CELL_W, TOP + layers * CELL_H)],
        BLACK.stroke_width(1),
    ))
    .map_err(fail)?;
    Ok(())
}

/// Layer ticks on the left, token ticks ("John_1"; both tokens where they differ) below, and the
/// axis titles.
fn draw_axes<DB: DrawingBackend>(root: &Area<DB>, f: &Figure) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let r = f.r;
    let (layers, positions) = (f.view.rows as i32, f.view.cols as i32);
    let grid_bottom = TOP + layers * CELL_H;
    // Every layer when they fit, else every other one.
    let step = if CELL_H >= 14 { 1 } else { 2 };
    let right_aligned = text(12.0).pos(Pos::new(HPos::Right, VPos::Center));
    for l in (0..layers).step_by(step) {
        root.draw(&Text::new(
            format!("{l}"),
            (LEFT - 8, TOP + l * CELL_H + CELL_H / 2),
            right_aligned.clone(),
        ))
        .map_err(fail)?;
    }
    let vertical = TextStyle::from((FONT, 14.0).into_font().transform(FontTransform::Rotate270)).color(&BLACK);
    root.draw(&Text::new(
        "Layer",
        (LEFT - 60, TOP + layers * CELL_H / 2 + 20),
        vertical,
    ))
    .map_err(fail)?;
    let tick = TextStyle::from((FONT, 12.0).into_font().transform(FontTransform::Rotate270))
        .color(&BLACK)
        .pos(Pos::new(HPos::Right, VPos::Center));
    let labels = r.column_labels(&f.view);
    for p in 0..positions {
        let label: String = labels[p as usize].chars().take(22).collect();
        root.draw(&Text::new(
            label,
            (LEFT + p * CELL_W + CELL_W / 2, grid_bottom + 8),
            tick.clone(),
        ))
        .map_err(fail)?;
    }
    let axis_title = match f.view.columns {
        Axis::Head if r.component.per_kv_head() => "Key/value head (the query heads it serves)",
        Axis::Head => "Head",
        _ => "Position (clean token / corrupted token)",
    };
    root.draw(&Text::new(axis_title, (LEFT, grid_bottom + BOTTOM - 24), text(14.0)))
        .map_err(fail)?;
    Ok(())
}

/// The colour scale beside the grid, from its high end (top) to its low end, with five ticks.
fn draw_colorbar<DB: DrawingBackend>(root: &Area<DB>, f: &Figure) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (layers, positions) = (f.view.rows as i32, f.view.cols as i32);
    let bar_x = LEFT + positions * CELL_W + COLORBAR_GAP;
    let bar_h = (layers * CELL_H).max(120);
    let (lo, hi) = (f.scale.lo, f.scale.hi);
    for i in 0..bar_h {
        let v = hi - (hi - lo) * f64::from(i) / f64::from(bar_h - 1);
        let [red, g, b] = f.scale.color(v);
        root.draw(&Rectangle::new(
            [(bar_x, TOP + i), (bar_x + COLORBAR_W, TOP + i + 1)],
            RGBColor(red, g, b).filled(),
        ))
        .map_err(fail)?;
    }
    root.draw(&Rectangle::new(
        [(bar_x, TOP), (bar_x + COLORBAR_W, TOP + bar_h)],
        BLACK.stroke_width(1),
    ))
    .map_err(fail)?;
    let left_aligned = text(12.0).pos(Pos::new(HPos::Left, VPos::Center));
    for (k, v) in f.scale.ticks().into_iter().enumerate() {
        let k = k as i32;
        let y = TOP + (f64::from(bar_h) * f64::from(k) / 4.0) as i32;
        root.draw(&PathElement::new(
            vec![(bar_x + COLORBAR_W, y), (bar_x + COLORBAR_W + 4, y)],
            BLACK,
        ))
        .map_err(fail)?;
        root.draw(&Text::new(
            format!("{v:+.2}"),
            (bar_x + COLORBAR_W + 8, y),
            left_aligned.clone(),
        ))
        .map_err(fail)?;
    }
    Ok(())
}

/// The figure as SVG text.
pub fn to_svg(result: &SweepResult, shown: &Shown) -> Result<String> {
    register_fonts();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, figure_size(result, shown)).into_drawing_area();
        draw(root, &Figure::new(result, shown))?;
    }
    Ok(svg)
}

/// The figure as PNG bytes, at `scale` × the base size (2 for slides).
pub fn to_png(result: &SweepResult, shown: &Shown) -> Result<Vec<u8>> {
    register_fonts();
    let (w, h) = figure_size(result, shown);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(root, &Figure::new(result, shown))?;
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .map_err(|e| Error::Drawing(format!("encoding PNG failed: {e}")))?;
        writer
            .write_image_data(&rgb)
            .map_err(|e| Error::Drawing(format!("encoding PNG failed: {e}")))?;
    }
    Ok(out)
}
