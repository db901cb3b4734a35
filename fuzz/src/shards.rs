//! Fuzz target over the worker's assembly of a shard from the `ShardChunk` messages `FetchShard`
//! streams (`worker::shard_cache::ShardAssembler`, used by `worker/src/client.rs`), and the rows
//! later gathered from it. Compiled into the fuzz crate and, through a `#[path]` module, into
//! `worker/tests/fuzz_corpora.rs`.

use proto::pb;
use worker::shard_cache::{ShardAssembler, ShardCache};

/// Reads the fuzz input as a little-endian stream of fields.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        let (b, rest) = self.0.split_first_chunk::<2>()?;
        self.0 = rest;
        Some(u16::from_le_bytes(*b))
    }

    fn u32(&mut self) -> Option<u32> {
        let (b, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*b))
    }

    /// `n` bytes: as many as remain, then zeros.
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let take = n.min(self.0.len());
        let mut out = self.0[..take].to_vec();
        self.0 = &self.0[take..];
        out.resize(n, 0);
        out
    }
}

/// The most pixel bytes one chunk of the target carries.
const MAX_CHUNK_BYTES: u64 = 1 << 16;

/// `shard_chunks`: the first byte picks the shard asked for (0..4); then one record per chunk:
/// a flags byte, then the fields the flags ask for.
///
/// | flag | field                                                                        |
/// |------|------------------------------------------------------------------------------|
/// | 1    | `shard` (u32; otherwise the shard asked for)                                 |
/// | 2    | `first_example` (u32; otherwise the id after the previous chunk's last)      |
/// | 4    | `examples` as u32 (otherwise a u8)                                           |
/// | 8    | `dim` as u32 (otherwise a u8)                                                |
/// | 16   | the pixel byte count as u16 (otherwise the right one, when at most 64 KiB)   |
///
/// then the pixel bytes (from the input, zeros once it runs out). Chunks are pushed as the worker
/// pushes them, stopping at the first error; an assembled shard must hold exactly its examples'
/// pixels, and gathering any of its examples must give their rows, any other id an error.
pub fn shard_chunks(data: &[u8]) {
    let mut input = Cursor(data);
    let Some(asked) = input.u8() else {
        return;
    };
    let asked = u32::from(asked % 4);
    let mut assembler = ShardAssembler::new(asked);
    let mut next_first = 0u32;
    while let Some(flags) = input.u8() {
        let field = |input: &mut Cursor<'_>, flag: u8| -> Option<u32> {
            if flags & flag != 0 {
                input.u32()
            } else {
                input.u8().map(u32::from)
            }
        };
        let shard = if flags & 1 != 0 {
            input.u32()
        } else {
            Some(asked)
        };
        let first_example = if flags & 2 != 0 {
            input.u32()
        } else {
            Some(next_first)
        };
        let examples = field(&mut input, 4);
        let dim = field(&mut input, 8);
        let (Some(shard), Some(first_example), Some(examples), Some(dim)) =
            (shard, first_example, examples, dim)
        else {
            break;
        };
        let right = (u64::from(examples) * u64::from(dim)).saturating_mul(4);
        let pixel_bytes = if flags & 16 != 0 {
            input.u16().map(usize::from)
        } else {
            Some(right.min(MAX_CHUNK_BYTES) as usize)
        };
        let Some(pixel_bytes) = pixel_bytes else {
            break;
        };
        let chunk = pb::ShardChunk {
            shard,
            first_example,
            examples,
            dim,
            pixels: input.bytes(pixel_bytes).into(),
            // A chunk pointing at a shard file: this assembler has no shared memory, so it must
            // refuse it (with an error, as any bad chunk).
            shared: (flags & 32 != 0).then(|| pb::SharedRegion {
                offset: 0,
                len: u64::from(examples) * u64::from(dim),
            }),
        };
        if assembler.push(chunk).is_err() {
            // The worker drops the shard at the first bad chunk.
            return;
        }
        next_first = first_example.wrapping_add(examples);
    }
    let Ok(shard) = assembler.finish() else {
        return;
    };
    assert_eq!(
        shard.pixels.len() as u64,
        u64::from(shard.examples) * shard.dim as u64
    );
    let (first, n, dim) = (shard.first_example, shard.examples, shard.dim);
    let pixels = shard.pixels.to_vec();
    let mut cache = ShardCache::default();
    cache.insert(asked, shard);
    let ids: Vec<u32> = (0..n.min(64)).map(|i| first + i).collect();
    let rows = cache
        .gather(asked, &ids, dim)
        .expect("ids of the shard gather");
    for (row, &id) in rows.rows().into_iter().zip(&ids) {
        let local = (id - first) as usize;
        let want = &pixels[local * dim..(local + 1) * dim];
        assert!(
            row.iter()
                .map(|x| x.to_bits())
                .eq(want.iter().map(|x| x.to_bits()))
        );
    }
    if let Some(before) = first.checked_sub(1) {
        assert!(cache.gather(asked, &[before], dim).is_err());
    }
    if let Some(after) = first.checked_add(n) {
        assert!(cache.gather(asked, &[after], dim).is_err());
    }
    assert!(cache.gather(asked, &ids, dim + 1).is_err());
    assert!(cache.gather(asked + 1, &ids, dim).is_err());
}
