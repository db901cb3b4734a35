//! Fuzz target `model_file`: see `vae_fuzz::files::model_file` (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vae_fuzz::files::model_file(data));
