//! What a shard, or a block of shards, contributes to a step.

use crate::reduce::TreeSum;

/// Sums over a set of examples of the loss gradient (the gradient of the *negative* ELBO, so the
/// optimizer minimises) and of the ELBO's parts, in nats. Summed, not averaged: the coordinator
/// divides by the step's example count once, after the tree reduction.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientSum {
    /// d(-ELBO)/d(params), summed over examples; laid out as [`crate::layout::ParamLayout`].
    pub grad: Vec<f32>,
    pub examples: u64,
    /// Sum over examples of the ELBO estimate (recon - kl).
    pub elbo: f64,
    /// Sum over examples of E_q[log p(x|z)] (the K-sample average per example).
    pub recon: f64,
    /// Sum over examples of KL(q(z|x) || p(z)).
    pub kl: f64,
}

impl GradientSum {
    /// The sum over no examples.
    pub fn zeros(len: usize) -> Self {
        GradientSum {
            grad: vec![0.0; len],
            examples: 0,
            elbo: 0.0,
            recon: 0.0,
            kl: 0.0,
        }
    }
}

/// Below this many elements a vector is added on one thread: splitting costs more than it saves.
const PARALLEL_ADD_MIN: usize = 1 << 16;

impl TreeSum for GradientSum {
    /// Elementwise, so any split across threads gives the same bits.
    fn add_assign(&mut self, other: &Self) {
        assert_eq!(self.grad.len(), other.grad.len(), "gradient lengths differ");
        add_into(&mut self.grad, &other.grad);
        self.examples += other.examples;
        self.elbo += other.elbo;
        self.recon += other.recon;
        self.kl += other.kl;
    }
}

/// `acc[i] += x[i]`, in parallel for long vectors.
pub fn add_into(acc: &mut [f32], x: &[f32]) {
    use rayon::prelude::*;
    if acc.len() < PARALLEL_ADD_MIN {
        acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
    } else {
        acc.par_chunks_mut(PARALLEL_ADD_MIN)
            .zip(x.par_chunks(PARALLEL_ADD_MIN))
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
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
