//! `coordinator plot`: training curves from a run's `metrics.jsonl`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Deserialize;

use super::chart::{ChartArea, colour, draw_error, padded_range, render_png, tick};
use crate::error::{Error, Result};

/// Chart size in pixels: four panels in a 2 x 2 grid.
pub const SIZE: (u32, u32) = (1200, 900);

/// Plot training curves (ELBO, reconstruction, KL, throughput) from a run's metrics.jsonl.
///
/// Draws the training curves of a run, per epoch, in four panels: the ELBO (training, held-out
/// and, where evaluated, the held-out importance-weighted bound), the reconstruction term and the
/// KL term (training and held-out), and the throughput in training examples per second.
#[derive(Debug, Clone, clap::Args)]
pub struct PlotArgs {
    /// A run's `metrics.jsonl` (one JSON object per epoch).
    #[arg(long)]
    pub metrics: PathBuf,
    /// PNG file to write.
    #[arg(long, default_value = "curves.png")]
    pub out: PathBuf,
}

/// The fields of a `metrics.jsonl` line that the plot uses (others are ignored; any of these but
/// `epoch` may be missing).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MetricsLine {
    pub epoch: f64,
    pub train_elbo: Option<f64>,
    pub heldout_elbo: Option<f64>,
    pub recon: Option<f64>,
    pub kl: Option<f64>,
    pub heldout_recon: Option<f64>,
    pub heldout_kl: Option<f64>,
    pub samples_per_s: Option<f64>,
    pub heldout_iw_bound: Option<f64>,
}

/// Reads every non-blank line of `path`; an unreadable line is an error naming its number.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsLine>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Io(format!("cannot read metrics {}: {e}", path.display())))?;
    let lines: Vec<MetricsLine> = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| {
                Error::Config(format!(
                    "{} line {}: not a metrics record ({e})",
                    path.display(),
                    i + 1
                ))
            })
        })
        .collect::<Result<_>>()?;
    if lines.is_empty() {
        return Err(Error::Config(format!(
            "{} has no metrics yet: a run writes a line per finished epoch",
            path.display()
        )));
    }
    Ok(lines)
}

/// One curve: a name for the legend, a colour and its points (epoch, value).
struct Curve {
    name: &'static str,
    colour: RGBColor,
    points: Vec<(f64, f64)>,
}

fn curve(
    lines: &[MetricsLine],
    name: &'static str,
    colour_index: usize,
    field: impl Fn(&MetricsLine) -> Option<f64>,
) -> Curve {
    Curve {
        name,
        colour: colour(colour_index),
        points: lines
            .iter()
            .filter_map(|l| field(l).filter(|v| v.is_finite()).map(|v| (l.epoch, v)))
            .collect(),
    }
}

/// Draws the curves of `lines` into `path`.
pub fn write_curves(path: &Path, lines: &[MetricsLine]) -> Result<()> {
    let panels = [
        (
            "ELBO",
            "nats per example",
            vec![
                curve(lines, "train", 0, |l| l.train_elbo),
                curve(lines, "held-out", 1, |l| l.heldout_elbo),
                curve(lines, "held-out IW bound", 2, |l| l.heldout_iw_bound),
            ],
        ),
        (
            "Reconstruction E[log p(x|z)]",
            "nats per example",
            vec![
                curve(lines, "train", 0, |l| l.recon),
                curve(lines, "held-out", 1, |l| l.heldout_recon),
            ],
        ),
        (
            "KL(q(z|x) || p(z))",
            "nats per example",
            vec![
                curve(lines, "train", 0, |l| l.kl),
                curve(lines, "held-out", 1, |l| l.heldout_kl),
            ],
        ),
        (
            "Throughput",
            "training examples / s",
            vec![curve(lines, "train", 0, |l| l.samples_per_s)],
        ),
    ];
    let (x0, x1) = padded_range(lines.iter().map(|l| l.epoch));
    // One tick per epoch for short runs (so ticks fall on whole epochs), at most 10.
    let x_ticks = lines.len().clamp(2, 10);
    render_png(path, SIZE, |root| {
        let areas = root.split_evenly((2, 2));
        for (area, (title, y_desc, curves)) in areas.iter().zip(&panels) {
            panel(area, title, y_desc, (x0, x1, x_ticks), curves)?;
        }
        Ok(())
    })
}

fn panel(
    area: &ChartArea<'_>,
    title: &str,
    y_desc: &str,
    (x0, x1, x_ticks): (f64, f64, usize),
    curves: &[Curve],
) -> Result<()> {
    let err = |e| draw_error(title, e);
    let (y0, y1) = padded_range(curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_labels(x_ticks)
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .draw()
        .map_err(err)?;
    for c in curves.iter().filter(|c| !c.points.is_empty()) {
        let style = c.colour.stroke_width(2);
        chart
            .draw_series(LineSeries::new(c.points.iter().copied(), style))
            .map_err(err)?
            .label(c.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        // Markers, so a single epoch (or a bound evaluated once) is visible too.
        chart
            .draw_series(
                c.points
                    .iter()
                    .map(|&p| Circle::new(p, 3, c.colour.filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    Ok(())
}

pub fn run(args: &PlotArgs) -> Result<()> {
    let lines = read_metrics(&args.metrics)?;
    write_curves(&args.out, &lines)?;
    println!(
        "wrote the curves of {} epochs to {}",
        lines.len(),
        args.out.display()
    );
    Ok(())
}
