//! What a shard, or a block of shards, contributes to a step.

use crate::kernels::{self, add_assign};
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

/// The largest magnitude among some values, as the bit pattern of `|v|`. For non-negative floats
/// the bit patterns order like the values, with infinity and then NaN above every finite value,
/// so one integer maximum answers "all finite and within a bound?" for all three.
///
/// Measured as a peer's gradient is copied in ([`Magnitude::copy_measuring`]), or where a
/// co-located worker wrote it (a read, no copy), so checking the values needs no second pass, which would read a 2.6 MB gradient from L3 again on the
/// coordinator's critical path (docs/scaling.md §17, §20).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Magnitude(u32);

impl Magnitude {
    /// The largest magnitude among `values` (zero for none).
    pub fn of(values: &[f32]) -> Self {
        Magnitude(kernels::magnitude_bits(values))
    }

    /// Copies `src` into `dst` (of the same length) and measures the copy in the same pass, so
    /// what is measured is what was stored, whatever another process does to `src` meanwhile
    /// (`kernels::copy_measuring`, which also avoids `memcpy`'s slow case on a Zen 3).
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn copy_measuring(dst: &mut [f32], src: &[f32]) -> Self {
        Magnitude(kernels::copy_measuring(dst, src))
    }

    /// Fills `dst` piece by piece (`fill(start, piece)` writes the values from `start` on) and
    /// measures each piece while it is in L1: [`Magnitude::copy_measuring`] from any source
    /// (the bytes of a message, say).
    pub fn fill_measuring(dst: &mut [f32], fill: impl FnMut(usize, &mut [f32])) -> Self {
        Magnitude(kernels::fill_measuring(dst, fill))
    }

    /// Adds `src` to `acc` (of the same length) and measures the values added in the same pass,
    /// each from the register it was added from (`kernels::add_measuring`): what is measured is
    /// what was added, whatever another process does to `src` meanwhile.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn add_measuring(acc: &mut [f32], src: &[f32]) -> Self {
        Magnitude(kernels::add_measuring(acc, src))
    }

    /// The larger of two magnitudes (of two parts of the same values).
    pub fn max(self, other: Self) -> Self {
        Ord::max(self, other)
    }

    /// Whether every value measured is finite and at most `max_abs` in magnitude.
    pub fn is_within(self, max_abs: f32) -> bool {
        self.0 <= max_abs.abs().to_bits()
    }
}

/// Checks a gradient received from elsewhere before it touches anything: its length, and that
/// every value is finite and at most `max_abs` in magnitude.
pub fn check_gradient(grad: &[f32], expected_len: usize, max_abs: f32) -> Result<(), String> {
    check_measured(grad, Magnitude::of(grad), expected_len, max_abs)
}

/// [`check_gradient`] with the values' [`Magnitude`] already measured (as they were copied in).
/// `magnitude` must be that of `grad`: only the error message looks at the values again.
pub fn check_measured(
    grad: &[f32],
    magnitude: Magnitude,
    expected_len: usize,
    max_abs: f32,
) -> Result<(), String> {
    if grad.len() != expected_len {
        return Err(format!(
            "gradient has {} values, the model has {expected_len} parameters",
            grad.len()
        ));
    }
    if magnitude.is_within(max_abs) {
        return Ok(());
    }
    let Some(i) = grad.iter().position(|g| g.is_nan() || g.abs() > max_abs) else {
        // Only a caller passing a magnitude not measured from `grad` gets here.
        return Err(format!(
            "internal error: the gradient's measured magnitude ({:e}) is not that of its values; \
             please report this",
            f32::from_bits(magnitude.0)
        ));
    };
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
    Magnitude::of(values).is_within(f32::MAX)
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

    /// The measured magnitude answers the check for every kind of outlier (the copy itself, on
    /// every vector path and both ways, is tested in `kernels::copy`).
    #[test]
    fn a_measuring_copy_answers_the_check_for_every_kind_of_outlier() {
        let len = 1000;
        for big in crate::kernels::OUTLIERS {
            let mut src: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            src[len / 3] = big;
            let mut copy = vec![0.0f32; len];
            let magnitude = Magnitude::copy_measuring(&mut copy, &src);
            assert!(
                copy.iter()
                    .zip(&src)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            assert_eq!(magnitude, Magnitude::of(&src), "{big}");
            assert_eq!(magnitude, Magnitude(big.abs().to_bits()), "{big}");
            assert_eq!(magnitude.is_within(4.0), big.abs() <= 4.0, "{big}");
            assert_eq!(
                check_measured(&src, magnitude, len, 4.0).is_ok(),
                big.abs() <= 4.0,
                "{big}"
            );
        }
        assert_eq!(Magnitude::of(&[]), Magnitude::default());
        // A magnitude that is not the values' is reported as the caller's bug, not the peer's.
        let e = check_measured(&[1.0; 4], Magnitude::of(&[9.0]), 4, 4.0).unwrap_err();
        assert!(e.contains("internal error"), "{e}");
        assert!(Magnitude::of(&[-0.0, 0.0]).is_within(0.0));
    }
}
