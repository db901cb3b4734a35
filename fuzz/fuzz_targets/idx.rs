//! Fuzz target `idx`: see `vae_fuzz::files::idx` (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vae_fuzz::files::idx(data));
