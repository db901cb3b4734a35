//! A received gradient's values: owned, or left where a co-located worker wrote them in shared
//! memory and read there by the step's update (docs/design.md §5).
//!
//! Why: copying each co-located worker's gradient out on arrival wrote 2.6 MB per worker per step
//! on the step's critical path; left in place, it is read once to be checked and once by the
//! update (docs/scaling.md §42, §43). Values rewritten within the bound after the first check
//! pass the second one unnoticed: the same values submitted in the first place would have
//! passed too. (Under `--verify` every result is copied out on arrival instead.)
//!
//! What keeps it safe: such values live in memory another process may write at any time, so they
//! are never lent out as a slice. They are only copied out or added into a sum, and measured as
//! they are ([`SharedValues::copy_measuring`], [`SharedValues::add_measuring`]), so what is checked
//! is what is used. A result's values are checked when it arrives (and rejected there like any
//! other); the update checks each block again as it copies or adds it
//! ([`SharedGradient::copy_checked`], [`SharedGradient::add_checked`]). A block that fails then was
//! rewritten after the result was accepted, which no honest worker does: it is summed as zeros and
//! its writer named (`BlockwiseSum::rewritten`), so such a worker can change the step by no more
//! than an accepted result could, and is quarantined.

use std::fmt;
use std::sync::Arc;

use super::gradient::{GradientSum, Magnitude, check_gradient};
use crate::model::BatchStats;

/// Values in memory another process may still write. Never lent out as a slice: only copied
/// out or added into a sum, measured as they are.
pub trait SharedValues: fmt::Debug + Send + Sync {
    /// How many values.
    fn len(&self) -> usize;

    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies values `start..start + out.len()` into `out` and measures the copy as it is made
    /// (what is measured is what was stored, whatever the other process does meanwhile).
    ///
    /// # Panics
    /// If the range is outside the values.
    fn copy_measuring(&self, start: usize, out: &mut [f32]) -> Magnitude;

    /// Adds values `start..start + acc.len()` to `acc` (`acc[i] += v[i]`) and measures the values
    /// added, each as it is added. By default through a copy (each value read once).
    ///
    /// # Panics
    /// If the range is outside the values.
    fn add_measuring(&self, start: usize, acc: &mut [f32]) -> Magnitude {
        let mut values = vec![0.0; acc.len()];
        let magnitude = self.copy_measuring(start, &mut values);
        for (a, v) in acc.iter_mut().zip(&values) {
            *a += v;
        }
        magnitude
    }

    /// Every value, copied out and measured.
    fn to_vec(&self) -> (Vec<f32>, Magnitude) {
        let mut out = vec![0.0; self.len()];
        let magnitude = self.copy_measuring(0, &mut out);
        (out, magnitude)
    }
}

/// Checks values read where another process wrote them, given their magnitude measured on
/// arrival: the same verdicts and messages as [`super::check_measured`], the values copied out
/// only to say which value failed.
pub fn check_shared(
    values: &dyn SharedValues,
    magnitude: Magnitude,
    expected_len: usize,
    max_abs: f32,
) -> Result<(), String> {
    if values.len() != expected_len {
        return Err(format!(
            "gradient has {} values, the model has {expected_len} parameters",
            values.len()
        ));
    }
    if magnitude.is_within(max_abs) {
        return Ok(());
    }
    let (copy, _) = values.to_vec();
    check_gradient(&copy, expected_len, max_abs)?;
    Err("gradient values changed while they were read (the worker rewrote them)".into())
}

/// A received gradient's values.
#[derive(Debug)]
pub enum GradientValues {
    Owned(Vec<f32>),
    /// Where a co-located worker wrote them, already checked once.
    Shared(SharedGradient),
}

