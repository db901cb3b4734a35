//! The fixed reduction order: a balanced binary tree over shard ids, and its one fold.
//!
//! The step gradient is the sum of the `S` shard gradients evaluated as one fixed tree: node
//! `[lo, hi)` is the sum of its children `[lo, mid)` and `[mid, hi)`, `mid = lo + (hi - lo) / 2`.
//! Floating-point addition is not associative, so this tree *is* the contract (docs/design.md
//! §2). A process that owns every shard under a node may send that node's sum; the receiver
//! evaluates the rest of the tree from whatever nodes it holds and gets the same bits as a single
//! process.
//!
//! Every sum along the tree goes through [`Node::fold`] (or its parallel twin
//! [`Node::par_fold_leaves`]), so there is one definition of the shape and of the order: the
//! receiver's [`ReductionTree::evaluate`], the per-shard ELBO sums and the per-layer gradient sums
//! of a node computed in one process.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::kernels::{Float, add_assign, sized};
use crate::{Error, Result};

/// A node of the reduction tree: the shards `lo..hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    pub lo: u32,
    pub hi: u32,
}

impl Node {
    pub fn len(&self) -> u32 {
        self.hi - self.lo
    }

    pub fn is_empty(&self) -> bool {
        self.hi <= self.lo
    }

    /// The node's two children, or `None` for a leaf.
    pub fn children(&self) -> Option<(Node, Node)> {
        if self.len() <= 1 {
            return None;
        }
        let mid = self.lo + self.len() / 2;
        Some((
            Node {
                lo: self.lo,
                hi: mid,
            },
            Node {
                lo: mid,
                hi: self.hi,
            },
        ))
    }

    /// The tree's fold: the value of a node is `at(node)` when that gives one (it must for a
    /// leaf), and otherwise `combine(left, right)` of its children's values, the left one
    /// computed first.
    ///
    /// # Panics
    /// If `at` gives no value for a leaf.
    pub fn fold<V>(
        self,
        at: &mut impl FnMut(Node) -> Option<V>,
        combine: &mut impl FnMut(V, V) -> V,
    ) -> V {
        if let Some(value) = at(self) {
            return value;
        }
        let (left, right) = self.children().expect("a fold gives every leaf a value");
        let left = left.fold(at, combine);
        let right = right.fold(at, combine);
        combine(left, right)
    }

    /// [`Node::fold`] with values given at the leaves only: `leaf(shard_node)` is called for
    /// every leaf below `self`, in shard order.
    pub fn fold_leaves<V>(
        self,
        leaf: &mut impl FnMut(Node) -> V,
        combine: &mut impl FnMut(V, V) -> V,
    ) -> V {
        self.fold(
            &mut |node| node.children().is_none().then(|| leaf(node)),
            combine,
        )
    }

    /// [`Node::fold_leaves`] with the two subtrees of every inner node computed side by side
    /// (`rayon::join`). The same values are combined in the same places, so the result is the
    /// same; only who computes what changes.
    pub fn par_fold_leaves<V: Send>(
        self,
        leaf: &(impl Fn(Node) -> V + Sync),
        combine: &(impl Fn(V, V) -> V + Sync),
    ) -> V {
        let Some((left, right)) = self.children() else {
            return leaf(self);
        };
        let (left, right) = rayon::join(
            || left.par_fold_leaves(leaf, combine),
            || right.par_fold_leaves(leaf, combine),
        );
        combine(left, right)
    }

    /// Writes into `out` the sum along the tree below `self` of the leaves' vectors
    /// (`leaf(shard_node, buf)` writes one into `buf`), `left += right` elementwise at every inner
    /// node, sibling subtrees in parallel ([`Node::par_fold_leaves`]). The first leaf writes into
    /// `out` itself; the others into scratch vectors taken from `pool` and returned to it.
    pub(crate) fn par_sum_into<T: Float>(
        self,
        out: &mut [T],
        pool: &Mutex<Vec<Vec<T>>>,
        leaf: &(impl Fn(Node, &mut [T]) + Sync),
    ) {
        let len = out.len();
        let out = Mutex::new(Some(out));
        self.par_fold_leaves(
            &|node| {
                let mut sum = if node.lo == self.lo {
                    Sum::Out(out.lock().expect("out").take().expect("one first leaf"))
                } else {
                    Sum::Scratch(pool.lock().expect("pool").pop().unwrap_or_default())
                };
                leaf(node, sum.values(len));
                sum
            },
            &|mut left, mut right| {
                add_assign(left.values(len), right.values(len));
                if let Sum::Scratch(buf) = right {
                    pool.lock().expect("pool").push(buf);
                }
                left
            },
        );
    }
}

/// Where [`Node::par_sum_into`] keeps a node's sum: the caller's output for the nodes whose first
/// shard is the first one (they are summed into it in place), a scratch vector for the others.
enum Sum<'a, T> {
    Out(&'a mut [T]),
    Scratch(Vec<T>),
}

