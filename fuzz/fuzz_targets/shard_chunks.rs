//! Fuzz target `shard_chunks`: see `vae_fuzz::shards::shard_chunks` (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vae_fuzz::shards::shard_chunks(data));
