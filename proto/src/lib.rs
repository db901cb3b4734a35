//! The wire boundary between coordinator and workers: the gRPC service (`proto/trainer.proto`,
//! generated at build time without `protoc`) in [`pb`], the domain type of every message in
//! [`messages`], and all conversion between the two in [`convert`]. Nothing outside this crate
//! reads a prost message field by field; handlers are decode, one call, encode.
//!
//! Tensors cross either inline ([`tensor`]: raw little-endian f32 at memcpy speed, sent from
//! buffers lent by a [`tensor_pool`] without a copy) or, between processes on one host, through a
//! shared-memory directory ([`shared_memory`]).
//!
//! ```
//! use proto::messages::{ShardWork, NodeWork};
//! use common::train::Node;
//! let work = NodeWork { node: Node { lo: 0, hi: 1 }, shards: vec![ShardWork { shard: 0, examples: vec![3, 1] }] };
//! let wire = proto::pb::NodeWork::from(work.clone());
//! assert_eq!(NodeWork::try_from(wire).unwrap(), work);
//! ```

/// The generated prost messages and tonic client/server.
#[allow(missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("vae.trainer.v3");
}

pub mod convert;
pub mod credentials;
pub mod mailbox;
pub mod messages;
pub mod shared_memory;
pub mod tensor;
pub mod tensor_pool;
pub mod tls;

pub use convert::WireError;

/// A mutex's guard, whether or not a thread panicked holding it (every value kept under these
/// locks is whole between statements).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bumped on any incompatible change to `trainer.proto` or to what its fields mean, including
/// the bits of a gradient: 4 when the engine's weight gradients moved to the fused kernel
/// (`common::kernels::tree_weight_grad`), whose bits differ from release 3's, so that mixing
/// releases is refused at registration instead of mixing bits (or quarantining honest workers
/// under `--verify`); the wire format was unchanged, and the service keeps its `vae.trainer.v3`
/// path. 5 when a `ShardChunk` may point at a shard file in shared memory instead of carrying
/// pixels (a new field; a release-4 worker would read such a chunk as malformed). 6 when a task's
/// parameters may be a locked parameter file read in place (`TensorRef::ParameterFile`) instead
/// of the one `params.f32` copied out. (A task's next-step hint, `Task::next_examples`, did not
/// change it: a release-6 worker ignores the field and a newer one does without it.) 7 when the
/// coordinator reads an accepted gradient in a worker's shared memory until the step's update is
/// done, so a worker's later task in the same step must write after it, not over it (a release-6
/// worker starts every task at byte 0 of its gradient file).
pub const PROTOCOL_VERSION: u32 = 7;

/// Largest gRPC message either side accepts. tonic's default is 4 MiB; the default model's
/// parameters are 2.6 MB and a `--hidden 2048,2048` model is ~60 MB, so parameters and gradients
/// go in one message with this raised limit, while shard data is streamed in chunks of
/// [`SHARD_CHUNK_BYTES`] (or, to a worker attached to shared memory, named as a file). This is what a worker accepts from its coordinator; the coordinator
/// accepts far less, capped per call from the model's size (docs/security.md).
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
