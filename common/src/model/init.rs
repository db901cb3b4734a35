//! PyTorch's default initialisation of `nn.Linear`, reproducible from a seed.
//!
//! `nn.Linear.reset_parameters` draws the weight from `kaiming_uniform_(a = sqrt(5))`, whose bound
//! is `gain * sqrt(3 / fan_in)` with `gain = sqrt(2 / (1 + 5))`, i.e. `1 / sqrt(fan_in)`, and the
//! bias from `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`. So both are `U(-b, b)`, `b = 1/sqrt(in_dim)`.
//! (Same distribution as PyTorch, not the same numbers: our generator is keyed, see
//! [`KeyedRng`](crate::model::KeyedRng).) Each tensor has its own stream
//! `(INIT, seed, layer, 0 = weight | 1 = bias)`, so the values do not depend on the order tensors
//! are filled in.

use crate::kernels::Float;
use crate::model::ParamLayout;
use crate::model::{KeyedRng, domain};

/// A freshly initialised parameter vector, laid out as `layout`.
pub fn init_params<T: Float>(layout: &ParamLayout, seed: u64) -> Vec<T> {
    let mut params = vec![T::zero(); layout.len()];
    for (index, layer) in layout.layers().iter().enumerate() {
        let bound = 1.0 / (layer.in_dim as f64).sqrt();
        for (part, range) in [(0u64, layer.weight.clone()), (1, layer.bias.clone())] {
            let mut rng = KeyedRng::new(&[domain::INIT, seed, index as u64, part]);
            for p in &mut params[range] {
                *p = T::from_f64(bound * (2.0 * rng.next_open01() - 1.0));
            }
        }
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    #[test]
    fn bounds_and_moments_follow_fan_in() {
        let layout = ParamLayout::new(&ModelConfig::default());
        let params: Vec<f32> = init_params(&layout, 7);
        for layer in layout.layers() {
            let bound = 1.0 / (layer.in_dim as f32).sqrt();
            let w = &params[layer.weight.clone()];
            assert!(w.iter().all(|v| v.abs() <= bound), "{}", layer.name);
            // U(-b, b) has variance b^2 / 3; the weights are many, so the sample variance is tight.
            let var = w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64;
            let want = (bound as f64).powi(2) / 3.0;
            assert!(
                (var / want - 1.0).abs() < 0.05,
                "{}: var {var}, want {want}",
                layer.name
            );
            let b = &params[layer.bias.clone()];
            assert!(b.iter().all(|v| v.abs() <= bound));
            assert!(b.iter().any(|v| *v != 0.0));
        }
    }

    #[test]
    fn seeded_and_precision_consistent() {
        let layout = ParamLayout::new(&ModelConfig {
            input_dim: 10,
            hidden: vec![6],
            latent: 2,
            ..ModelConfig::default()
        });
        let a: Vec<f32> = init_params(&layout, 1);
        assert_eq!(a, init_params::<f32>(&layout, 1));
        assert_ne!(a, init_params::<f32>(&layout, 2));
        let wide: Vec<f64> = init_params(&layout, 1);
        assert!(a.iter().zip(&wide).all(|(x, y)| *x == *y as f32));
    }
}
