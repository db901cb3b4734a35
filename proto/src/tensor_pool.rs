//! Buffers of f32 values kept for reuse, and lent to messages as their bytes without a copy.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::lock;

/// Buffers a pool keeps; any given back beyond them are freed. The coordinator's gradients take
/// one per worker's result of a step, and a worker lends one per node of its task: up to the 16
/// of the default shards either way.
pub const POOL_KEEPS: usize = 16;

/// Multi-megabyte buffers kept for reuse, sparing each use an allocation, its page faults and
/// its zeroing. A buffer is either taken and given back, or lent to a message as its [`Bytes`]
/// ([`Self::lend`]): the message then carries the values' own memory, and the buffer comes back
/// when the last clone of it is dropped (once sent). [`crate::tensor::encode_f32`] would copy each
/// 2.6 MB tensor of the default model into fresh bytes instead: a worker's gradient on the TCP
/// path, and the parameters the coordinator sends inline.
#[derive(Debug, Clone, Default)]
pub struct TensorPool(Arc<Mutex<Vec<Vec<f32>>>>);

impl TensorPool {
    /// A buffer given back earlier (its length and values are whatever its last user left), or
    /// an empty one.
    pub fn take(&self) -> Vec<f32> {
        lock(&self.0).pop().unwrap_or_default()
    }

    /// Keeps `values` for a later [`Self::take`] (frees it when the pool is full).
    pub fn give_back(&self, values: Vec<f32>) {
        give_back(&self.0, values);
    }

    /// How many buffers wait to be taken.
    pub fn len(&self) -> usize {
        lock(&self.0).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `values` as the little-endian bytes `encode_f32` makes, in their own memory; the buffer is
    /// given back when the last clone of the bytes is dropped (freed, if the pool is gone).
    pub fn lend(&self, values: Vec<f32>) -> Bytes {
        Bytes::from_owner(Lent {
            values,
            pool: Arc::downgrade(&self.0),
        })
    }
}

fn give_back(pool: &Mutex<Vec<Vec<f32>>>, values: Vec<f32>) {
    let mut pool = lock(pool);
    if pool.len() < POOL_KEEPS {
        pool.push(values);
    }
}

/// A lent buffer: the owner of the [`Bytes`] that [`TensorPool::lend`] makes.
struct Lent {
    values: Vec<f32>,
    pool: Weak<Mutex<Vec<Vec<f32>>>>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        // Little-endian only: `crate::tensor` refuses to compile elsewhere.
        bytemuck::cast_slice(&self.values)
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            give_back(&pool, std::mem::take(&mut self.values));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::encode_f32;

    /// Lent bytes are `encode_f32`'s, in the values' own memory, which comes back to the pool
    /// when the last clone is dropped; a full pool, or none, frees it instead.
    #[test]
    fn lent_tensors_are_encoded_without_a_copy_and_come_back() {
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).cos()).collect();
        let pool = TensorPool::default();
        assert!(pool.take().is_empty(), "a new pool has no buffers");
        let encoded = encode_f32(&values);
        let memory = values.as_ptr();
        let bytes = pool.lend(values);
        assert_eq!(bytes, encoded);
        assert_eq!(bytes.as_ptr(), memory.cast::<u8>(), "no copy");
        let clone = bytes.slice(4..);
        drop(bytes);
        assert!(pool.is_empty(), "a clone still holds the buffer");
        drop(clone);
        let back = pool.take();
        assert_eq!(
            (back.as_ptr(), back.len()),
            (memory, 1000),
            "the same buffer, as lent"
        );

        let lent: Vec<Bytes> = (0..POOL_KEEPS + 2)
            .map(|_| pool.lend(vec![1.0; 8]))
            .collect();
        drop(lent);
        assert_eq!(
            pool.len(),
            POOL_KEEPS,
            "a pool keeps at most {POOL_KEEPS} buffers"
        );
        pool.give_back(vec![3.0]);
        assert_eq!(pool.len(), POOL_KEEPS, "given back to a full pool: freed");
        assert_eq!(pool.take(), vec![1.0; 8]);
        pool.give_back(vec![3.0]);
        assert_eq!(pool.take(), vec![3.0], "the last given back is taken first");

        let orphan = pool.lend(vec![2.0; 8]);
        drop(pool);
        assert_eq!(orphan, encode_f32(&[2.0; 8]), "bytes outlive their pool");
    }
}
