//! Fuzz target `proto_messages`: see `vae_fuzz::wire::proto_messages` (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vae_fuzz::wire::proto_messages(data));
