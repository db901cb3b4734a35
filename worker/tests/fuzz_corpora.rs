//! The fuzz corpus of the worker's shard assembly (`fuzz/corpus/shard_chunks`), replayed on the
//! stable toolchain through the function the fuzz target calls (`fuzz/src/shards.rs`), in a child
//! process whose peak memory is bounded; and the assembler's rules as plain tests.
//!
//! `cargo test -p worker --test fuzz_corpora -- --ignored write_seed_corpus` rewrites the
//! hand-made seeds (`seed-*` files).

#[path = "../../common/tests/support/peak_memory.rs"]
mod peak_memory;
#[path = "../../fuzz/src/shards.rs"]
mod shards;

use proto::messages::{ShardChunk, ShardPixels};
use proto::pb;
use worker::shard_cache::ShardAssembler;

/// Peak resident memory the corpus may add (its largest input is 64 KiB).
const RSS_MIB: u64 = 64;
/// Peak address space it may add (catches allocations sized by a field, even untouched).
const VIRTUAL_MIB: u64 = 256;

#[test]
fn replay_shard_chunks_corpus() {
    peak_memory::replay_corpus(
        "replay_shard_chunks_corpus",
        "shard_chunks",
        shards::shard_chunks,
        RSS_MIB,
        VIRTUAL_MIB,
    );
}

fn chunk(shard: u32, first_example: u32, examples: u32, dim: u32) -> pb::ShardChunk {
    let values = (examples * dim) as usize;
    ShardChunk {
        shard,
        first_example,
        examples,
        dim,
        pixels: ShardPixels::Inline((0..values).map(|i| i as f32).collect()),
    }
    .into()
}

fn error(chunks: Vec<pb::ShardChunk>) -> String {
    let mut assembler = ShardAssembler::new(1);
    for c in chunks {
        if let Err(e) = assembler.push(c) {
            return e.to_string();
        }
    }
    match assembler.finish() {
        Ok(data) => panic!("assembled {} examples", data.examples),
        Err(e) => e.to_string(),
    }
}

#[test]
fn assembles_consecutive_chunks() {
    let mut assembler = ShardAssembler::new(1);
    assembler.push(chunk(1, 10, 2, 3)).unwrap();
    assembler.push(chunk(1, 12, 1, 3)).unwrap();
    let data = assembler.finish().unwrap();
    assert_eq!((data.first_example, data.examples, data.dim), (10, 3, 3));
    assert_eq!(*data.pixels, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 1.0, 2.0]);
}

#[test]
fn refuses_chunks_that_do_not_fit_together() {
    assert!(error(vec![]).contains("arrived empty"));
    assert!(error(vec![chunk(2, 0, 1, 1)]).contains("received a chunk of shard 2"));
    let e = error(vec![chunk(1, 0, 2, 3), chunk(1, 3, 1, 3)]);
    assert!(
        e.contains("out of order") && e.contains("expected examples from 2"),
        "{e}"
    );
    assert!(error(vec![chunk(1, 0, 2, 3), chunk(1, 2, 1, 4)]).contains("mixed sizes"));
    assert!(error(vec![chunk(1, 0, 0, 3)]).contains("never empty"));
    assert!(error(vec![chunk(1, 0, 3, 0)]).contains("never empty"));
    // Example ids past u32::MAX.
    let e = error(vec![chunk(1, u32::MAX, 2, 1)]);
    assert!(e.contains("largest example id"), "{e}");
    let e = error(vec![chunk(1, u32::MAX - 1, 1, 1), chunk(1, u32::MAX, 2, 1)]);
    assert!(e.contains("largest example id"), "{e}");
    // The last id itself is fine.
    let mut assembler = ShardAssembler::new(1);
    assembler.push(chunk(1, u32::MAX, 1, 1)).unwrap();
    assert_eq!(assembler.finish().unwrap().examples, 1);
    // Pixels that do not match the counts (the conversion refuses them).
    let mut wrong = chunk(1, 0, 2, 2);
    wrong.pixels = vec![0u8; 12].into();
    assert!(error(vec![wrong]).contains("12 bytes of pixels"));
}

#[test]
#[ignore = "writes fuzz/corpus/shard_chunks/seed-*; run by hand when the format changes"]
fn write_seed_corpus() {
    let dir = peak_memory::corpus_dir("shard_chunks");
    std::fs::create_dir_all(&dir).unwrap();
    let pixels = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| (i as f32 / 8.0).to_le_bytes())
            .collect()
    };
    // Shard 1: two chunks of 2 x 3 and 1 x 3 starting at example 4 (flags 2: first_example given).
    let mut two_chunks = vec![1u8];
    two_chunks.push(2);
    two_chunks.extend(4u32.to_le_bytes());
    two_chunks.extend([2, 3]);
    two_chunks.extend(pixels(6));
    two_chunks.push(0);
    two_chunks.extend([1, 3]);
    two_chunks.extend(pixels(3));
    // Shard 0: one chunk of 1 example of 5 values, every field given (flags 1|2|4|8|16).
    let mut explicit = vec![0u8, 31];
    for v in [0u32, 100, 1, 5] {
        explicit.extend(v.to_le_bytes());
    }
    explicit.extend(20u16.to_le_bytes());
    explicit.extend(pixels(5));
    for (name, bytes) in [("two-chunks", two_chunks), ("explicit", explicit)] {
        shards::shard_chunks(&bytes);
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}
