//! The bodies of the fuzz targets in `fuzz_targets/`, one function per target. Each runs one input
//! through a parser of untrusted bytes and checks what must hold whatever the bytes: no panic
//! (libFuzzer reports it), no allocation beyond libFuzzer's `-rss_limit_mb`/`-malloc_limit_mb`,
//! errors that name the file, and where there is a second way to compute the answer, the same
//! answer.
//!
//! These files are also compiled into the normal test suite (`#[path]` modules in
//! `common/tests/fuzz_corpora.rs`, `proto/tests/fuzz_corpora.rs`, `worker/tests/fuzz_corpora.rs`),
//! which replays `fuzz/corpus/<target>/` through the same functions on the stable toolchain.

pub mod files;
pub mod shards;
pub mod wire;
