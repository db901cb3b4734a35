//! The worker's copy of the shards it has been handed, and gathering a step's rows from them.

use std::collections::HashMap;

use ndarray::Array2;

use crate::error::{Error, Result};

/// One shard's examples: consecutive global ids starting at `first_example`.
#[derive(Debug, Clone)]
pub struct ShardData {
    pub first_example: u32,
    pub examples: u32,
    pub dim: usize,
    pub pixels: Vec<f32>,
}

/// Shards received from the coordinator, by shard id.
#[derive(Debug, Default)]
pub struct ShardCache {
    shards: HashMap<u32, ShardData>,
}

impl ShardCache {
    pub fn contains(&self, shard: u32) -> bool {
        self.shards.contains_key(&shard)
    }

    pub fn insert(&mut self, shard: u32, data: ShardData) {
        self.shards.insert(shard, data);
    }

    pub fn clear(&mut self) {
        self.shards.clear();
    }

    /// The rows of `examples` (global ids) from `shard`, as an `[n, dim]` array.
    pub fn gather(&self, shard: u32, examples: &[u32], dim: usize) -> Result<Array2<f32>> {
        let data = self.shards.get(&shard).ok_or_else(|| {
            Error::Protocol(format!("task uses shard {shard}, which was never received"))
        })?;
        if data.dim != dim {
            return Err(Error::Protocol(format!(
                "shard {shard} has {} values per example, the model expects {dim}",
                data.dim
            )));
        }
        let mut x = Array2::<f32>::zeros((examples.len(), dim));
        for (row, &id) in x.rows_mut().into_iter().zip(examples) {
            let local = id
                .checked_sub(data.first_example)
                .filter(|&l| l < data.examples)
                .ok_or_else(|| {
                    Error::Protocol(format!(
                        "example {id} is not in shard {shard} (examples {}..{})",
                        data.first_example,
                        data.first_example + data.examples
                    ))
                })? as usize;
            let src = &data.pixels[local * dim..(local + 1) * dim];
            row.into_slice()
                .expect("rows of a fresh array are contiguous")
                .copy_from_slice(src);
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_rows_by_global_id_and_rejects_foreign_ids() {
        let mut cache = ShardCache::default();
        cache.insert(
            3,
            ShardData {
                first_example: 10,
                examples: 3,
                dim: 2,
                pixels: vec![0.0, 0.1, 1.0, 1.1, 2.0, 2.1],
            },
        );
        let x = cache.gather(3, &[12, 10], 2).unwrap();
        assert_eq!(x.as_slice().unwrap(), &[2.0, 2.1, 0.0, 0.1]);
        assert!(cache.gather(3, &[13], 2).is_err());
        assert!(cache.gather(3, &[9], 2).is_err());
        assert!(cache.gather(4, &[10], 2).is_err());
        assert!(cache.gather(3, &[10], 3).is_err());
    }
}
