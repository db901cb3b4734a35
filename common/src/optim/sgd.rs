//! SGD with optional momentum, dampening, Nesterov and coupled weight decay, as PyTorch's
//! `_single_tensor_sgd`. For every element:
//!
//! ```text
//! d <- g + wd * p                                      (if wd != 0)
//! b <- d                                               (first step with momentum)
//! b <- b * momentum + (1 - dampening) * d              (later steps)
//! d <- d + momentum * b   (Nesterov)   or   d <- b     (if momentum != 0)
//! p <- p + (-lr) * d
//! ```
//!
//! As in `adam`, a buffer value below [`super::MOMENT_FLOOR`] is stored as zero.

use rayon::prelude::*;

use super::{CHUNK, PARALLEL_MIN, flush_tiny};

/// One step's scalars, cast from f64 to f32 once as PyTorch does.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scalars {
    weight_decay: Option<f32>,
    momentum: Option<Momentum>,
    neg_lr: f32,
    /// Every gradient value is divided by this first (1 leaves it unchanged).
    divisor: f32,
}

#[derive(Debug, Clone, Copy)]
struct Momentum {
    momentum: f32,
    one_minus_dampening: f32,
    nesterov: bool,
}

impl Scalars {
    pub(super) fn new(lr: f64, momentum: f64, dampening: f64, nesterov: bool, wd: f64) -> Self {
        Scalars {
            weight_decay: (wd != 0.0).then_some(wd as f32),
            momentum: (momentum != 0.0).then_some(Momentum {
                momentum: momentum as f32,
                one_minus_dampening: (1.0 - dampening) as f32,
                nesterov,
            }),
            neg_lr: (-lr) as f32,
            divisor: 1.0,
        }
    }

    /// The step for `grad / divisor`, divided value by value inside the step's one pass.
    pub(super) fn with_divisor(self, divisor: f32) -> Self {
        Scalars { divisor, ..self }
    }
}

/// Applies one SGD step (the caller checks lengths). Creates the momentum buffer at the first
/// step with momentum, as PyTorch does.
pub(super) fn step(
    s: &Scalars,
    params: &mut [f32],
    grad: &[f32],
    momentum_buffer: &mut Option<Vec<f32>>,
) {
    let Some(momentum) = s.momentum else {
        for_chunks(params, grad, &mut [], |p, g, _| plain(s, p, g));
        return;
    };
    let first = momentum_buffer.is_none();
    let buffer = momentum_buffer.get_or_insert_with(|| vec![0.0; params.len()]);
    for_chunks(params, grad, buffer, |p, g, b| {
        with_momentum(s, &momentum, first, p, g, b)
    });
}

/// Calls `f` on matching fixed chunks (in parallel for long vectors). `buffer` is either as long
/// as `params` or empty.
fn for_chunks(
    params: &mut [f32],
    grad: &[f32],
    buffer: &mut [f32],
    f: impl Fn(&mut [f32], &[f32], &mut [f32]) + Sync,
) {
    if params.len() < PARALLEL_MIN {
        f(params, grad, buffer);
    } else if buffer.is_empty() {
        params
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(p, g)| f(p, g, &mut []));
    } else {
        params
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(buffer.par_chunks_mut(CHUNK))
            .for_each(|((p, g), b)| f(p, g, b));
    }
}

fn plain(s: &Scalars, params: &mut [f32], grad: &[f32]) {
    for (p, &g) in params.iter_mut().zip(grad) {
        // Loop-invariant: unswitched, so a plain step pays no division.
        let g = if s.divisor == 1.0 { g } else { g / s.divisor };
        let d = match s.weight_decay {
            Some(wd) => g + wd * *p,
            None => g,
        };
        *p += s.neg_lr * d;
    }
}

fn with_momentum(
    s: &Scalars,
    m: &Momentum,
    first: bool,
    params: &mut [f32],
    grad: &[f32],
    buffer: &mut [f32],
) {
    for ((p, &g), b) in params.iter_mut().zip(grad).zip(buffer) {
        // Loop-invariant: unswitched, so a plain step pays no division.
        let g = if s.divisor == 1.0 { g } else { g / s.divisor };
        let d = match s.weight_decay {
            Some(wd) => g + wd * *p,
            None => g,
        };
        *b = flush_tiny(if first {
            d
        } else {
            *b * m.momentum + m.one_minus_dampening * d
        });
        let d = if m.nesterov { d + m.momentum * *b } else { *b };
        *p += s.neg_lr * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::MOMENT_FLOOR;

    #[test]
    fn a_momentum_buffer_that_decays_below_the_floor_becomes_zero() {
        let s = Scalars::new(1e-2, 0.9, 0.0, false, 0.0);
        let (mut p, mut buffer) = ([0.5f32], None);
        step(&s, &mut p, &[1e-3], &mut buffer);
        let mut steps_to_zero = None;
        for step_no in 2..=2_000 {
            step(&s, &mut p, &[0.0], &mut buffer);
            let b = buffer.as_ref().expect("made at the first step")[0];
            assert!(b == 0.0 || b.abs() >= MOMENT_FLOOR, "step {step_no}: {b:e}");
            if b == 0.0 && steps_to_zero.is_none() {
                steps_to_zero = Some(step_no);
            }
        }
        // 1e-3 * 0.9^t < 2^-96 from t = 565 on.
        let steps = steps_to_zero.expect("the buffer reaches zero");
        assert!((560..=570).contains(&steps), "zero after {steps} steps");
        // Unflushed, the same recurrence sticks at a subnormal.
        let mut unflushed = 1e-3f32;
        for _ in 0..2_000 {
            unflushed = unflushed * 0.9 + 1.0 * 0.0;
        }
        assert!(unflushed.is_subnormal(), "{unflushed:e}");
    }
}
