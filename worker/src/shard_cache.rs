//! The worker's copy of the shards it has been handed, gathering a step's rows from them, and
//! assembling a shard from the chunks `FetchShard` streams ([`ShardAssembler`], a pure function
//! of the chunks so it can be fuzzed: `fuzz/fuzz_targets/shard_chunks.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use ndarray::Array2;
use proto::messages::{ShardChunk, ShardPixels, ShardWork};
use proto::pb;
use proto::shared_memory::{ShardFile, SharedClient};

use crate::error::{Error, Result};

/// One shard's examples: consecutive global ids starting at `first_example`.
#[derive(Debug)]
pub struct ShardData {
    pub first_example: u32,
    pub examples: u32,
    pub dim: usize,
    pub pixels: Pixels,
}

/// A shard's values: received in chunks, or mapped from its file in shared memory.
#[derive(Debug)]
pub enum Pixels {
    Received(Vec<f32>),
    Mapped(ShardFile),
}

impl std::ops::Deref for Pixels {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Pixels::Received(values) => values,
            Pixels::Mapped(file) => file.values(),
        }
    }
}

/// Builds one shard's [`ShardData`] from the chunks the coordinator streams, checking each as it
/// arrives: it decodes, belongs to the shard asked for, has examples of a positive size, follows
/// the previous chunk (consecutive example ids, the same size) and keeps ids within `u32`. The
/// pixels kept are only those received, so memory is bounded by the bytes that arrived.
#[derive(Debug)]
pub struct ShardAssembler {
    shard: u32,
    data: Option<ShardData>,
    /// Where chunks that point at a shard file are read; `None`: such a chunk is an error.
    shared: Option<Arc<SharedClient>>,
}

impl ShardAssembler {
    /// Starts assembling `shard`.
    pub fn new(shard: u32) -> Self {
        ShardAssembler {
            shard,
            data: None,
            shared: None,
        }
    }

    /// Also accepts chunks that point at the shard's file in `shared` (this worker is attached).
    pub fn reading_shared_files(self, shared: Option<Arc<SharedClient>>) -> Self {
        ShardAssembler { shared, ..self }
    }

    /// Adds the next chunk off the wire.
    pub fn push(&mut self, chunk: pb::ShardChunk) -> Result<()> {
        let shard = self.shard;
        let invalid = |msg: String| Error::Protocol(format!("shard {shard}: {msg}"));
        let chunk = ShardChunk::try_from(chunk).map_err(|e| invalid(e.to_string()))?;
        if chunk.shard != shard {
            return Err(Error::Protocol(format!(
                "asked for shard {shard}, received a chunk of shard {}",
                chunk.shard
            )));
        }
        if chunk.examples == 0 || chunk.dim == 0 {
            return Err(invalid(format!(
                "a chunk of {} examples of {} values: chunks are never empty",
                chunk.examples, chunk.dim
            )));
        }
        let pixels = match chunk.pixels {
            ShardPixels::Inline(values) => Pixels::Received(values),
            ShardPixels::SharedFile { .. } if self.data.is_some() => {
                return Err(invalid(
                    "a chunk that points at the shard's file must be its only chunk".into(),
                ));
            }
            ShardPixels::SharedFile { offset } => {
                let Some(files) = &self.shared else {
                    return Err(invalid(
                        "a chunk points at a shared-memory file, but this worker is not \
                         attached to shared memory"
                            .into(),
                    ));
                };
                let len = u64::from(chunk.examples) * u64::from(chunk.dim);
                let file = files
                    .map_shard(shard, offset, len)
                    .map_err(|e| invalid(format!("cannot map its shared-memory file: {e}")))?;
                Pixels::Mapped(file)
            }
        };
        let end = u64::from(chunk.first_example) + u64::from(chunk.examples);
        if end > u64::from(u32::MAX) + 1 {
            return Err(invalid(format!(
                "a chunk of {} examples from id {} runs past the largest example id",
                chunk.examples, chunk.first_example
            )));
        }
        match &mut self.data {
            None => {
                self.data = Some(ShardData {
                    first_example: chunk.first_example,
                    examples: chunk.examples,
                    dim: chunk.dim as usize,
                    pixels,
                });
            }
            Some(d) => {
                let next = u64::from(d.first_example) + u64::from(d.examples);
                if u64::from(chunk.first_example) != next || chunk.dim as usize != d.dim {
                    return Err(invalid(format!(
                        "chunks out of order or of mixed sizes: expected examples from {next} of \
                         {} values, received {} from {} of {} values",
                        d.dim, chunk.examples, chunk.first_example, chunk.dim
                    )));
                }
                let Pixels::Received(values) = &mut d.pixels else {
                    return Err(invalid(
                        "a chunk after the one that points at the shard's file".into(),
                    ));
                };
                values.extend_from_slice(&pixels);
                // `end` fits in u32 + 1 and starts at d.first_example: the count fits in u32.
                d.examples += chunk.examples;
            }
        }
        Ok(())
    }

