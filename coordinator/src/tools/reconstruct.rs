//! `coordinator reconstruct`: held-out images beside the model's reconstructions of them.

use std::path::PathBuf;

use common::model::{ModelConfig, encode, mean_image};
use image::GrayImage;
use ndarray::{ArrayView2, Axis};

use super::images::{GridLayout, save_png};
use super::inputs::SavedModel;
use crate::error::{Error, Result};

/// Pairs per grid row: 8 pairs make 16 columns, about 900 pixels wide for 28 x 28 images.
pub const PAIRS_PER_ROW: usize = 8;

/// Write held-out images beside the model's reconstructions of them.
///
/// Encodes held-out images, decodes their posterior means mu and writes a grid of pairs: each
/// original (even columns) with its reconstruction to its right (odd columns), 8 pairs per row.
///
/// The held-out split is the run's: the last --holdout examples of --data (defaults: the data
/// and held-out size recorded with the model, else the source's default split).
#[derive(Debug, Clone, clap::Args)]
pub struct ReconstructArgs {
    /// The trained model (a run's `model.safetensors`).
    #[arg(long)]
    pub model: PathBuf,
    /// Data: `synthetic`, `idx:IMAGES[,LABELS]`, `npy:PATH[,LABELS]`, `mnist[:DIR]` [default:
    /// the data the model was trained on].
    #[arg(long)]
    pub data: Option<String>,
    /// PNG file to write.
    #[arg(long, default_value = "recon.png")]
    pub out: PathBuf,
    /// Number of held-out images to reconstruct (the first n of the held-out split).
    #[arg(long, default_value_t = 32)]
    pub n: usize,
    /// Held-out examples at the end of the data [default: the run's, else 10000 for synthetic
    /// and mnist, a tenth otherwise].
    #[arg(long)]
    pub holdout: Option<usize>,
}

/// The grid of `x`'s rows (`[n, D]`, images of `tile = (height, width)`) beside their
/// reconstructions by the model `(config, params)`.
pub fn reconstruction_grid(
    config: &ModelConfig,
    params: &[f32],
    x: ArrayView2<f32>,
    tile: (usize, usize),
) -> Result<GrayImage> {
    let n = x.nrows();
    if n == 0 {
        return Err(Error::Config("no images to reconstruct".into()));
    }
    let posterior = encode(config, params, x)?; // mu: [n, Z]
    let recon = mean_image(config, params, posterior.mu.view())?; // [n, D]
    let x = x.as_standard_layout();
    let pairs = n.min(PAIRS_PER_ROW);
    let layout = GridLayout::new(n.div_ceil(pairs), 2 * pairs, tile);
    let tiles = x
        .axis_iter(Axis(0))
        .zip(recon.axis_iter(Axis(0)))
        .flat_map(|(a, b)| {
            [a, b].map(|row| row.to_slice().expect("standard layout rows are contiguous"))
        });
    layout.render(tiles)
}

pub fn run(args: &ReconstructArgs) -> Result<()> {
    let model = SavedModel::load(&args.model)?;
    let heldout = model.heldout(args.data.as_deref(), args.holdout)?;
    let n = args.n.min(heldout.set.len());
    if n == 0 {
        return Err(Error::Config("--n must be at least 1".into()));
    }
    let img = reconstruction_grid(
        &model.config,
        &model.params,
        heldout.set.rows(0..n),
        heldout.set.image_shape(),
    )?;
    let (width, height) = img.dimensions();
    save_png(&args.out, img)?;
    println!(
        "wrote {n} held-out images and their reconstructions to {} ({width} x {height} pixels)",
        args.out.display()
    );
    Ok(())
}
