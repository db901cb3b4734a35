//! Gradient clipping by global L2 norm, as PyTorch's `torch.nn.utils.clip_grad_norm_`.

use std::ops::Range;

use rayon::prelude::*;

use super::{CHUNK, GradientBlocks, PARALLEL_MIN};

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
    if let Some(coef) = clip_coefficient(norm, max_norm) {
        let scale = |chunk: &mut [f32]| chunk.iter_mut().for_each(|g| *g *= coef);
        if grad.len() < PARALLEL_MIN {
            scale(grad);
        } else {
            grad.par_chunks_mut(CHUNK).for_each(scale);
        }
    }
    norm
}

/// What [`clip_grad_norm`] multiplies a gradient of L2 norm `norm` by: `None` when it leaves the
/// gradient as it is (`coef` not below 1, NaN included).
fn clip_coefficient(norm: f64, max_norm: f64) -> Option<f32> {
    let coef = max_norm / (norm + NORM_EPS);
    (coef < 1.0).then_some(coef as f32)
}

/// Fills `grad` chunk by chunk (`make(range, chunk)` writes its values `range`) and returns its
/// L2 norm, each chunk measured while it is in cache: the same bits as [`clip_grad_norm`]'s norm
/// of the filled gradient, in one pass over memory instead of two.
pub fn fill_measuring_norm(
    grad: &mut [f32],
    make: impl Fn(Range<usize>, &mut [f32]) + Sync,
) -> f64 {
    let fill = |(c, chunk): (usize, &mut [f32])| {
        make(c * CHUNK..c * CHUNK + chunk.len(), chunk);
        sum_sq(chunk)
    };
    let total: f64 = if grad.len() < PARALLEL_MIN {
        grad.chunks_mut(CHUNK).enumerate().map(fill).sum()
    } else {
        let partial: Vec<f64> = grad.par_chunks_mut(CHUNK).enumerate().map(fill).collect();
        partial.iter().sum()
    };
    total.sqrt()
}

/// A gradient as [`clip_grad_norm`] would leave it, read block by block by the optimizer
/// ([`GradientBlocks`]) instead of scaled in place first: each block is multiplied by the clip
/// coefficient into the scratch, or lent as it is when no clipping is needed. The same bits, one
/// pass over memory less.
#[derive(Debug, Clone, Copy)]
pub struct Clipped<'a> {
    grad: &'a [f32],
    coef: Option<f32>,
}

impl<'a> Clipped<'a> {
    /// `grad`, whose L2 norm is `norm`, clipped to `max_norm`.
    pub fn new(grad: &'a [f32], norm: f64, max_norm: f64) -> Self {
        Clipped {
            grad,
            coef: clip_coefficient(norm, max_norm),
        }
    }
}

impl GradientBlocks for Clipped<'_> {
    fn block<'a>(&'a self, range: Range<usize>, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let values = &self.grad[range];
        let Some(coef) = self.coef else {
            return values;
        };
        scratch.clear();
        scratch.extend(values.iter().map(|&g| g * coef));
        scratch
    }
}

/// The sum of one chunk's squares, accumulated in f64 in order.
fn sum_sq(chunk: &[f32]) -> f64 {
    chunk
        .iter()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum::<f64>()
}

/// sqrt(sum g^2), accumulated in f64 in a fixed order.
fn l2_norm(grad: &[f32]) -> f64 {
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

    /// Filling and measuring in one pass, then reading the blocks clipped, gives
    /// `clip_grad_norm`'s norm and clipped values bit for bit: serial and parallel lengths, with
    /// a partial last chunk, clipped and not.
    #[test]
    fn a_gradient_filled_and_read_clipped_matches_clipping_in_place() {
        for n in [1000, PARALLEL_MIN + CHUNK / 3] {
            let source: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1013) as f32 * 1e-2 - 5.0)
                .collect();
            for max_norm in [1.0, 1e9] {
                let mut want = source.clone();
                let want_norm = clip_grad_norm(&mut want, max_norm);
                let mut filled = vec![f32::NAN; n];
                let norm = fill_measuring_norm(&mut filled, |range, out| {
                    out.copy_from_slice(&source[range])
                });
                assert_eq!(norm.to_bits(), want_norm.to_bits(), "{n} values: the norm");
                assert_eq!(filled, source, "{n} values: filled");
                let clipped = Clipped::new(&filled, norm, max_norm);
                assert_eq!(clipped.coef.is_some(), max_norm == 1.0);
                let mut scratch = vec![f32::NAN; 5];
                let read: Vec<f32> = (0..n)
                    .step_by(CHUNK)
                    .flat_map(|start| {
                        let range = start..(start + CHUNK).min(n);
                        clipped.block(range, &mut scratch).to_vec()
                    })
                    .collect();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&read), bits(&want), "{n} values, max norm {max_norm}");
            }
        }
    }
}