impl<T: Float> Sum<'_, T> {
    /// The sum's `len` values (a scratch vector grows to `len` and never shrinks).
    fn values(&mut self, len: usize) -> &mut [T] {
        match self {
            Sum::Out(out) => out,
            Sum::Scratch(buf) => sized(buf, len),
        }
    }
}

/// A value that can be summed along the tree: `self += other`, elementwise.
pub trait TreeSum {
    fn add_assign(&mut self, other: &Self);
}

/// The tree over `shards` shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReductionTree {
    shards: u32,
}

impl ReductionTree {
    pub fn new(shards: usize) -> Self {
        assert!(shards > 0, "a reduction tree needs at least one shard");
        ReductionTree {
            shards: u32::try_from(shards).expect("shard count fits in u32"),
        }
    }

    pub fn root(&self) -> Node {
        Node {
            lo: 0,
            hi: self.shards,
        }
    }

    /// Whether `node` is a node of this tree (not just any range).
    pub fn contains(&self, node: Node) -> bool {
        let mut current = self.root();
        loop {
            if current == node {
                return true;
            }
            let Some((left, right)) = current.children() else {
                return false;
            };
            current = if node.hi <= left.hi {
                left
            } else if node.lo >= right.lo {
                right
            } else {
                return false;
            };
        }
    }

    /// Evaluates the tree at `node` from a set of computed nodes. Every shard under `node` must be
    /// covered by exactly the nodes given; consumes the values it uses.
    pub fn evaluate<T: TreeSum>(&self, node: Node, values: &mut HashMap<Node, T>) -> Result<T> {
        self.evaluate_with(node, values, &mut drop)
    }

    /// [`Self::evaluate`], handing each value added into another to `spent` (its buffers can be
    /// reused) instead of dropping it.
    pub fn evaluate_with<T: TreeSum>(
        &self,
        node: Node,
        values: &mut HashMap<Node, T>,
        spent: &mut impl FnMut(T),
    ) -> Result<T> {
        node.fold(
            &mut |node| match values.remove(&node) {
                Some(value) => Some(Ok(value)),
                None if node.children().is_none() => Some(Err(Error::Tensor(format!(
                    "no result for shard {} in this step",
                    node.lo
                )))),
                None => None,
            },
            &mut |left, right| {
                let mut sum = left?;
                let right = right?;
                sum.add_assign(&right);
                spent(right);
                Ok(sum)
            },
        )
    }

    /// Evaluates the whole tree (the step's sum) from the nodes received.
    pub fn evaluate_root<T: TreeSum>(&self, values: HashMap<Node, T>) -> Result<T> {
        self.evaluate_root_with(values, &mut drop)
    }

    /// [`Self::evaluate_root`], handing values added into others to `spent`.
    pub fn evaluate_root_with<T: TreeSum>(
        &self,
        mut values: HashMap<Node, T>,
        spent: &mut impl FnMut(T),
    ) -> Result<T> {
        let sum = self.evaluate_with(self.root(), &mut values, spent)?;
        if let Some(extra) = values.keys().next() {
            return Err(Error::Tensor(format!(
                "result for shards {}..{} overlaps another result",
                extra.lo, extra.hi
            )));
        }
        Ok(sum)
    }

    /// Sums leaf values (one per shard under `node`, in shard order) along the tree below `node`:
    /// what a process that computed every shard of a block itself sends.
    pub fn sum_leaves<T: TreeSum>(&self, node: Node, leaves: Vec<T>) -> T {
        assert_eq!(
            leaves.len(),
            node.len() as usize,
            "one leaf per shard of the node"
        );
        let mut leaves = leaves.into_iter();
        node.fold_leaves(
            &mut |_| leaves.next().expect("one leaf per shard"),
            &mut |mut sum, right| {
                sum.add_assign(&right);
                sum
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_sums_into_the_output_follow_the_tree() {
        // Magnitudes far apart, so a different order of additions would change bits.
        let value = |node: Node, j: usize| {
            let scale = [1e-3f32, 1.0, 1e4][node.lo as usize % 3];
            scale * (1.0 + (j % 97) as f32 * 0.013 + node.lo as f32 * 0.37)
        };
        let len = 20_000;
        let pool = Mutex::new(Vec::new());
        for shards in [1, 2, 5, 8] {
            let root = ReductionTree::new(shards).root();
            let mut out = vec![f32::NAN; len];
            root.par_sum_into(&mut out, &pool, &|node, buf: &mut [f32]| {
                for (j, v) in buf.iter_mut().enumerate() {
                    *v = value(node, j);
                }
            });
            let want = root.fold_leaves(
                &mut |node| (0..len).map(|j| value(node, j)).collect::<Vec<f32>>(),
                &mut |mut left, right| {
                    left.iter_mut().zip(&right).for_each(|(a, b)| *a += b);
                    left
                },
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&want), "{shards} shards");
            assert!(
                pool.lock().unwrap().len() < shards.max(2),
                "scratch returned"
            );
        }
    }
}
