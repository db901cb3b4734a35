//! Using a trained model: encode images to their posterior, decode latents to images, draw
//! latents from the prior. Forward passes only, for pictures and reports (training and the
//! held-out figures use [`Vae`](crate::model::Vae) and [`evaluate`](crate::model::evaluate)).
//!
//! ```text
//! encode       x: [n, D]  ->  mu, logvar: [n, Z]       (encoder MLP and both heads)
//! decode       z: [n, Z]  ->  f(z): [n, D]             (logits for bernoulli, means for gaussian)
//! mean_image   z: [n, Z]  ->  E[x | z]: [n, D]         (sigmoid(f) for bernoulli, f for gaussian)
//! ```
//!
//! ```
//! use common::model::{ModelConfig, ParamLayout, encode, init_params, mean_image, prior_latents};
//!
//! let config = ModelConfig { input_dim: 6, hidden: vec![4], latent: 2, ..ModelConfig::default() };
//! let params = init_params(&ParamLayout::new(&config), 0);
//! let z = prior_latents(0, 3, config.latent);
//! let images = mean_image(&config, &params, z.view())?;
//! assert_eq!(images.dim(), (3, 6));
//! assert!(images.iter().all(|p| (0.0..=1.0).contains(p)));
//! let posterior = encode(&config, &params, images.view())?;
//! assert_eq!(posterior.mu.dim(), (3, 2));
//! # Ok::<(), common::Error>(())
//! ```

use ndarray::{Array2, ArrayView2, Axis};

use crate::model::KeyedRng;
use crate::model::{LayerRole, LinearLayout, ParamLayout};
use crate::model::{Likelihood, ModelConfig};
use crate::{Error, Result};

/// Key domain of [`prior_latents`], distinct from the tags in [`crate::model::domain`] (1..=5)
/// so pictures never reuse training noise.
pub const PRIOR_DOMAIN: u64 = 0x0050_5249_4f52; // "PRIOR" in ASCII

/// The encoder's output for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Posterior {
    /// Posterior means, `[n, Z]`.
    pub mu: Array2<f32>,
    /// Posterior log-variances, `[n, Z]`.
    pub logvar: Array2<f32>,
}

/// Checks that `params` fit `config` and returns the layout.
fn checked_layout(config: &ModelConfig, params: &[f32]) -> Result<ParamLayout> {
    config.validate()?;
    let layout = ParamLayout::new(config);
    if params.len() != layout.len() {
        return Err(Error::Tensor(format!(
            "parameter vector has {} values, the model ({} inputs, hidden {:?}, latent {}) has {}",
            params.len(),
            config.input_dim,
            config.hidden,
            config.latent,
            layout.len()
        )));
    }
    Ok(layout)
}

/// `input W^T + b`, then ReLU if asked: `[n, in] -> [n, out]`.
fn linear(params: &[f32], layer: &LinearLayout, input: ArrayView2<f32>, relu: bool) -> Array2<f32> {
    let w = ArrayView2::from_shape((layer.out_dim, layer.in_dim), &params[layer.weight.clone()])
        .expect("layout ranges hold [out, in] weights");
    let bias = &params[layer.bias.clone()];
    let mut out = input.dot(&w.t()); // [n, out]
    if !out.is_standard_layout() {
        // `dot` returns column-major when both operands' row strides are 1, as they are when
        // the input or the weight has one column (a model with a hidden layer or latent of 1);
        // callers read rows as slices.
        out = out.as_standard_layout().into_owned();
    }
    for mut row in out.axis_iter_mut(Axis(0)) {
        for (o, &b) in row.iter_mut().zip(bias) {
            let v = *o + b;
            *o = if relu { v.max(0.0) } else { v };
        }
    }
    out
}

/// Posterior means and log-variances of `x: [n, D]`.
pub fn encode(config: &ModelConfig, params: &[f32], x: ArrayView2<f32>) -> Result<Posterior> {
    let layout = checked_layout(config, params)?;
    if x.ncols() != config.input_dim {
        return Err(Error::DataMismatch(format!(
            "images have {} values each, the model's input dimension is {}",
            x.ncols(),
            config.input_dim
        )));
    }
    let mut h = x.to_owned(); // [n, D]
    for layer in layout.encoder_hidden() {
        h = linear(params, layer, h.view(), true); // [n, H_l]
    }
    Ok(Posterior {
        mu: linear(params, layout.layer(LayerRole::Mu), h.view(), false),
        logvar: linear(params, layout.layer(LayerRole::LogVar), h.view(), false),
    })
}

/// The decoder's raw output `f(z)` for `z: [n, Z]`: `[n, D]` logits (bernoulli) or means
/// (gaussian).
pub fn decode(config: &ModelConfig, params: &[f32], z: ArrayView2<f32>) -> Result<Array2<f32>> {
    let layout = checked_layout(config, params)?;
    if z.ncols() != config.latent {
        return Err(Error::DataMismatch(format!(
            "latents have {} values each, the model's latent dimension is {}",
            z.ncols(),
            config.latent
        )));
    }
    let mut g = z.to_owned(); // [n, Z]
    for layer in layout.decoder_hidden() {
        g = linear(params, layer, g.view(), true); // [n, H_l]
    }
    Ok(linear(
        params,
        layout.layer(LayerRole::DecoderOut),
        g.view(),
        false,
    )) // [n, D]
}

