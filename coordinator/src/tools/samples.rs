//! `coordinator sample`: images the model generates from the prior.

use std::path::PathBuf;

use common::model::{ModelConfig, mean_image, prior_latents};
use image::GrayImage;

use super::images::{GridLayout, ImageShape, save_png, tile_shape};
use super::inputs::SavedModel;
use crate::error::Result;

/// Write a grid of images sampled from a trained model's prior.
///
/// Draws latents z ~ N(0, I) from the prior, decodes them and writes the mean images as a grid:
/// sigmoid of the logits for a bernoulli model, the mean clamped to [0, 1] for a gaussian one.
///
/// The grid has ceil(sqrt(n)) columns; each tile is upscaled 2x (more for images under 14 pixels
/// a side, to at least 28) with 2 pixels of grey padding.
/// Sample i depends only on (seed, i), so a smaller --n shows a prefix of a larger one.
#[derive(Debug, Clone, clap::Args)]
pub struct SampleArgs {
    /// The trained model (a run's `model.safetensors`).
    #[arg(long)]
    pub model: PathBuf,
    /// PNG file to write.
    #[arg(long, default_value = "samples.png")]
    pub out: PathBuf,
    /// Number of samples.
    #[arg(long, default_value_t = 64)]
    pub n: usize,
    /// Seed of the prior draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image shape HEIGHTxWIDTH [default: the square root of the model's input size].
    #[arg(long)]
    pub shape: Option<ImageShape>,
}

/// A grid of `n` samples from the prior of the model `(config, params)`, tiles of `tile =
/// (height, width)`.
pub fn sample_grid(
    config: &ModelConfig,
    params: &[f32],
    n: usize,
    seed: u64,
    tile: (usize, usize),
) -> Result<GrayImage> {
    let z = prior_latents(seed, n, config.latent); // [n, Z]
    let images = mean_image(config, params, z.view())?; // [n, D]
    let layout = GridLayout::square(n, tile);
    layout.render(images.rows().into_iter().map(|row| {
        row.to_slice()
            .expect("an owned standard-layout array has contiguous rows")
    }))
}

pub fn run(args: &SampleArgs) -> Result<()> {
    if args.n == 0 {
        return Err(crate::Error::Config("--n must be at least 1".into()));
    }
    let model = SavedModel::load(&args.model)?;
    let tile = tile_shape(model.config.input_dim, args.shape)?;
    let img = sample_grid(&model.config, &model.params, args.n, args.seed, tile)?;
    let (width, height) = img.dimensions();
    save_png(&args.out, img)?;
    println!(
        "wrote {} samples to {} ({width} x {height} pixels)",
        args.n,
        args.out.display()
    );
    Ok(())
}
