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

impl TreeSum for GradientSum {
    /// Elementwise, so any split across threads gives the same bits.
    fn add_assign(&mut self, other: &Self) {
        assert_eq!(self.grad.len(), other.grad.len(), "gradient lengths differ");
        add_assign(&mut self.grad, &other.grad);
        self.stats += other.stats;
    }
}

/// Checks a gradient received from elsewhere before it touches anything: length and finiteness.
pub fn check_gradient(grad: &[f32], expected_len: usize) -> Result<(), String> {
    if grad.len() != expected_len {
        return Err(format!(
            "gradient has {} values, the model has {expected_len} parameters",
            grad.len()
        ));
    }
    if all_finite(grad) {
        return Ok(());
    }
    let i = grad
        .iter()
        .position(|g| !g.is_finite())
        .expect("a value is not finite");
    Err(format!("gradient value {i} is {} (not finite)", grad[i]))
}

/// Whether every value is finite. An OR over the exponent bits of blocks of values vectorises
/// (an early-exit search does not): the coordinator checks millions of values per step.
fn all_finite(values: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    values.chunks(4096).all(|block| {
        !block
            .iter()
            .fold(false, |any, v| any | (v.to_bits() & EXPONENT == EXPONENT))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_non_finite_value_is_found_wherever_it_is() {
        let n = 10_000;
        let ok = vec![f32::MAX; n];
        assert!(check_gradient(&ok, n).is_ok());
        let edge = [f32::MIN, -0.0, f32::MIN_POSITIVE, 1e-45, f32::MAX];
        assert!(check_gradient(&edge, 5).is_ok());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
            for i in [0, 4095, 4096, n - 1] {
                let mut g = ok.clone();
                g[i] = bad;
                let e = check_gradient(&g, n).unwrap_err();
                assert!(e.contains(&format!("value {i} ")), "{e}");
            }
        }
        assert!(
            check_gradient(&ok, n + 1)
                .unwrap_err()
                .contains("10000 values")
        );
    }
}
