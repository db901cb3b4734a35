//! [`BatchStats`]: the per-batch sums of the ELBO and its parts, the one type every step, shard,
//! tree node, evaluation chunk and epoch total adds up.

use std::ops::{Add, AddAssign};

use serde::{Deserialize, Serialize};

/// Sums over a set of examples of the ELBO and its parts, in nats. Summed, not averaged: a mean
/// is taken once, by whoever holds the final sum.
///
/// Adding two (`a + b`, `a += b`) adds each field of `b` to the same field of `a`, so a sum's
/// bits depend only on which values are added in which order (the reduction tree's order, or
/// example order within a shard).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchStats {
    pub examples: u64,
    /// Sum over examples of the ELBO estimate, `recon - kl`.
    pub elbo: f64,
    /// Sum over examples of `E_q[log p(x|z)]` (the K-sample average per example).
    pub recon: f64,
    /// Sum over examples of `KL(q(z|x) || p(z))`.
    pub kl: f64,
}

impl BatchStats {
    /// The sums over the examples of a forward pass, in example order from zero: example `i` has
    /// the `samples` log-likelihoods `row_loglik[i * samples..(i + 1) * samples]` and the KL
    /// `row_kl[i]`.
    pub(crate) fn of_rows(row_loglik: &[f64], row_kl: &[f64], samples: usize) -> Self {
        let inv_k = 1.0 / samples as f64;
        let mut stats = BatchStats {
            examples: row_kl.len() as u64,
            ..BatchStats::default()
        };
        for (lls, &kl) in row_loglik.chunks_exact(samples).zip(row_kl) {
            let recon = lls.iter().sum::<f64>() * inv_k;
            stats.recon += recon;
            stats.kl += kl;
            stats.elbo += recon - kl;
        }
        stats
    }
}

impl AddAssign for BatchStats {
    fn add_assign(&mut self, other: BatchStats) {
        self.examples += other.examples;
        self.elbo += other.elbo;
        self.recon += other.recon;
        self.kl += other.kl;
    }
}

impl Add for BatchStats {
    type Output = BatchStats;

    fn add(mut self, other: BatchStats) -> BatchStats {
        self += other;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_field_by_field_and_averages_samples() {
        let a = BatchStats {
            examples: 2,
            elbo: -3.0,
            recon: -2.5,
            kl: 0.5,
        };
        let b = BatchStats::of_rows(&[-1.0, -3.0, -4.0, -6.0], &[0.25, 1.0], 2);
        assert_eq!(
            b,
            BatchStats {
                examples: 2,
                elbo: -2.25 - 6.0,
                recon: -7.0,
                kl: 1.25
            }
        );
        let mut c = a;
        c += b;
        assert_eq!(c, a + b);
        assert_eq!((c.examples, c.elbo, c.recon, c.kl), (4, -11.25, -9.5, 1.75));
    }
}
