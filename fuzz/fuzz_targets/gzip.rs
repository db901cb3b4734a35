//! Fuzz target `gzip`: see `vae_fuzz::files::gzip` (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vae_fuzz::files::gzip(data));