impl GradientValues {
    pub fn len(&self) -> usize {
        match self {
            GradientValues::Owned(values) => values.len(),
            GradientValues::Shared(shared) => shared.values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Values left where a worker wrote them, with what their second check needs.
#[derive(Debug, Clone)]
pub struct SharedGradient {
    pub values: Arc<dyn SharedValues>,
    /// The bound every value met when the result was accepted, checked again as it is copied.
    pub max_abs: f32,
    /// The worker whose memory holds them (its id), named if they fail the second check.
    pub writer: u64,
}

impl SharedGradient {
    /// Copies values `start..start + out.len()` into `out`, checked against `max_abs` as they
    /// are copied; `false` when some fail (rewritten since they were accepted: `out` then holds
    /// them, and must not be used).
    pub fn copy_checked(&self, start: usize, out: &mut [f32]) -> bool {
        self.values
            .copy_measuring(start, out)
            .is_within(self.max_abs)
    }

    /// Adds values `start..start + acc.len()` to `acc`, checked against `max_abs` as they are
    /// added; `false` when some fail (`acc` then holds them, and must not be used).
    pub fn add_checked(&self, start: usize, acc: &mut [f32]) -> bool {
        self.values
            .add_measuring(start, acc)
            .is_within(self.max_abs)
    }
}

/// A received node's gradient and statistics, as the step's update sums them.
#[derive(Debug)]
pub struct ReceivedGradient {
    pub values: GradientValues,
    pub stats: BatchStats,
}

impl From<GradientSum> for ReceivedGradient {
    fn from(sum: GradientSum) -> Self {
        ReceivedGradient {
            values: GradientValues::Owned(sum.grad),
            stats: sum.stats,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Values "elsewhere" whose copies read `later` from the second copy on (a rewrite after the
    /// first read).
    #[derive(Debug)]
    struct Rewritten {
        first: Vec<f32>,
        later: Vec<f32>,
        copies: Mutex<usize>,
    }

    impl SharedValues for Rewritten {
        fn len(&self) -> usize {
            self.first.len()
        }

        fn copy_measuring(&self, start: usize, out: &mut [f32]) -> Magnitude {
            let mut copies = self.copies.lock().unwrap();
            *copies += 1;
            let values = if *copies == 1 {
                &self.first
            } else {
                &self.later
            };
            Magnitude::copy_measuring(out, &values[start..start + out.len()])
        }
    }

    fn rewritten(first: Vec<f32>, later: Vec<f32>) -> Rewritten {
        Rewritten {
            first,
            later,
            copies: Mutex::new(0),
        }
    }

    #[test]
    fn shared_values_are_checked_like_copied_ones() {
        let honest = vec![1.0, -2.0, 3.0];
        let same = |v: &[f32]| rewritten(v.to_vec(), v.to_vec());
        let ok = same(&honest);
        assert_eq!(check_shared(&ok, Magnitude::of(&honest), 3, 10.0), Ok(()));
        let e = check_shared(&ok, Magnitude::of(&honest), 4, 10.0).unwrap_err();
        assert!(e.contains("has 3 values, the model has 4"), "{e}");
        for (bad, says) in [(f32::NAN, "not finite"), (1e30, "beyond")] {
            let values = vec![1.0, bad, 3.0];
            let e = check_shared(&same(&values), Magnitude::of(&values), 3, 10.0).unwrap_err();
            assert!(e.contains("value 1") && e.contains(says), "{e}");
        }
        // Huge when measured, honest when copied out to say which value: rewritten meanwhile.
        let flip = rewritten(honest.clone(), honest.clone());
        let e = check_shared(&flip, Magnitude::of(&[1e30]), 3, 10.0).unwrap_err();
        assert!(e.contains("changed while they were read"), "{e}");
    }

    #[test]
    fn a_checked_copy_or_addition_fails_on_what_fails_the_bound() {
        let shared = |first: Vec<f32>, later: Vec<f32>| SharedGradient {
            values: Arc::new(rewritten(first, later)),
            max_abs: 10.0,
            writer: 5,
        };
        let honest = shared(vec![1.0, 2.0], vec![1.0, 2.0]);
        let mut out = [0.0; 2];
        assert!(honest.copy_checked(0, &mut out));
        assert_eq!(out, [1.0, 2.0]);
        assert!(honest.add_checked(0, &mut out));
        assert_eq!(out, [2.0, 4.0]);
        // The first read passes; later ones read a rewrite beyond the bound.
        let liar = shared(vec![1.0, 2.0], vec![1.0, f32::INFINITY]);
        assert!(liar.copy_checked(0, &mut out));
        assert!(!liar.copy_checked(0, &mut out));
        assert!(!liar.add_checked(1, &mut out[..1]));
        assert!(
            liar.add_checked(0, &mut out[..1]),
            "the value not rewritten"
        );
    }
}
