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
    if let Some(i) = grad.iter().position(|g| !g.is_finite()) {
        return Err(format!("gradient value {i} is {} (not finite)", grad[i]));
    }
    Ok(())
}
