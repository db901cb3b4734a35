//! The fixed reduction order: a balanced binary tree over shard ids.
//!
//! The step gradient is the sum of the `S` shard gradients evaluated as one fixed tree: node
//! `[lo, hi)` is the sum of its children `[lo, mid)` and `[mid, hi)`, `mid = lo + (hi - lo) / 2`.
//! Floating-point addition is not associative, so this tree *is* the contract (DESIGN.md §2). A
//! process that owns every shard under a node may send that node's sum; the receiver evaluates the
//! rest of the tree from whatever nodes it holds and gets the same bits as a single process.

use std::collections::HashMap;

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

    /// The fewest tree nodes that together hold exactly `owned` (shard ids, any order): what a
    /// process owning those shards sends. Nodes come back in ascending order.
    pub fn cover(&self, owned: &[u32]) -> Vec<Node> {
        let mut mask = vec![false; self.shards as usize];
        for &s in owned {
            if let Some(m) = mask.get_mut(s as usize) {
                *m = true;
            }
        }
        let mut nodes = Vec::new();
        self.cover_into(self.root(), &mask, &mut nodes);
        nodes
    }

    fn cover_into(&self, node: Node, mask: &[bool], out: &mut Vec<Node>) {
        let owned = mask[node.lo as usize..node.hi as usize].iter();
        if owned.clone().all(|&m| m) {
            out.push(node);
        } else if owned.clone().any(|&m| m)
            && let Some((left, right)) = node.children()
        {
            self.cover_into(left, mask, out);
            self.cover_into(right, mask, out);
        }
    }

    /// Evaluates the tree at `node` from a set of computed nodes. Every shard under `node` must be
    /// covered by exactly the nodes given; consumes the values it uses.
    pub fn evaluate<T: TreeSum>(&self, node: Node, values: &mut HashMap<Node, T>) -> Result<T> {
        if let Some(value) = values.remove(&node) {
            return Ok(value);
        }
        let Some((left, right)) = node.children() else {
            return Err(Error::Tensor(format!(
                "no result for shard {} in this step",
                node.lo
            )));
        };
        let mut sum = self.evaluate(left, values)?;
        let right = self.evaluate(right, values)?;
        sum.add_assign(&right);
        Ok(sum)
    }

    /// Evaluates the whole tree (the step's sum) from the nodes received.
    pub fn evaluate_root<T: TreeSum>(&self, mut values: HashMap<Node, T>) -> Result<T> {
        let sum = self.evaluate(self.root(), &mut values)?;
        if let Some(extra) = values.keys().next() {
            return Err(Error::Tensor(format!(
                "result for shards {}..{} overlaps another result",
                extra.lo, extra.hi
            )));
        }
        Ok(sum)
    }

    /// Sums leaf values (one per shard under `node`, in shard order) along the tree below `node`.
    /// Used by a process that computed every shard of a block itself.
    pub fn sum_leaves<T: TreeSum>(&self, node: Node, leaves: Vec<T>) -> T {
        assert_eq!(
            leaves.len(),
            node.len() as usize,
            "one leaf per shard of the node"
        );
        let mut values: HashMap<Node, T> = leaves
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let s = node.lo + i as u32;
                (Node { lo: s, hi: s + 1 }, v)
            })
            .collect();
        self.evaluate(node, &mut values)
            .expect("every leaf under the node is present")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sum that records its shape, so the tests can see the order of additions.
    #[derive(Debug, Clone, PartialEq)]
    struct Expr(String);

    impl TreeSum for Expr {
        fn add_assign(&mut self, other: &Self) {
            self.0 = format!("({}+{})", self.0, other.0);
        }
    }

    fn leaf(s: u32) -> (Node, Expr) {
        (Node { lo: s, hi: s + 1 }, Expr(s.to_string()))
    }

    #[test]
    fn the_tree_is_balanced() {
        let tree = ReductionTree::new(4);
        let sum = tree.evaluate_root((0..4).map(leaf).collect()).unwrap();
        assert_eq!(sum.0, "((0+1)+(2+3))");
        let tree = ReductionTree::new(5);
        let sum = tree.evaluate_root((0..5).map(leaf).collect()).unwrap();
        assert_eq!(sum.0, "((0+1)+(2+(3+4)))");
    }

    #[test]
    fn partial_sums_from_covers_give_the_same_expression() {
        let tree = ReductionTree::new(16);
        let whole = tree.evaluate_root((0..16).map(leaf).collect()).unwrap();
        // Three owners with uneven, non-aligned blocks.
        let owners: [Vec<u32>; 3] = [(0..6).collect(), (6..11).collect(), (11..16).collect()];
        let mut values = HashMap::new();
        for owned in &owners {
            for node in tree.cover(owned) {
                let leaves = (node.lo..node.hi).map(|s| leaf(s).1).collect();
                values.insert(node, tree.sum_leaves(node, leaves));
            }
        }
        assert_eq!(tree.evaluate_root(values).unwrap(), whole);
    }

    #[test]
    fn covers_are_minimal_tree_nodes() {
        let tree = ReductionTree::new(16);
        assert_eq!(tree.cover(&(0..16).collect::<Vec<_>>()), vec![tree.root()]);
        assert_eq!(tree.cover(&[4, 5, 6, 7]), vec![Node { lo: 4, hi: 8 }]);
        assert_eq!(
            tree.cover(&[6, 7, 8, 9, 10]),
            vec![
                Node { lo: 6, hi: 8 },
                Node { lo: 8, hi: 10 },
                Node { lo: 10, hi: 11 }
            ]
        );
        assert!(tree.contains(Node { lo: 8, hi: 12 }));
        assert!(!tree.contains(Node { lo: 6, hi: 10 }));
    }

    #[test]
    fn missing_or_overlapping_results_are_errors() {
        let tree = ReductionTree::new(4);
        let mut partial: HashMap<_, _> = (0..3).map(leaf).collect();
        assert!(tree.evaluate_root(partial.clone()).is_err());
        partial.insert(Node { lo: 3, hi: 4 }, Expr("3".into()));
        partial.insert(Node { lo: 0, hi: 2 }, Expr("01".into()));
        assert!(tree.evaluate_root(partial).is_err());
    }
}
