//! `coordinator scatter`: where held-out examples land in latent space, coloured by class.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::model::{ModelConfig, encode};
use ndarray::ArrayView2;
use plotters::prelude::*;

use super::chart::{colour, draw_error, padded_range, render_png, tick};
use super::inputs::{LabelNames, SavedModel};
use crate::error::{Error, Result};

/// Chart size in pixels.
pub const SIZE: (u32, u32) = (900, 800);

/// Power-iteration steps for each principal axis: the covariance is at most a few hundred
/// dimensions square, so this costs microseconds and converges far below plotting precision
/// unless the top two eigenvalues nearly tie (then any vector in their span is as good a view).
const POWER_ITERATIONS: usize = 500;

/// Plot held-out examples' posterior means in 2-D (principal axes beyond two dimensions).
///
/// Encodes held-out examples and plots their posterior means mu: the two coordinates of a 2-D
/// latent space, or for a larger one its projection on the first two principal axes (PCA of the
/// means). Points are coloured by class label with a legend; data without labels is one colour.
#[derive(Debug, Clone, clap::Args)]
pub struct ScatterArgs {
    /// The trained model (a run's `model.safetensors`).
    #[arg(long)]
    pub model: PathBuf,
    /// Data: `synthetic`, `idx:IMAGES[,LABELS]`, `npy:PATH[,LABELS]`, `mnist[:DIR]` [default:
    /// the data the model was trained on].
    #[arg(long)]
    pub data: Option<String>,
    /// PNG file to write.
    #[arg(long, default_value = "scatter.png")]
    pub out: PathBuf,
    /// Points to plot (the first n held-out examples).
    #[arg(long, default_value_t = 2000)]
    pub n: usize,
    /// Held-out examples at the end of the data [default: as the run].
    #[arg(long)]
    pub holdout: Option<usize>,
}

/// 2-D coordinates of the posterior means, with axis names.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    pub points: Vec<(f64, f64)>,
    pub x_label: String,
    pub y_label: String,
}

/// Projects rows of `mu: [n, Z]` to 2-D: the coordinates themselves for Z <= 2 (Z = 1 puts all
/// points on y = 0), else the first two principal components.
pub fn project(mu: ArrayView2<f32>) -> Projection {
    let z = mu.ncols();
    let get = |i: usize, j: usize| mu[[i, j]] as f64;
    match z {
        1 => Projection {
            points: (0..mu.nrows()).map(|i| (get(i, 0), 0.0)).collect(),
            x_label: "z[0] (posterior mean)".into(),
            y_label: String::new(),
        },
        2 => Projection {
            points: (0..mu.nrows()).map(|i| (get(i, 0), get(i, 1))).collect(),
            x_label: "z[0] (posterior mean)".into(),
            y_label: "z[1] (posterior mean)".into(),
        },
        _ => {
            let (axes, share) = principal_axes(mu);
            let mean: Vec<f64> = (0..z)
                .map(|j| (0..mu.nrows()).map(|i| get(i, j)).sum::<f64>() / mu.nrows() as f64)
                .collect();
            let along = |i: usize, axis: &[f64]| -> f64 {
                (0..z).map(|j| (get(i, j) - mean[j]) * axis[j]).sum()
            };
            Projection {
                points: (0..mu.nrows())
                    .map(|i| (along(i, &axes[0]), along(i, &axes[1])))
                    .collect(),
                x_label: format!("PC 1 of the posterior means ({:.0}% of variance)", share[0]),
                y_label: format!("PC 2 ({:.0}% of variance)", share[1]),
            }
        }
    }
}

/// The top two eigenvectors of the covariance of `x`'s rows (power iteration with deflation, in
/// f64), each signed so its largest component is positive, and the percentage of the total
/// variance each explains.
pub fn principal_axes(x: ArrayView2<f32>) -> ([Vec<f64>; 2], [f64; 2]) {
    let (n, d) = x.dim();
    let mean: Vec<f64> = (0..d)
        .map(|j| x.column(j).iter().map(|&v| v as f64).sum::<f64>() / n.max(1) as f64)
        .collect();
    // cov: [d, d], row-major.
    let mut cov = vec![0.0f64; d * d];
    for row in x.rows() {
        let c: Vec<f64> = row.iter().zip(&mean).map(|(&v, m)| v as f64 - m).collect();
        for a in 0..d {
            for b in 0..d {
                cov[a * d + b] += c[a] * c[b];
            }
        }
    }
    cov.iter_mut().for_each(|v| *v /= n.max(1) as f64);
    let total: f64 = (0..d).map(|a| cov[a * d + a]).sum();

    let mut axes: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut share = [0.0; 2];
    for (k, axis) in axes.iter_mut().enumerate() {
        // A fixed, generic start vector: deterministic, and not orthogonal to the top axis
        // except by measure-zero accident.
        let mut v: Vec<f64> = (0..d).map(|j| 1.0 + 0.1 * j as f64).collect();
        normalise(&mut v);
        let mut lambda = 0.0;
        for _ in 0..POWER_ITERATIONS {
            let mut w: Vec<f64> = (0..d)
                .map(|a| (0..d).map(|b| cov[a * d + b] * v[b]).sum())
                .collect();
            lambda = w.iter().zip(&v).map(|(a, b)| a * b).sum();
            if normalise(&mut w) == 0.0 {
                break; // no variance left
            }
            v = w;
        }
        let biggest = v
            .iter()
            .copied()
            .fold(0.0f64, |m, c| if c.abs() > m.abs() { c } else { m });
        if biggest < 0.0 {
            v.iter_mut().for_each(|c| *c = -*c);
        }
        // Deflate: remove this axis's variance before finding the next.
        for a in 0..d {
            for b in 0..d {
                cov[a * d + b] -= lambda * v[a] * v[b];
            }
        }
        share[k] = if total > 0.0 {
            100.0 * lambda.max(0.0) / total
        } else {
            0.0
        };
        *axis = v;
    }
    (axes, share)
}