    /// The assembled shard; an error if no chunk arrived.
    pub fn finish(self) -> Result<ShardData> {
        self.data
            .ok_or_else(|| Error::Protocol(format!("shard {} arrived empty", self.shard)))
    }
}

/// Shards received from the coordinator, by shard id, and rows gathered from them ahead of the
/// task that uses them.
#[derive(Debug, Default)]
pub struct ShardCache {
    shards: HashMap<u32, ShardData>,
    /// Per shard, the examples of a step gathered early (the coordinator's hint of the next
    /// step's examples) and their rows: copies of this cache's data, so they go with it.
    ahead: HashMap<u32, (Vec<u32>, Array2<f32>)>,
}

impl ShardCache {
    pub fn contains(&self, shard: u32) -> bool {
        self.shards.contains_key(&shard)
    }

    pub fn insert(&mut self, shard: u32, data: ShardData) {
        self.ahead.remove(&shard);
        self.shards.insert(shard, data);
    }

    pub fn clear(&mut self) {
        self.shards.clear();
        self.ahead.clear();
    }

    /// Gathers the rows of `hint` now, while the coordinator handles the last result, so the
    /// next task finds them ready: the random reads of a step's rows across the dataset cost
    /// 0.1-0.5 ms on our machines (docs/scaling.md §31). Replaces the rows gathered ahead for
    /// the same shards (one set per shard: never more rows than one step takes of every shard).
    /// A hint naming a shard not held here or examples outside it is only a hint: skipped.
    pub fn gather_ahead(&mut self, hint: &[ShardWork], dim: usize) {
        for work in hint {
            match self.gather(work.shard, &work.examples, dim) {
                Ok(x) => {
                    self.ahead.insert(work.shard, (work.examples.clone(), x));
                }
                Err(e) => {
                    self.ahead.remove(&work.shard);
                    tracing::debug!("next-step hint not gathered: {e}");
                }
            }
        }
    }

