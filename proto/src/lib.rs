//! The gRPC service between coordinator and workers (`proto/trainer.proto`), generated at build
//! time without `protoc`, and the protocol constants both sides must agree on.

#![allow(missing_debug_implementations, clippy::all)]

tonic::include_proto!("vae.trainer.v1");

pub mod tensor;

/// Bumped on any incompatible change to `trainer.proto` or to what its fields mean.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest gRPC message either side accepts. tonic's default is 4 MiB; the default model's
/// parameters are 2.6 MB and a `--hidden 2048,2048` model is ~60 MB, so parameters and gradients
/// go in one message with this raised limit, while shard data is streamed in chunks of
/// [`SHARD_CHUNK_BYTES`]. 1 GiB bounds memory per message on a 24 GiB machine.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// Target size of one `ShardChunk`'s pixels.
pub const SHARD_CHUNK_BYTES: usize = 4 << 20;

/// HTTP/2 flow-control windows. The default 64 KiB window makes a 2.6 MB parameter or gradient
/// message wait for ~40 window updates, a round trip each; a window larger than one message lets
/// it stream at once.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;

/// Largest HTTP/2 frame either side accepts (the protocol's default is 16 KiB): fewer, larger
/// frames for multi-megabyte tensors.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;
