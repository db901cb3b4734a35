//! Fuzz target `npy`: see `vae_fuzz::files::npy` (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vae_fuzz::files::npy(data));
