//! Gradient clipping by global L2 norm, as PyTorch's `torch.nn.utils.clip_grad_norm_`.

use rayon::prelude::*;

use super::{CHUNK, PARALLEL_MIN};

/// PyTorch's guard against dividing by a zero norm.
const NORM_EPS: f64 = 1e-6;

/// Scales `grad` so its L2 norm is at most `max_norm`, and returns the norm before clipping.
///
/// As PyTorch: `coef = max_norm / (norm + 1e-6)`; if `coef < 1` every entry is multiplied by
/// `coef` (cast to f32). The squares are summed in f64 over fixed chunks, the chunk sums added in
/// chunk order, so the norm is the same for any thread count. A non-finite gradient gives a
/// non-finite norm (`coef` is then NaN or 0): check the returned norm if that matters.
pub fn clip_grad_norm(grad: &mut [f32], max_norm: f64) -> f64 {
    let norm = l2_norm(grad);
    let coef = max_norm / (norm + NORM_EPS);
    if coef < 1.0 {
        let coef = coef as f32;
        let scale = |chunk: &mut [f32]| chunk.iter_mut().for_each(|g| *g *= coef);
        if grad.len() < PARALLEL_MIN {
            scale(grad);
        } else {
            grad.par_chunks_mut(CHUNK).for_each(scale);
        }
    }
    norm
}

/// sqrt(sum g^2), accumulated in f64 in a fixed order.
fn l2_norm(grad: &[f32]) -> f64 {
    let sum_sq = |chunk: &[f32]| {
        chunk
            .iter()
            .map(|&g| f64::from(g) * f64::from(g))
            .sum::<f64>()
    };
    let total: f64 = if grad.len() < PARALLEL_MIN {
        grad.chunks(CHUNK).map(sum_sq).sum()
    } else {
        let partial: Vec<f64> = grad.par_chunks(CHUNK).map(sum_sq).collect();
        partial.iter().sum()
    };
    total.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_is_the_same_on_the_serial_and_parallel_paths() {
        let n = PARALLEL_MIN + CHUNK / 3;
        let grad: Vec<f32> = (0..n)
            .map(|i| ((i * 31) % 101) as f32 * 1e-3 - 0.05)
            .collect();
        let serial: f64 = grad
            .chunks(CHUNK)
            .map(|c| c.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>())
            .sum::<f64>()
            .sqrt();
        assert_eq!(l2_norm(&grad).to_bits(), serial.to_bits());
    }
}
