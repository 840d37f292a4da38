//! Line charts as PNG and SVG (plotters), for `recipe plot` and the benchmark reports. The font is
//! embedded (DejaVu Sans Mono, `assets/`), so plotting needs nothing installed.

use plotters::coord::Shift;
use plotters::prelude::*;
use recipe_engine::error::{Error, Result};
use std::path::{Path, PathBuf};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

/// Matplotlib's tab10 colours.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line (or set of points) on a panel.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Draw points as well as the line.
    pub markers: bool,
}

impl Series {
    pub fn line(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            points,
            markers: false,
        }
    }
}

/// One chart.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn range(panels: &Panel, axis: impl Fn(&(f64, f64)) -> f64) -> (f64, f64) {
    let vals = panels
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(&axis))
        .filter(|v| v.is_finite());
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    (lo - pad, hi + pad)
}

/// The corner of the chart that the lines cross least, for the legend (so that it hides no
/// point): each line sampled along its segments, positions counted per corner quarter.
fn legend_corner(p: &Panel, (x0, x1): (f64, f64), (y0, y1): (f64, f64)) -> SeriesLabelPosition {
    use SeriesLabelPosition::*;
    // `hits[i]` counts the samples in `CORNERS[i]`; upper right first, so it wins ties
    const CORNERS: [SeriesLabelPosition; 4] = [UpperRight, UpperLeft, LowerRight, LowerLeft];
    let mut hits = [0usize; 4];
    let norm = |(x, y): (f64, f64)| ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0));
    for s in &p.series {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&q| norm(q))
            .collect();
        let samples = pts.windows(2).flat_map(|w| {
            (0..16).map(move |k| {
                let t = k as f64 / 16.0;
                (
                    w[0].0 + t * (w[1].0 - w[0].0),
                    w[0].1 + t * (w[1].1 - w[0].1),
                )
            })
        });
        for (u, v) in samples.chain(pts.last().copied()) {
            if (u - 0.5).abs() > 0.05 && (v - 0.5).abs() > 0.05 {
                hits[2 * usize::from(v < 0.5) + usize::from(u < 0.5)] += 1;
            }
        }
    }
    let least = (0..4).min_by_key(|&i| hits[i]).unwrap_or(0);
    CORNERS[least].clone()
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| Error::msg(format!("plotting: {e}"));
    let (x0, x1) = range(p, |q| q.0);
    let (y0, y1) = range(p, |q| q.1);
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(&p.x_label)
        .y_desc(&p.y_label)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    let n = p.series.len();
    for (i, s) in p.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()].to_rgba();
        // Earlier lines wider, so lines that coincide stay visible as nested bands.
        let width = 2 + 2 * (n - 1 - i).min(3) as u32;
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let style = ShapeStyle::from(&color).stroke_width(width);
        if s.markers {
            chart
                .draw_series(pts.iter().map(|&q| Circle::new(q, 3, style.filled())))
                .map_err(err)?;
        }
        let anno = chart
            .draw_series(LineSeries::new(pts.clone(), style))
            .map_err(err)?;
        anno.label(s.label.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
        });
    }
    chart
        .configure_series_labels()
        .position(legend_corner(p, (x0, x1), (y0, y1)))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    Ok(())
}

fn draw_all<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, panels: &[Panel]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| Error::msg(format!("plotting: {e}"));
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (a, p) in areas.iter().zip(panels) {
        draw_panel(a, p)?;
    }
    root.present().map_err(err)
}

/// Draws the panels side by side into `<stem>.png` and `<stem>.svg`; returns both paths.
pub fn draw(stem: &Path, panels: &[Panel]) -> Result<Vec<PathBuf>> {
    register_font();
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let size = (560 * panels.len().max(1) as u32, 420);
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    draw_all(BitMapBackend::new(&png, size).into_drawing_area(), panels)?;
    draw_all(SVGBackend::new(&svg, size).into_drawing_area(), panels)?;
    Ok(vec![png, svg])
}

/// The learning rate of every step of a prepared recipe (base LR times the schedule's
/// multiplier), resolved against the dataset's declared size.
pub fn lr_per_step(recipe: &recipe_engine::Recipe) -> Result<Vec<f64>> {
    let clock = recipe.clock().map_err(|e| recipe.source.locate(e))?;
    let info = recipe.data_info();
    let ctx = recipe_engine::plugin::BindContext {
        clock,
        device: recipe_engine::candle_core::Device::Cpu,
        seed: recipe.seed,
        input_shape: info.shape,
        num_classes: info.num_classes,
        path: "schedule".into(),
    };
    let base = recipe.optimizer.config.lr();
    let sched = match &recipe.schedule {
        Some(s) => Some(s.config.build(&ctx).map_err(|e| recipe.source.locate(e))?),
        None => None,
    };
    let n = clock.max_batches.unwrap_or(0);
    Ok((0..n)
        .map(|b| base * sched.as_ref().map_or(1.0, |s| s.multiplier(b)))
        .collect())
}

/// The points of `pts` on the Pareto frontier when larger y and smaller x are better, by x.
pub fn pareto_front(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<(f64, f64)> = pts
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut front: Vec<(f64, f64)> = Vec::new();
    for p in sorted {
        if front.last().is_none_or(|l| p.1 > l.1) {
            front.push(p);
        }
    }
    front
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pareto_keeps_points_nothing_beats() {
        let pts = [
            (1.0, 0.5),
            (2.0, 0.4),
            (3.0, 0.9),
            (3.0, 0.7),
            (4.0, 0.95),
            (5.0, 0.9),
        ];
        assert_eq!(
            pareto_front(&pts),
            vec![(1.0, 0.5), (3.0, 0.9), (4.0, 0.95)]
        );
    }

    #[test]
    fn png_and_svg_are_written() {
        let d = tempfile::tempdir().unwrap();
        let p = Panel {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series::line("a", vec![(0.0, 1.0), (1.0, 0.0)])],
        };
        let files = draw(&d.path().join("sub/chart"), &[p.clone(), p]).unwrap();
        let png = std::fs::read(&files[0]).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("<text"),
            "{}",
            &svg[..200]
        );
    }
}
