//! Line charts as SVG files (plotters' SVG backend only: no font or system library, the
//! SVG viewer draws the text): [`LogXChart`] against a log2 x axis (clients, batch
//! sizes), [`TimeChart`] as panels stacked over one linear x axis (time).

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::Path;

/// Line colours, dark enough on white (Tableau 10).
const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// One line: a name for the legend and its (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// The axes of a chart: descriptions, tick label formats and, when not plotters' default,
/// how many x labels.
struct Axes<'f> {
    x_desc: &'f str,
    y_desc: &'f str,
    x_labels: Option<usize>,
    x_fmt: &'f dyn Fn(&f64) -> String,
    y_fmt: &'f dyn Fn(&f64) -> String,
}

/// Draws the mesh with `axes`, then each of `series` as a line of its own colour (its points
/// mapped by `points`) with its name in a legend at `legend`.
fn draw_lines<'a, 'b: 'a>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    axes: Axes<'_>,
    series: &[Series],
    points: impl Fn(&Series) -> Vec<(f64, f64)>,
    legend: SeriesLabelPosition,
    err: &dyn Fn(&dyn std::fmt::Display) -> anyhow::Error,
) -> Result<()> {
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(axes.x_desc).y_desc(axes.y_desc);
    if let Some(n) = axes.x_labels {
        mesh.x_labels(n);
    }
    mesh.x_label_formatter(axes.x_fmt)
        .y_label_formatter(axes.y_fmt)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let (r, g, b) = PALETTE[i % PALETTE.len()];
        let color = RGBColor(r, g, b);
        chart
            .draw_series(LineSeries::new(points(s), color.stroke_width(2)).point_size(3))
            .map_err(|e| err(&e))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    Ok(())
}

/// A chart of `series` against an x axis on a log2 scale (ticks at powers of two, covering
/// at least `x_span`), y from 0.
pub struct LogXChart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x_span: (f64, f64),
    pub series: &'a [Series],
}

impl LogXChart<'_> {
    /// Writes the chart to `path` (SVG).
    pub fn write_svg(&self, path: &Path) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .filter(|x| *x > 0.0);
        let (lo, hi) = xs.fold(self.x_span, |(lo, hi), x| (lo.min(x), hi.max(x)));
        let (lo, hi) = (
            lo.max(1e-9).log2().floor(),
            hi.max(1e-9).log2().ceil().max(lo.log2().floor() + 1.0),
        );
        let y_max = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0f64, f64::max);
        let y_max = if y_max > 0.0 { y_max * 1.12 } else { 1.0 };

        let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(self.title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(80)
            .build_cartesian_2d(lo..hi, 0.0..y_max)
            .map_err(|e| err(&e))?;
        let tick = |v: &f64| {
            if (v - v.round()).abs() < 1e-6 {
                format!("{}", 2f64.powf(v.round()))
            } else {
                String::new()
            }
        };
        let y_fmt = |v: &f64| crate::report::thousands(*v);
        draw_lines(
            &mut chart,
            Axes {
                x_desc: self.x_label,
                y_desc: self.y_label,
                x_labels: Some((hi - lo) as usize + 1),
                x_fmt: &tick,
                y_fmt: &y_fmt,
            },
            self.series,
            |s| {
                s.points
                    .iter()
                    .filter(|(x, _)| *x > 0.0)
                    .map(|(x, y)| (x.log2(), *y))
                    .collect()
            },
            SeriesLabelPosition::UpperLeft,
            &err,
        )?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

/// One panel of a [`TimeChart`]: its y axis and lines.
pub struct Panel<'a> {
    pub y_label: &'a str,
    pub series: &'a [Series],
}

/// Panels stacked vertically, each with its own y axis from 0, over one linear x axis from
/// 0 (e.g. minutes since the start of a run).
pub struct TimeChart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub panels: &'a [Panel<'a>],
}

impl TimeChart<'_> {
    /// Writes the chart to `path` (SVG).
    pub fn write_svg(&self, path: &Path) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
        let x_max = self
            .panels
            .iter()
            .flat_map(|p| p.series.iter())
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .fold(0.0f64, f64::max);
        let x_max = if x_max > 0.0 { x_max } else { 1.0 };
        let height = 40 + 300 * self.panels.len().max(1) as u32;
        let root = SVGBackend::new(path, (960, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let root = root
            .titled(self.title, ("sans-serif", 22))
            .map_err(|e| err(&e))?;
        let areas = root.split_evenly((self.panels.len().max(1), 1));
        for (panel, area) in self.panels.iter().zip(&areas) {
            let y_max = panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.1))
                .fold(0.0f64, f64::max);
            let y_max = if y_max > 0.0 { y_max * 1.12 } else { 1.0 };
            let mut chart = ChartBuilder::on(area)
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(80)
                .build_cartesian_2d(0.0..x_max, 0.0..y_max)
                .map_err(|e| err(&e))?;
            let y_fmt = |v: &f64| {
                if y_max < 10.0 {
                    format!("{v:.1}")
                } else {
                    crate::report::thousands(*v)
                }
            };
            let x_fmt = |v: &f64| {
                if x_max < 10.0 {
                    format!("{v:.1}")
                } else {
                    format!("{v:.0}")
                }
            };
            draw_lines(
                &mut chart,
                Axes {
                    x_desc: self.x_label,
                    y_desc: panel.y_label,
                    x_labels: None,
                    x_fmt: &x_fmt,
                    y_fmt: &y_fmt,
                },
                panel.series,
                |s| s.points.clone(),
                SeriesLabelPosition::LowerRight,
                &err,
            )?;
        }
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_axes_and_legend() {
        let dir = std::env::temp_dir().join(format!("chart-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        let series = [
            Series {
                name: "alpha".into(),
                points: vec![(1.0, 10.0), (4.0, 30.0), (256.0, 25.0)],
            },
            Series {
                name: "beta".into(),
                points: vec![(1.0, 5.0), (16.0, 50.0)],
            },
        ];
        LogXChart {
            title: "rates",
            x_label: "clients",
            y_label: "orders/s",
            x_span: (1.0, 256.0),
            series: &series,
        }
        .write_svg(&path)
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert!(svg.starts_with("<svg"), "{}", &svg[..60.min(svg.len())]);
        // plotters writes each text on a line of its own.
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        for text in [
            "alpha", "beta", "clients", "orders/s", "rates", "1", "16", "256",
        ] {
            assert!(texts.contains(&text), "no {text} in the SVG");
        }
        assert!(!texts.contains(&"512") && !texts.contains(&"0.5"));
    }

    #[test]
    fn writes_panels_over_time() {
        let dir = std::env::temp_dir().join(format!("chart-time-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        let rate = [Series {
            name: "orders/s".into(),
            points: vec![(1.0, 5000.0), (2.0, 4900.0)],
        }];
        let p99 = [Series {
            name: "p99".into(),
            points: vec![(1.0, 12.0), (2.0, 15.0)],
        }];
        TimeChart {
            title: "soak",
            x_label: "minutes",
            panels: &[
                Panel {
                    y_label: "rate",
                    series: &rate,
                },
                Panel {
                    y_label: "ms",
                    series: &p99,
                },
            ],
        }
        .write_svg(&path)
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        for text in ["soak", "minutes", "rate", "ms", "orders/s", "p99"] {
            assert!(texts.contains(&text), "no {text} in the SVG");
        }
    }
}
