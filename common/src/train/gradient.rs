//! What a shard, or a block of shards, contributes to a step.

use crate::kernels::add_assign;
use crate::model::BatchStats;
use crate::train::TreeSum;

/// Sums over a set of examples of the loss gradient (the gradient of the *negative* ELBO, so the
/// optimizer minimises) and of the ELBO's parts, in nats. Summed, not averaged: the coordinator
/// divides by the step's example count once, after the tree reduction.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientSum {
    /// d(-ELBO)/d(params), summed over examples; laid out as [`crate::model::ParamLayout`].
    pub grad: Vec<f32>,
    /// The examples and the sums of the ELBO and its parts over them.
    pub stats: BatchStats,
}

impl GradientSum {
    /// The sum over no examples.
    pub fn zeros(len: usize) -> Self {
        GradientSum {
            grad: vec![0.0; len],
            stats: BatchStats::default(),
        }
    }
}

impl GradientSum {
    /// Whether both are the same bits (what two honest computations of one node give): `0.0`
    /// and `-0.0` differ here, as do NaNs of different payloads.
    pub fn same_bits(&self, other: &GradientSum) -> bool {
        let stats = |s: &BatchStats| {
            (
                s.examples,
                s.elbo.to_bits(),
                s.recon.to_bits(),
                s.kl.to_bits(),
            )
        };
        self.grad.len() == other.grad.len()
            && stats(&self.stats) == stats(&other.stats)
            && self
                .grad
                .iter()
                .zip(&other.grad)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

impl TreeSum for GradientSum {
    /// Elementwise, so any split across threads gives the same bits.
    fn add_assign(&mut self, other: &Self) {
        assert_eq!(self.grad.len(), other.grad.len(), "gradient lengths differ");
        add_assign(&mut self.grad, &other.grad);
        self.stats += other.stats;
    }
}

/// The largest magnitude an honest gradient element may have, per example summed: far above any
/// gradient of a training that has not diverged (per-example gradients of the negative ELBO are
/// O(1) to O(1e4)), far below where f32 optimizer state overflows (Adam squares the mean
/// gradient: beyond ~1.8e19 its second moment becomes infinite). A worker sending more is faulty
/// or hostile, whatever the values' finiteness.
pub const MAX_ABS_GRADIENT_PER_EXAMPLE: f32 = 1e15;

/// Checks a gradient received from elsewhere before it touches anything: its length, and that
/// every value is finite and at most `max_abs` in magnitude.
pub fn check_gradient(grad: &[f32], expected_len: usize, max_abs: f32) -> Result<(), String> {
    if grad.len() != expected_len {
        return Err(format!(
            "gradient has {} values, the model has {expected_len} parameters",
            grad.len()
        ));
    }
    if all_within(grad, max_abs) {
        return Ok(());
    }
    let i = grad
        .iter()
        .position(|g| g.is_nan() || g.abs() > max_abs)
        .expect("a value is out of bounds");
    if grad[i].is_finite() {
        Err(format!(
            "gradient value {i} is {:e}, beyond {max_abs:e}: no honest gradient is that large",
            grad[i]
        ))
    } else {
        Err(format!("gradient value {i} is {} (not finite)", grad[i]))
    }
}

/// Whether every value is finite.
pub fn all_finite(values: &[f32]) -> bool {
    all_within(values, f32::MAX)
}

/// Whether every value is finite with `|v| <= max_abs`. For non-negative floats the bit patterns
/// order like the values, and NaN and infinity sit above every finite value, so one integer
/// comparison per value covers all three; an OR over blocks vectorises (an early-exit search does
/// not): the coordinator checks millions of values per step.
fn all_within(values: &[f32], max_abs: f32) -> bool {
    const MAGNITUDE: u32 = 0x7fff_ffff;
    let limit = max_abs.abs().to_bits();
    values.chunks(4096).all(|block| {
        !block
            .iter()
            .fold(false, |any, v| any | ((v.to_bits() & MAGNITUDE) > limit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_non_finite_value_is_found_wherever_it_is() {
        let n = 10_000;
        let ok = vec![f32::MAX; n];
        assert!(check_gradient(&ok, n, f32::MAX).is_ok());
        let edge = [f32::MIN, -0.0, f32::MIN_POSITIVE, 1e-45, f32::MAX];
        assert!(check_gradient(&edge, 5, f32::MAX).is_ok());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
            for i in [0, 4095, 4096, n - 1] {
                let mut g = ok.clone();
                g[i] = bad;
                let e = check_gradient(&g, n, f32::MAX).unwrap_err();
                assert!(e.contains(&format!("value {i} ")), "{e}");
            }
        }
        assert!(
            check_gradient(&ok, n + 1, f32::MAX)
                .unwrap_err()
                .contains("10000 values")
        );
    }

    #[test]
    fn finite_but_huge_values_are_refused_wherever_they_are() {
        let n = 10_000;
        let bound = 64.0 * MAX_ABS_GRADIENT_PER_EXAMPLE;
        let mut g = vec![1.0f32; n];
        g[17] = -bound;
        assert!(
            check_gradient(&g, n, bound).is_ok(),
            "the bound itself is allowed"
        );
        for i in [0, 4095, 4096, n - 1] {
            let mut g = vec![1.0f32; n];
            g[i] = if i % 2 == 0 { 1e22 } else { -1e22 };
            let e = check_gradient(&g, n, bound).unwrap_err();
            assert!(
                e.contains(&format!("value {i} ")) && e.contains("honest"),
                "{e}"
            );
        }
        assert!(all_finite(&[f32::MAX, f32::MIN]) && !all_finite(&[1.0, f32::NAN]));
    }
}
