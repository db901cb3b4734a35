//! Virtual shards: how the training set is cut and which examples each step uses.
//!
//! The training set (`n` examples, ids `0..n`) is cut into `S` contiguous shards whose sizes differ
//! by at most one. `S` is a run setting, independent of the number of workers (docs/design.md
//! §2). In every epoch each shard is visited in its own order, a permutation keyed by
//! `(seed, epoch, shard)`, and each step takes the next `batch / S` examples of every shard. The
//! last step of an epoch takes what remains, so an epoch uses every example exactly once.

use std::ops::Range;

use crate::model::{KeyedRng, domain};
use crate::{Error, Result};

/// The cut of the training set into shards and the per-step schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    examples: usize,
    shards: usize,
    batch: usize,
    seed: u64,
}

impl ShardPlan {
    /// `examples` training examples, `shards` virtual shards, a global batch of `batch`.
    pub fn new(examples: usize, shards: usize, batch: usize, seed: u64) -> Result<Self> {
        if shards == 0 {
            return Err(Error::Config("--shards must be at least 1".into()));
        }
        if batch == 0 || !batch.is_multiple_of(shards) {
            return Err(Error::Config(format!(
                "--batch {batch} must be a positive multiple of --shards {shards}: every step \
                 takes the same number of examples from each shard"
            )));
        }
        if examples < shards {
            return Err(Error::Config(format!(
                "{examples} training examples cannot fill {shards} shards: lower --shards or \
                 --holdout"
            )));
        }
        if u32::try_from(examples).is_err() {
            return Err(Error::Config(format!(
                "{examples} training examples: at most {} are supported",
                u32::MAX
            )));
        }
        Ok(ShardPlan {
            examples,
            shards,
            batch,
            seed,
        })
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn examples(&self) -> usize {
        self.examples
    }

    /// Examples each shard contributes to a full step.
    pub fn per_shard(&self) -> usize {
        self.batch / self.shards
    }

    /// The example ids of shard `s`: a contiguous block.
    pub fn shard_range(&self, s: usize) -> Range<usize> {
        let start = s * self.examples / self.shards;
        let end = (s + 1) * self.examples / self.shards;
        start..end
    }

    /// Steps in one epoch: enough for the largest shard; the last may be partial.
    pub fn steps_per_epoch(&self) -> usize {
        let largest = (0..self.shards)
            .map(|s| self.shard_range(s).len())
            .max()
            .unwrap_or(0);
        largest.div_ceil(self.per_shard())
    }

    /// The order in which shard `s` is visited in `epoch`: a permutation of its example ids.
    pub fn epoch_order(&self, epoch: u64, s: usize) -> Vec<u32> {
        let range = self.shard_range(s);
        let mut order: Vec<u32> = (range.start as u32..range.end as u32).collect();
        let mut rng = KeyedRng::new(&[domain::SHARD_ORDER, self.seed, epoch, s as u64]);
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        order
    }

    /// The positions within a shard's epoch order that `step` uses (may be empty at the end).
    pub fn step_window(&self, s: usize, step: usize) -> Range<usize> {
        let len = self.shard_range(s).len();
        let start = (step * self.per_shard()).min(len);
        let end = ((step + 1) * self.per_shard()).min(len);
        start..end
    }

    /// Number of examples a whole step uses (smaller than `batch` only at an epoch's end).
    pub fn step_examples(&self, step: usize) -> usize {
        (0..self.shards)
            .map(|s| self.step_window(s, step).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_uses_every_example_exactly_once() {
        for (n, shards, batch) in [(1000, 16, 32), (1003, 7, 21), (64, 4, 64), (10, 3, 3)] {
            let plan = ShardPlan::new(n, shards, batch, 42).unwrap();
            let mut seen = vec![0u32; n];
            for step in 0..plan.steps_per_epoch() {
                let mut in_step = 0;
                for s in 0..shards {
                    let order = plan.epoch_order(3, s);
                    for &id in &order[plan.step_window(s, step)] {
                        seen[id as usize] += 1;
                        in_step += 1;
                    }
                }
                assert_eq!(in_step, plan.step_examples(step));
                assert!(in_step <= batch);
            }
            assert!(seen.iter().all(|&c| c == 1), "n={n} S={shards} B={batch}");
        }
    }

    #[test]
    fn orders_depend_on_seed_epoch_and_shard_only() {
        let plan = ShardPlan::new(1000, 4, 8, 1).unwrap();
        assert_eq!(plan.epoch_order(0, 2), plan.epoch_order(0, 2));
        assert_ne!(plan.epoch_order(0, 2), plan.epoch_order(1, 2));
        let other_seed = ShardPlan::new(1000, 4, 8, 2).unwrap();
        assert_ne!(plan.epoch_order(0, 2), other_seed.epoch_order(0, 2));
        let mut sorted = plan.epoch_order(5, 1);
        sorted.sort();
        assert_eq!(sorted, (250..500).collect::<Vec<u32>>());
    }

    #[test]
    fn rejects_batches_that_do_not_divide_evenly() {
        let err = ShardPlan::new(1000, 16, 100, 0).unwrap_err().to_string();
        assert!(err.contains("multiple of --shards"), "{err}");
        assert!(ShardPlan::new(3, 4, 4, 0).is_err());
    }
}
