//! A reduction-tree node's shards stacked in one batch, for [`Vae::elbo_grad_tree`]: where each
//! shard's rows are in the stacked buffers, and the node's statistics and per-layer gradient sums,
//! each shard's computed from its own rows and added along the tree ([`Node::fold_leaves`],
//! [`Node::par_sum_into`]).
//!
//! [`Vae::elbo_grad_tree`]: crate::model::Vae::elbo_grad_tree

use std::ops::Range;
use std::sync::Mutex;

use crate::kernels::{Float, TreeProgram};
use crate::model::BatchStats;
use crate::train::Node;

/// Row ranges of consecutive segments, `rows_per_example` rows per example.
struct Segments {
    bounds: Vec<usize>,
}

impl Segments {
    fn new(examples: &[usize], rows_per_example: usize) -> Self {
        let mut bounds = Vec::with_capacity(examples.len() + 1);
        bounds.push(0);
        for &len in examples {
            bounds.push(bounds.last().expect("non-empty") + len * rows_per_example);
        }
        Segments { bounds }
    }

    fn range(&self, s: usize) -> Range<usize> {
        self.bounds[s]..self.bounds[s + 1]
    }
}

/// The shards of a tree node, stacked in shard order: shard `node.lo + i` has `segments[i]`
/// examples.
pub(crate) struct StackedShards {
    node: Node,
    /// Encoder rows: one per example.
    enc_rows: Segments,
    /// Decoder rows: one per example and sample.
    dec_rows: Segments,
}

impl StackedShards {
    pub(crate) fn new(node: Node, segments: &[usize], samples: usize) -> Self {
        StackedShards {
            node,
            enc_rows: Segments::new(segments, 1),
            dec_rows: Segments::new(segments, samples),
        }
    }

    /// The index of a leaf below the node among the node's shards.
    fn shard(&self, leaf: Node) -> usize {
        (leaf.lo - self.node.lo) as usize
    }

    /// The node's statistics from the last forward pass's per-row terms: each shard's summed in
    /// example order from zero (so it does not depend on its neighbours), then added along the
    /// tree.
    pub(crate) fn stats(&self, row_loglik: &[f64], row_kl: &[f64], samples: usize) -> BatchStats {
        self.node.fold_leaves(
            &mut |leaf| {
                let s = self.shard(leaf);
                BatchStats::of_rows(
                    &row_loglik[self.dec_rows.range(s)],
                    &row_kl[self.enc_rows.range(s)],
                    samples,
                )
            },
            &mut |left, right| left + right,
        )
    }

    /// The encoder rows (one per example) of the shards, with `pool` for the tree sums' scratch.
    pub(crate) fn encoder_rows<'a, T>(&'a self, pool: &'a Mutex<Vec<Vec<T>>>) -> ShardRows<'a, T> {
        ShardRows {
            shards: self,
            segments: &self.enc_rows,
            pool,
        }
    }

    /// The decoder rows (one per example and sample) of the shards, with `pool` for scratch.
    pub(crate) fn decoder_rows<'a, T>(&'a self, pool: &'a Mutex<Vec<Vec<T>>>) -> ShardRows<'a, T> {
        ShardRows {
            shards: self,
            segments: &self.dec_rows,
            pool,
        }
    }
}

/// What a layer's backward step needs to know about the shards: their rows (encoder or decoder
/// rows) and a pool of scratch vectors for the tree's partial sums.
pub(crate) struct ShardRows<'a, T> {
    shards: &'a StackedShards,
    segments: &'a Segments,
    pool: &'a Mutex<Vec<Vec<T>>>,
}

impl<T: Float> ShardRows<'_, T> {
    /// Writes into `out` the sum along the tree of `leaf(rows, buf)`, each shard's contribution
    /// from its rows written into `buf`, `left += right` elementwise at every inner node.
    pub(crate) fn tree_sum(&self, out: &mut [T], leaf: &(impl Fn(Range<usize>, &mut [T]) + Sync)) {
        let shards = self.shards;
        shards.node.par_sum_into(out, self.pool, &|leaf_node, buf| {
            leaf(self.segments.range(shards.shard(leaf_node)), buf)
        });
    }

    /// The node's tree sum over these rows as a program for the fused kernels
    /// ([`crate::kernels::tree_weight_grad`]).
    pub(crate) fn program(&self) -> TreeProgram {
        let shards = self.shards;
        TreeProgram::new(shards.node, |leaf| self.segments.range(shards.shard(leaf)))
    }
}
