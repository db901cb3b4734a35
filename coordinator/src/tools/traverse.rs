//! `coordinator traverse`: what each latent dimension does, one dimension per row.

use std::path::PathBuf;

use common::model::{ModelConfig, encode, mean_image};
use image::GrayImage;
use ndarray::{Array1, Array2, Axis};

use super::images::{GridLayout, ImageShape, save_png, tile_shape};
use super::inputs::SavedModel;
use crate::error::{Error, Result};

/// Dimensions shown when --dims is not given: the first 8 (or all, if fewer).
pub const DEFAULT_DIMS: usize = 8;

/// Write a latent traversal: one row per latent dimension, swept from -range to +range.
///
/// Row r varies latent dimension dims[r] over --steps evenly spaced values
/// from -range to +range (left to right) while every other dimension stays at the base point,
/// and shows the decoded mean images.
///
/// The base point is 0 (the prior's mean), or with --data the posterior mean of one held-out
/// example (--index).
#[derive(Debug, Clone, clap::Args)]
pub struct TraverseArgs {
    /// The trained model (a run's `model.safetensors`).
    #[arg(long)]
    pub model: PathBuf,
    /// PNG file to write.
    #[arg(long, default_value = "traverse.png")]
    pub out: PathBuf,
    /// Latent dimensions, one row each: a range `0..8` (end excluded) or a list `0,3,5`
    /// [default: the first 8].
    #[arg(long)]
    pub dims: Option<DimSpec>,
    /// Largest distance from the base point, in prior standard deviations.
    #[arg(long, default_value_t = 3.0)]
    pub range: f32,
    /// Values per dimension (columns).
    #[arg(long, default_value_t = 9)]
    pub steps: usize,
    /// Start from the posterior mean of a held-out example of this data instead of 0.
    #[arg(long)]
    pub data: Option<String>,
    /// Held-out examples at the end of --data [default: as the run].
    #[arg(long, requires = "data")]
    pub holdout: Option<usize>,
    /// Which held-out example gives the base point.
    #[arg(long, default_value_t = 0, requires = "data")]
    pub index: usize,
    /// Image shape HEIGHTxWIDTH [default: the data's, else the square root of the model's input
    /// size].
    #[arg(long)]
    pub shape: Option<ImageShape>,
}

/// Latent dimensions to traverse, as `--dims` spells them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DimSpec(pub Vec<usize>);

impl std::str::FromStr for DimSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a list of dimensions: use a range `0..8` or `0,3,5`");
        let dims: Vec<usize> = if let Some((a, b)) = s.split_once("..") {
            let a: usize = a.trim().parse().map_err(|_| bad())?;
            let b: usize = b.trim().parse().map_err(|_| bad())?;
            (a..b).collect()
        } else {
            s.split(',')
                .map(|d| d.trim().parse().map_err(|_| bad()))
                .collect::<Result<_, _>>()?
        };
        if dims.is_empty() {
            return Err(bad());
        }
        Ok(DimSpec(dims))
    }
}

/// The traversal grid: `dims.len()` rows of `steps` images around `base: [Z]`.
pub fn traverse_grid(
    config: &ModelConfig,
    params: &[f32],
    base: &Array1<f32>,
    dims: &[usize],
    range: f32,
    steps: usize,
    tile: (usize, usize),
) -> Result<GrayImage> {
    if let Some(&d) = dims.iter().find(|&&d| d >= config.latent) {
        return Err(Error::Config(format!(
            "latent dimension {d} does not exist: the model has {} (0..{})",
            config.latent, config.latent
        )));
    }
    if dims.is_empty() || steps == 0 {
        return Err(Error::Config(
            "a traversal needs at least one dimension and one step".into(),
        ));
    }
    if !(range.is_finite() && range >= 0.0) {
        return Err(Error::Config(format!(
            "--range {range}: use a non-negative number"
        )));
    }
    let value = |s: usize| {
        if steps == 1 {
            0.0
        } else {
            -range + 2.0 * range * s as f32 / (steps - 1) as f32
        }
    };
    // z: [dims * steps, Z], row r * steps + s = base with dims[r] moved by value(s).
    let mut z = Array2::<f32>::zeros((dims.len() * steps, config.latent));
    for (i, mut row) in z.axis_iter_mut(Axis(0)).enumerate() {
        row.assign(base);
        row[dims[i / steps]] += value(i % steps);
    }
    let images = mean_image(config, params, z.view())?; // [dims * steps, D]
    GridLayout::new(dims.len(), steps, tile).render(
        images
            .rows()
            .into_iter()
            .map(|r| r.to_slice().expect("owned rows are contiguous")),
    )
}

/// The default dimensions of a model with `latent` dimensions.
pub fn default_dims(latent: usize) -> Vec<usize> {
    (0..latent.min(DEFAULT_DIMS)).collect()
}

pub fn run(args: &TraverseArgs) -> Result<()> {
    let model = SavedModel::load(&args.model)?;
    let (base, data_shape) = match &args.data {
        None => (Array1::zeros(model.config.latent), None),
        Some(data) => {
            let heldout = model.heldout(Some(data), args.holdout)?;
            if args.index >= heldout.set.len() {
                return Err(Error::Config(format!(
                    "--index {} is past the {} held-out examples",
                    args.index,
                    heldout.set.len()
                )));
            }
            let x = heldout.set.rows(args.index..args.index + 1);
            let mu = encode(&model.config, &model.params, x)?.mu;
            (mu.row(0).to_owned(), Some(heldout.set.image_shape()))
        }
    };
    let tile = match (args.shape, data_shape) {
        (None, Some(shape)) => shape,
        (shape, _) => tile_shape(model.config.input_dim, shape)?,
    };
    let dims = args
        .dims
        .clone()
        .map_or_else(|| default_dims(model.config.latent), |d| d.0);
    let img = traverse_grid(
        &model.config,
        &model.params,
        &base,
        &dims,
        args.range,
        args.steps,
        tile,
    )?;
    let (width, height) = img.dimensions();
    save_png(&args.out, img)?;
    println!(
        "wrote a traversal of latent dimensions {dims:?} over [-{r}, {r}] to {} ({width} x \
         {height} pixels)",
        args.out.display(),
        r = args.range
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_parse_as_ranges_and_lists() {
        assert_eq!("0..3".parse(), Ok(DimSpec(vec![0, 1, 2])));
        assert_eq!("4, 1".parse(), Ok(DimSpec(vec![4, 1])));
        assert_eq!("2".parse(), Ok(DimSpec(vec![2])));
        assert!("3..3".parse::<DimSpec>().is_err());
        assert!("a".parse::<DimSpec>().is_err());
    }
}
