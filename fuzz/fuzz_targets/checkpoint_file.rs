//! Fuzz target `checkpoint_file`: see `vae_fuzz::files::checkpoint_file` (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vae_fuzz::files::checkpoint_file(data));
