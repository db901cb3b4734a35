//! Which live worker owns which shards.

use std::collections::BTreeMap;

use crate::state::WorkerId;

/// Cuts shards `0..shards` into contiguous, near-equal blocks, one per worker in id order.
/// Contiguous blocks keep a worker's shards under few tree nodes, so it sends few partial sums.
pub fn contiguous_blocks(shards: usize, workers: &[WorkerId]) -> BTreeMap<WorkerId, Vec<u32>> {
    let n = workers.len();
    workers
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let start = i * shards / n;
            let end = (i + 1) * shards / n;
            (w, (start as u32..end as u32).collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_every_shard_once_and_differ_by_at_most_one() {
        let workers: Vec<WorkerId> = (1..=3).map(WorkerId).collect();
        let blocks = contiguous_blocks(16, &workers);
        let sizes: Vec<usize> = blocks.values().map(Vec::len).collect();
        assert_eq!(sizes, [5, 5, 6]);
        let all: Vec<u32> = blocks.values().flatten().copied().collect();
        assert_eq!(all, (0..16).collect::<Vec<u32>>());
    }

    #[test]
    fn more_workers_than_shards_leaves_some_idle() {
        let workers: Vec<WorkerId> = (1..=4).map(WorkerId).collect();
        let blocks = contiguous_blocks(2, &workers);
        let total: usize = blocks.values().map(Vec::len).sum();
        assert_eq!(total, 2);
    }
}