    /// The rows of `examples` from `shard` if they were gathered ahead; they are handed over
    /// once, and rows gathered for other examples of the shard are dropped.
    pub fn take_gathered(&mut self, shard: u32, examples: &[u32]) -> Option<Array2<f32>> {
        match self.ahead.remove(&shard) {
            Some((ids, x)) if ids == examples => Some(x),
            _ => None,
        }
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
            let not_here = || {
                Error::Protocol(format!(
                    "example {id} is not in shard {shard} (examples {}..{})",
                    data.first_example,
                    u64::from(data.first_example) + u64::from(data.examples)
                ))
            };
            let local = id
                .checked_sub(data.first_example)
                .filter(|&l| l < data.examples)
                .ok_or_else(not_here)? as usize;
            let src = local
                .checked_mul(dim)
                .and_then(|start| data.pixels.get(start..start.checked_add(dim)?))
                .ok_or_else(not_here)?;
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
                pixels: Pixels::Received(vec![0.0, 0.1, 1.0, 1.1, 2.0, 2.1]),
            },
        );
        let x = cache.gather(3, &[12, 10], 2).unwrap();
        assert_eq!(x.as_slice().unwrap(), &[2.0, 2.1, 0.0, 0.1]);
        assert!(cache.gather(3, &[13], 2).is_err());
        assert!(cache.gather(3, &[9], 2).is_err());
        assert!(cache.gather(4, &[10], 2).is_err());
        assert!(cache.gather(3, &[10], 3).is_err());
    }

    #[test]
    fn rows_gathered_ahead_are_handed_over_once_and_only_for_the_same_examples() {
        let shard = |first_example| ShardData {
            first_example,
            examples: 3,
            dim: 2,
            pixels: Pixels::Received(vec![0.0, 0.1, 1.0, 1.1, 2.0, 2.1]),
        };
        let work = |shard, examples: &[u32]| ShardWork {
            shard,
            examples: examples.to_vec(),
        };
        let mut cache = ShardCache::default();
        cache.insert(3, shard(10));
        cache.insert(4, shard(20));
        // Shard 5 is not held and 4's ids are outside it: both skipped, 3's gathered.
        cache.gather_ahead(&[work(3, &[12, 10]), work(4, &[10]), work(5, &[0])], 2);
        assert_eq!(cache.take_gathered(4, &[10]), None);
        assert_eq!(cache.take_gathered(5, &[0]), None);
        let x = cache.take_gathered(3, &[12, 10]).unwrap();
        assert_eq!(x, cache.gather(3, &[12, 10], 2).unwrap());
        assert_eq!(cache.take_gathered(3, &[12, 10]), None, "handed over once");
        // Other examples, or the same shard received again, or the cache cleared: gone.
        cache.gather_ahead(&[work(3, &[11])], 2);
        assert_eq!(cache.take_gathered(3, &[10]), None);
        cache.gather_ahead(&[work(3, &[11])], 2);
        cache.insert(3, shard(10));
        assert_eq!(cache.take_gathered(3, &[11]), None);
        cache.gather_ahead(&[work(3, &[11])], 2);
        cache.clear();
        assert_eq!(cache.take_gathered(3, &[11]), None);
        // A new hint replaces the rows of the last one for the same shard, and keeps the
        // others' (a backup task's hint does not drop the main task's).
        cache.insert(3, shard(10));
        cache.insert(4, shard(20));
        cache.gather_ahead(&[work(3, &[11]), work(4, &[21])], 2);
        cache.gather_ahead(&[work(3, &[12])], 2);
        assert_eq!(cache.take_gathered(3, &[11]), None);
        cache.gather_ahead(&[work(3, &[12])], 2);
        assert!(cache.take_gathered(3, &[12]).is_some());
        assert!(cache.take_gathered(4, &[21]).is_some());
        // A hint that cannot be gathered drops what the shard had.
        cache.gather_ahead(&[work(3, &[11])], 2);
        cache.gather_ahead(&[work(3, &[99])], 2);
        assert_eq!(cache.take_gathered(3, &[11]), None);
    }

    #[test]
    fn a_shard_file_is_mapped_and_gathered_and_bad_file_chunks_are_refused() {
        use proto::shared_memory::SharedDir;
        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "w", b"p").unwrap();
        let (client, _) = SharedClient::open(&dir.offer(), 1).unwrap();
        let client = Some(Arc::new(client));
        let values = vec![0.0, 0.1, 1.0, 1.1, 2.0, 2.1];
        dir.write_shard(3, &values).unwrap();
        let file_chunk = |shard, offset, examples| {
            pb::ShardChunk::from(ShardChunk {
                shard,
                first_example: 10,
                examples,
                dim: 2,
                pixels: ShardPixels::SharedFile { offset },
            })
        };
        let inline_chunk = |first_example| {
            pb::ShardChunk::from(ShardChunk {
                shard: 3,
                first_example,
                examples: 3,
                dim: 2,
                pixels: ShardPixels::Inline(values.clone()),
            })
        };
        let assemble = |chunks: Vec<pb::ShardChunk>| {
            let mut shard = ShardAssembler::new(3).reading_shared_files(client.clone());
            for chunk in chunks {
                shard.push(chunk)?;
            }
            shard.finish()
        };

        let data = assemble(vec![file_chunk(3, 0, 3)]).unwrap();
        assert!(matches!(data.pixels, Pixels::Mapped(_)));
        let mut cache = ShardCache::default();
        cache.insert(3, data);
        let x = cache.gather(3, &[12, 10], 2).unwrap();
        assert_eq!(x.as_slice().unwrap(), &[2.0, 2.1, 0.0, 0.1]);

        let refused = |chunks, what: &str| {
            let err = assemble(chunks).unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        };
        refused(vec![file_chunk(3, 0, 4)], "outside the file");
        refused(vec![file_chunk(3, 8, 3)], "outside the file");
        refused(vec![file_chunk(4, 0, 1)], "received a chunk of shard 4");
        refused(
            vec![file_chunk(3, 0, 3), inline_chunk(13)],
            "after the one that points at the shard's file",
        );
        refused(
            vec![inline_chunk(10), file_chunk(3, 0, 3)],
            "must be its only chunk",
        );
        // Without shared memory a file chunk is refused; a missing file is an error too.
        let err = ShardAssembler::new(3)
            .push(file_chunk(3, 0, 3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not attached to shared memory"), "{err}");
        let err = ShardAssembler::new(5)
            .reading_shared_files(client.clone())
            .push(file_chunk(5, 0, 3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot map its shared-memory file"), "{err}");
    }
}