/// The mean image `E[x | z]` for `z: [n, Z]`, `[n, D]`: `sigmoid(f(z))` for bernoulli (in
/// [0, 1]), `f(z)` for gaussian (unbounded; clamp it to show it).
pub fn mean_image(config: &ModelConfig, params: &[f32], z: ArrayView2<f32>) -> Result<Array2<f32>> {
    let mut f = decode(config, params, z)?;
    if config.likelihood == Likelihood::Bernoulli {
        f.mapv_inplace(|v| 1.0 / (1.0 + (-v).exp()));
    }
    Ok(f)
}

/// `n` latents from the prior N(0, I), `[n, Z]`. Row `i` depends only on `(seed, i)`, so a
/// smaller `n` gives a prefix of a larger one.
pub fn prior_latents(seed: u64, n: usize, latent: usize) -> Array2<f32> {
    let mut z = Array2::zeros((n, latent));
    for (i, mut row) in z.axis_iter_mut(Axis(0)).enumerate() {
        let mut rng = KeyedRng::new(&[PRIOR_DOMAIN, seed, i as u64]);
        let mut pair = None;
        for v in row.iter_mut() {
            *v = match pair.take() {
                Some(second) => second,
                None => {
                    let (a, b) = rng.next_normal_pair();
                    pair = Some(b as f32);
                    a as f32
                }
            };
        }
    }
    z
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> (ModelConfig, Vec<f32>) {
        let config = ModelConfig {
            input_dim: 5,
            hidden: vec![4, 3],
            latent: 2,
            ..ModelConfig::default()
        };
        let params = crate::model::init_params(&ParamLayout::new(&config), 3);
        (config, params)
    }

    #[test]
    fn encoder_means_match_the_training_forward_pass() {
        // The training ELBO's encoder leaves mu and logvar in its workspace: both paths compute
        // the same maths, so they agree to rounding.
        let (config, params) = small();
        let x = Array2::from_shape_fn((3, 5), |(i, j)| ((i * 5 + j) % 7) as f32 / 7.0);
        let ours = encode(&config, &params, x.view()).unwrap();
        let vae = crate::model::Vae::new(config.clone()).unwrap();
        let mut ws = crate::model::Workspace::new();
        let eps = Array2::<f32>::zeros((3, 2));
        vae.elbo(&params, x.view(), eps.view(), &mut ws).unwrap();
        let (mu, logvar) = ws.posterior();
        for (a, b) in ours.mu.iter().zip(mu).chain(ours.logvar.iter().zip(logvar)) {
            assert!((a - b).abs() <= 1e-5 + 1e-5 * b.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn outputs_are_row_major_for_layers_of_one_unit() {
        // One hidden unit and one latent (as in 784-1-1): every layer's input or weight has one
        // column.
        let config = ModelConfig {
            input_dim: 6,
            hidden: vec![1],
            latent: 1,
            ..ModelConfig::default()
        };
        let params = crate::model::init_params(&ParamLayout::new(&config), 5);
        let z = prior_latents(2, 4, 1);
        let images = mean_image(&config, &params, z.view()).unwrap();
        assert!(images.is_standard_layout());
        assert!(
            images
                .rows()
                .into_iter()
                .all(|row| row.to_slice().is_some())
        );
        let x = Array2::from_elem((3, 6), 0.5f32);
        let posterior = encode(&config, &params, x.view()).unwrap();
        assert!(posterior.mu.is_standard_layout() && posterior.logvar.is_standard_layout());
    }

    #[test]
    fn decoder_mean_is_the_sigmoid_of_the_logits() {
        let (config, params) = small();
        let z = prior_latents(1, 4, 2);
        let logits = decode(&config, &params, z.view()).unwrap();
        let mean = mean_image(&config, &params, z.view()).unwrap();
        for (f, m) in logits.iter().zip(&mean) {
            assert!((1.0 / (1.0 + (-f).exp()) - m).abs() < 1e-7);
        }
        let gaussian = ModelConfig {
            likelihood: Likelihood::Gaussian { variance: 1.0 },
            ..config
        };
        assert_eq!(mean_image(&gaussian, &params, z.view()).unwrap(), logits);
    }

    #[test]
    fn prior_latents_are_keyed_by_row_and_roughly_standard() {
        let a = prior_latents(7, 3, 5);
        let b = prior_latents(7, 2000, 5);
        assert_eq!(a.view(), b.slice(ndarray::s![..3, ..]));
        assert_ne!(prior_latents(8, 3, 5), a);
        let n = b.len() as f64;
        let mean = b.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = b.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        // 10,000 draws: the mean's standard error is 0.01, the variance's about 0.014.
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.07,
            "{mean} {var}"
        );
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let (config, params) = small();
        assert!(encode(&config, &params, Array2::zeros((1, 4)).view()).is_err());
        assert!(decode(&config, &params, Array2::zeros((1, 3)).view()).is_err());
        assert!(decode(&config, &params[1..], Array2::zeros((1, 2)).view()).is_err());
    }
}
