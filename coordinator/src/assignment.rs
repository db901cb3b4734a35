//! Which live worker owns which shards.

use std::collections::BTreeMap;

use common::train::{Node, ReductionTree};

use crate::state::WorkerId;

/// Gives each worker one whole node of the reduction tree, splitting the tree between the
/// workers in proportion to the shards under each child. Every worker then sends exactly one
/// partial sum per step: messages, not arithmetic, dominate a step (each is a full gradient), so
/// one message per worker is worth the imbalance this allows (at most 2:1, e.g. 8/4/4 shards
/// for 3 workers over 16; none when the worker count is a power of two dividing the shards).
pub fn tree_blocks(tree: &ReductionTree, workers: &[WorkerId]) -> BTreeMap<WorkerId, Node> {
    let mut out = BTreeMap::new();
    split(tree.root(), workers, &mut out);
    out
}

fn split(node: Node, workers: &[WorkerId], out: &mut BTreeMap<WorkerId, Node>) {
    let Some((&first, _)) = workers.split_first() else {
        return;
    };
    let Some((left, right)) = node.children().filter(|_| workers.len() > 1) else {
        out.insert(first, node);
        return;
    };
    let k = workers.len() as u32;
    let on_left = ((k * left.len() + node.len() / 2) / node.len()).clamp(1, k - 1) as usize;
    split(left, &workers[..on_left], out);
    split(right, &workers[on_left..], out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(shards: usize, workers: u64) -> Vec<u32> {
        let ids: Vec<WorkerId> = (1..=workers).map(WorkerId).collect();
        let tree = ReductionTree::new(shards);
        let blocks = tree_blocks(&tree, &ids);
        // Nodes are disjoint, in worker order, and cover every shard exactly once.
        let mut next = 0;
        for node in blocks.values() {
            assert!(tree.contains(*node));
            assert_eq!(node.lo, next);
            next = node.hi;
        }
        assert_eq!(next as usize, shards);
        blocks.values().map(Node::len).collect()
    }

    #[test]
    fn each_worker_gets_one_tree_node_in_proportion() {
        assert_eq!(sizes(16, 1), [16]);
        assert_eq!(sizes(16, 2), [8, 8]);
        assert_eq!(sizes(16, 3), [4, 4, 8]);
        assert_eq!(sizes(16, 4), [4, 4, 4, 4]);
        assert_eq!(sizes(16, 5), [2, 2, 4, 4, 4]);
        assert_eq!(sizes(5, 2), [2, 3]);
    }

    #[test]
    fn more_workers_than_shards_leaves_some_idle() {
        let ids: Vec<WorkerId> = (1..=4).map(WorkerId).collect();
        let blocks = tree_blocks(&ReductionTree::new(2), &ids);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks.values().map(Node::len).sum::<u32>(), 2);
    }
}
