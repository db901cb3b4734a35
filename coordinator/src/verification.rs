//! Verification by recomputation (`--verify FRACTION`). Results are deterministic, so two honest
//! computations of a tree node are the same bits: a chosen fraction of nodes is computed by a
//! second worker and the copies compared bit for bit. On a mismatch the coordinator computes the
//! node itself (it holds the data, the parameters and the same engine) and its copy decides: the
//! worker that disagrees is quarantined, and the run continues with exactly the honest bits.
//!
//! Which nodes are verified follows from a secret the coordinator draws at start and never
//! sends, so a worker cannot tell a verified node from an unverified one.

use common::train::{GradientSum, Node};

use crate::state::WorkerId;

/// Who computed a copy of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Worker(WorkerId),
    /// The coordinator itself: trusted, and decides any disagreement.
    Coordinator,
}

/// Whether node `node` of `global_step` is verified: a keyed hash below `fraction`.
pub fn selected(secret: u64, fraction: f64, global_step: u64, node: Node) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    if fraction >= 1.0 {
        return true;
    }
    let key = secret
        ^ global_step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (u64::from(node.lo) << 32 | u64::from(node.hi)).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    (splitmix64(key) >> 11) as f64 / (1u64 << 53) as f64 <= fraction
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The copies of one verified node received so far.
#[derive(Debug, Default)]
pub struct Copies {
    copies: Vec<(Source, GradientSum)>,
    /// The coordinator was asked to compute the node (a disagreement, or no second worker).
    pub coordinator_asked: bool,
}

/// What the copies received so far decide.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Not enough copies yet.
    Wait,
    /// Use `sum`; the workers in `wrong` sent other bits than the trusted result.
    Accept {
        sum: GradientSum,
        wrong: Vec<WorkerId>,
    },
    /// Two workers disagree: the coordinator must compute the node.
    Arbitrate,
}

impl Copies {
    /// Whether `worker` already sent a copy (a second one from it proves nothing).
    pub fn has_from(&self, worker: WorkerId) -> bool {
        self.copies
            .iter()
            .any(|(s, _)| *s == Source::Worker(worker))
    }

    pub fn workers(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.copies.iter().filter_map(|(s, _)| match s {
            Source::Worker(w) => Some(*w),
            Source::Coordinator => None,
        })
    }

    pub fn add(&mut self, source: Source, sum: GradientSum) {
        self.copies.push((source, sum));
    }

    /// Decides once the copies allow it; on `Accept` the copies are consumed.
    pub fn decide(&mut self) -> Decision {
        let trusted = self
            .copies
            .iter()
            .position(|(s, _)| *s == Source::Coordinator);
        if let Some(i) = trusted {
            let (_, sum) = self.copies.swap_remove(i);
            let wrong = self
                .copies
                .drain(..)
                .filter(|(_, copy)| !copy.same_bits(&sum))
                .filter_map(|(s, _)| match s {
                    Source::Worker(w) => Some(w),
                    Source::Coordinator => None,
                })
                .collect();
            return Decision::Accept { sum, wrong };
        }
        if self.copies.len() < 2 {
            return Decision::Wait;
        }
        let first = &self.copies[0].1;
        if self.copies[1..].iter().all(|(_, c)| c.same_bits(first)) {
            let (_, sum) = self.copies.swap_remove(0);
            self.copies.clear();
            return Decision::Accept {
                sum,
                wrong: Vec::new(),
            };
        }
        if self.coordinator_asked {
            Decision::Wait
        } else {
            self.coordinator_asked = true;
            Decision::Arbitrate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::model::BatchStats;

    fn sum(values: &[f32]) -> GradientSum {
        GradientSum {
            grad: values.to_vec(),
            stats: BatchStats {
                examples: 2,
                elbo: -1.0,
                recon: -0.5,
                kl: 0.5,
            },
        }
    }

    #[test]
    fn the_fraction_picks_about_that_many_nodes_and_the_secret_changes_which() {
        let nodes: Vec<(u64, Node)> = (0..1000u64)
            .flat_map(|s| (0..16u32).map(move |lo| (s, Node { lo, hi: lo + 1 })))
            .collect();
        let count = |secret, f| {
            nodes
                .iter()
                .filter(|(s, n)| selected(secret, f, *s, *n))
                .count()
        };
        let picked = count(7, 0.1) as f64 / nodes.len() as f64;
        assert!((0.09..0.11).contains(&picked), "{picked}");
        assert_eq!(count(7, 1.0), nodes.len());
        assert_eq!(count(7, 0.0), 0);
        let a: Vec<bool> = nodes
            .iter()
            .map(|(s, n)| selected(7, 0.5, *s, *n))
            .collect();
        let b: Vec<bool> = nodes
            .iter()
            .map(|(s, n)| selected(8, 0.5, *s, *n))
            .collect();
        assert_ne!(a, b);
    }

    #[test]
    fn agreeing_copies_are_accepted_and_one_ulp_is_a_disagreement() {
        let (a, b) = (WorkerId(1), WorkerId(2));
        let mut copies = Copies::default();
        copies.add(Source::Worker(a), sum(&[1.0, 2.0]));
        assert_eq!(copies.decide(), Decision::Wait);
        copies.add(Source::Worker(b), sum(&[1.0, 2.0]));
        assert!(matches!(copies.decide(), Decision::Accept { wrong, .. } if wrong.is_empty()));

        let mut copies = Copies::default();
        copies.add(Source::Worker(a), sum(&[1.0, 2.0]));
        let off = f32::from_bits(2.0f32.to_bits() + 1);
        copies.add(Source::Worker(b), sum(&[1.0, off]));
        assert_eq!(copies.decide(), Decision::Arbitrate);
        assert_eq!(copies.decide(), Decision::Wait, "asked once");
        copies.add(Source::Coordinator, sum(&[1.0, 2.0]));
        assert_eq!(
            copies.decide(),
            Decision::Accept {
                sum: sum(&[1.0, 2.0]),
                wrong: vec![b]
            }
        );
    }

    #[test]
    fn the_coordinators_copy_alone_decides() {
        let mut copies = Copies::default();
        copies.add(Source::Coordinator, sum(&[3.0]));
        assert!(matches!(copies.decide(), Decision::Accept { wrong, .. } if wrong.is_empty()));
    }
}
