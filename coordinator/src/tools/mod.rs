//! What users look at: pictures and figures from a trained model, as `coordinator` subcommands
//! and as library functions.
//!
//! | subcommand    | writes                                                             |
//! |---------------|--------------------------------------------------------------------|
//! | `sample`      | a grid of images decoded from prior samples ([`samples`])          |
//! | `reconstruct` | held-out images beside their reconstructions ([`reconstruct`])    |
//! | `traverse`    | one row per latent dimension swept from -range to range ([`traverse`]) |
//! | `scatter`     | the posterior means of held-out examples, by class ([`scatter`])  |
//! | `evaluate`    | the held-out ELBO and IW bound, as a line or JSON ([`evaluate`])  |
//! | `plot`        | training curves from `metrics.jsonl` ([`plot`])                    |
//!
//! [`write_run_images`] writes the pictures of a finished run into its output directory.
//!
//! ```no_run
//! # fn main() -> coordinator::Result<()> {
//! use coordinator::tools::{evaluate, samples};
//! samples::run(&samples::SampleArgs {
//!     model: "out/model.safetensors".into(),
//!     out: "samples.png".into(),
//!     n: 64,
//!     seed: 0,
//!     shape: None,
//! })?;
//! # Ok(())
//! # }
//! ```

pub mod chart;
pub mod evaluate;
pub mod images;
pub mod inputs;
pub mod plot;
pub mod reconstruct;
pub mod samples;
pub mod scatter;
pub mod traverse;

use std::path::{Path, PathBuf};

use common::data::Dataset;
use common::train::Engine;
use ndarray::Array1;

use crate::error::{Error, Result};
use crate::outputs::METRICS_FILE;

pub const SAMPLES_FILE: &str = "samples.png";
pub const RECONSTRUCTIONS_FILE: &str = "reconstructions.png";
pub const TRAVERSE_FILE: &str = "traverse.png";
pub const SCATTER_FILE: &str = "scatter.png";
pub const CURVES_FILE: &str = "curves.png";

/// Prior samples in `samples.png`.
pub const RUN_SAMPLES: usize = 64;
/// Held-out examples in `reconstructions.png`.
pub const RUN_RECONSTRUCTIONS: usize = 32;
/// Held-out examples in `scatter.png`.
pub const RUN_SCATTER: usize = 2000;
/// Traversal of `traverse.png`: values from -3 to 3 prior standard deviations in 9 steps.
pub const RUN_TRAVERSE_RANGE: f32 = 3.0;
pub const RUN_TRAVERSE_STEPS: usize = 9;

/// Writes the pictures of a finished run into `out_dir` and returns their paths:
/// `samples.png` (64 prior samples drawn with `seed`), `reconstructions.png` (the first 32
/// held-out examples beside their reconstructions), `traverse.png` (the first 8 latent
/// dimensions around 0), `scatter.png` (posterior means of up to 2000 held-out examples, by
/// label) and, when `out_dir` has a `metrics.jsonl` with at least one line, `curves.png`.
/// Tiles take the held-out images' shape.
pub fn write_run_images(
    out_dir: &Path,
    engine: &Engine,
    params: &[f32],
    heldout: &Dataset,
    seed: u64,
) -> Result<Vec<PathBuf>> {
    let config = engine.config();
    if params.len() != engine.layout().len() {
        return Err(Error::Config(format!(
            "{} parameters given for a model of {}",
            params.len(),
            engine.layout().len()
        )));
    }
    let tile = heldout.image_shape();
    let mut written = Vec::new();

    let path = out_dir.join(SAMPLES_FILE);
    images::save_png(
        &path,
        samples::sample_grid(config, params, RUN_SAMPLES, seed, tile)?,
    )?;
    written.push(path);

    let n = heldout.len().min(RUN_RECONSTRUCTIONS);
    let path = out_dir.join(RECONSTRUCTIONS_FILE);
    images::save_png(
        &path,
        reconstruct::reconstruction_grid(config, params, heldout.rows(0..n), tile)?,
    )?;
    written.push(path);

    let path = out_dir.join(TRAVERSE_FILE);
    let dims = traverse::default_dims(config.latent);
    images::save_png(
        &path,
        traverse::traverse_grid(
            config,
            params,
            &Array1::zeros(config.latent),
            &dims,
            RUN_TRAVERSE_RANGE,
            RUN_TRAVERSE_STEPS,
            tile,
        )?,
    )?;
    written.push(path);

    let n = heldout.len().min(RUN_SCATTER);
    let path = out_dir.join(SCATTER_FILE);
    scatter::write_scatter(
        &path,
        config,
        params,
        heldout.rows(0..n),
        heldout.labels.as_deref().map(|l| &l[..n]),
        inputs::LabelNames::Numbers,
    )?;
    written.push(path);

    let metrics = out_dir.join(METRICS_FILE);
    if metrics.is_file() {
        match plot::read_metrics(&metrics) {
            Ok(lines) => {
                let path = out_dir.join(CURVES_FILE);
                plot::write_curves(&path, &lines)?;
                written.push(path);
            }
            Err(e) => tracing::warn!("no {CURVES_FILE}: {e}"),
        }
    }
    Ok(written)
}