/// Scales `v` to unit length; returns its previous length.
fn normalise(v: &mut [f64]) -> f64 {
    let norm = v.iter().map(|c| c * c).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|c| *c /= norm);
    }
    norm
}

/// Encodes `x: [n, D]` with the model `(config, params)` and writes the scatter chart of the
/// posterior means to `path`, one colour per label (`labels[i]` belongs to row `i`).
pub fn write_scatter(
    path: &Path,
    config: &ModelConfig,
    params: &[f32],
    x: ArrayView2<f32>,
    labels: Option<&[u8]>,
    names: LabelNames,
) -> Result<()> {
    if x.nrows() == 0 {
        return Err(Error::Config("no examples to plot".into()));
    }
    if labels.is_some_and(|l| l.len() != x.nrows()) {
        return Err(Error::Config("one label per example is needed".into()));
    }
    let mu = encode(config, params, x)?.mu; // [n, Z]
    let projection = project(mu.view());
    // Points grouped by label, in label order (one group, `None`, without labels).
    let mut groups: BTreeMap<Option<u8>, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, &p) in projection.points.iter().enumerate() {
        groups.entry(labels.map(|l| l[i])).or_default().push(p);
    }
    let (x0, x1) = padded_range(projection.points.iter().map(|p| p.0));
    let (y0, y1) = padded_range(projection.points.iter().map(|p| p.1));
    let title = format!(
        "Latent space: {} held-out examples, {}-D latent",
        x.nrows(),
        config.latent
    );
    render_png(path, SIZE, |root| {
        let err = |e| draw_error("the scatter plot", e);
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 24))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(projection.x_label.as_str())
            .y_desc(projection.y_label.as_str())
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .draw()
            .map_err(err)?;
        for (g, (label, points)) in groups.iter().enumerate() {
            let c = colour(g);
            let style = c.mix(0.6).filled();
            let series = chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, style)))
                .map_err(err)?;
            if let Some(label) = label {
                series
                    .label(names.name(*label))
                    .legend(move |(x, y)| Circle::new((x, y), 5, c.filled()));
            }
        }
        if labels.is_some() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 16))
                .draw()
                .map_err(err)?;
        }
        Ok(())
    })
}

pub fn run(args: &ScatterArgs) -> Result<()> {
    let model = SavedModel::load(&args.model)?;
    let heldout = model.heldout(args.data.as_deref(), args.holdout)?;
    let n = args.n.min(heldout.set.len());
    if n == 0 {
        return Err(Error::Config("--n must be at least 1".into()));
    }
    let labels = heldout.set.labels.as_deref().map(|l| &l[..n]);
    write_scatter(
        &args.out,
        &model.config,
        &model.params,
        heldout.set.rows(0..n),
        labels,
        heldout.label_names,
    )?;
    println!(
        "wrote the posterior means of {n} held-out examples to {}",
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn principal_axes_of_a_stretched_cloud() {
        // Points on the line t * (3, 4, 0) / 5 plus a smaller spread along (0, 0, 1): the first
        // axis is (0.6, 0.8, 0) with all but the z-variance, the second is (0, 0, 1).
        let x = Array2::from_shape_fn((40, 3), |(i, j)| {
            let t = i as f32 - 19.5;
            // +1, -1, -1, +1, ...: mean 0 and uncorrelated with t over each block of four.
            let s = if i % 4 == 0 || i % 4 == 3 { 1.0 } else { -1.0 };
            [0.6 * t, 0.8 * t, s][j]
        });
        let (axes, share) = principal_axes(x.view());
        // The inputs are f32 (0.6 and 0.8 are not exact): agreement to ~1e-7 is all there is.
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-6);
        assert!(close(&axes[0], &[0.6, 0.8, 0.0]), "{:?}", axes[0]);
        assert!(close(&axes[1], &[0.0, 0.0, 1.0]), "{:?}", axes[1]);
        // var(t) = (40^2 - 1) / 12 = 133.25, var(s) = 1.
        assert!(
            (share[0] - 100.0 * 133.25 / 134.25).abs() < 1e-5,
            "{share:?}"
        );
        assert!((share[1] - 100.0 / 134.25).abs() < 1e-5, "{share:?}");
    }

    #[test]
    fn two_dimensional_latents_are_plotted_as_they_are() {
        let mu = Array2::from_shape_vec((2, 2), vec![1.0, 2.0, -3.0, 4.0]).unwrap();
        assert_eq!(project(mu.view()).points, vec![(1.0, 2.0), (-3.0, 4.0)]);
    }
}
