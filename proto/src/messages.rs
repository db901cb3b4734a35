//! The domain type of every protocol message: plain Rust, checked on the way in
//! ([`crate::convert`]), so the coordinator and the worker never see an unchecked prost field.

use bytes::Bytes;
use common::model::{BatchStats, ModelConfig};
use common::train::Node;

/// A worker introducing itself (`Register`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub protocol_version: u32,
    pub name: String,
    pub threads: u32,
    /// The worker's package version.
    pub build: String,
}

/// What a worker needs to know about the run it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    pub model: ModelConfig,
    /// Monte-Carlo samples per example (K), at least 1.
    pub samples: usize,
    pub seed: u64,
    /// Virtual shards, at least 1.
    pub shards: usize,
    pub run_id: String,
}

/// A coordinator's offer to exchange tensors through files in `dir` (same host only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedMemoryOffer {
    pub dir: std::path::PathBuf,
    /// A file name in `dir` (no path separators) whose contents prove the worker sees `dir`.
    pub probe_file: String,
}

/// The coordinator's answer to a [`Registration`].
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// The worker's number in logs and shared-memory file names (public).
    pub worker_id: u64,
    /// The worker's credential for every later call.
    pub worker_key: crate::credentials::WorkerKey,
    pub run: RunSpec,
    pub shared_memory: Option<SharedMemoryOffer>,
}

/// A worker's proof that it sees the shared-memory directory (`AttachSharedMemory`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    pub probe: Vec<u8>,
}

/// Part of a shard's examples (`FetchShard` streams these).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardChunk {
    pub shard: u32,
    /// Global id of the first example; ids are consecutive.
    pub first_example: u32,
    pub examples: u32,
    pub dim: u32,
    pub pixels: ShardPixels,
}

/// Where a shard chunk's `examples * dim` values are.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardPixels {
    Inline(Vec<f32>),
    /// At byte `offset` of the shard's file in the receiver's shared-memory directory
    /// ([`crate::shared_memory::SharedClient::map_shard`]).
    SharedFile {
        offset: u64,
    },
}

/// Where a tensor of f32 values is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorRef {
    /// Little-endian f32 bytes, a whole number of values (checked on decode).
    Inline(Bytes),
    /// `len` values at byte `offset` of a shared-memory file the receiver knows by context (a
    /// worker's gradient file).
    Shared { offset: u64, len: u64 },
    /// A task's `len` parameters in parameter file `slot` (below
    /// [`crate::shared_memory::PARAM_SLOTS`]) of the shared-memory directory, read in place
    /// ([`crate::shared_memory::SharedClient::lease_params`]).
    ParameterFile { slot: u32, len: u64 },
}

/// One shard's examples in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardWork {
    pub shard: u32,
    /// Global example ids, in the order the shard visits them this step.
    pub examples: Vec<u32>,
}

/// One reduction-tree node to compute: every shard of `node`, in shard order (checked on decode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeWork {
    pub node: Node,
    pub shards: Vec<ShardWork>,
}

/// Work for one worker in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub step: u64,
    pub epoch: u64,
    pub params: TensorRef,
    pub nodes: Vec<NodeWork>,
    pub run_id: String,
    /// A hint: the examples these nodes' shards are expected to take next step (empty when
    /// unknown). Only a prefetch may use it: the next task's own examples are what count.
    pub next_examples: Vec<ShardWork>,
}

/// The answer to `NextTask`.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskReply {
    Task(Task),
    Wait,
    Done(String),
}

/// Sums over a node's examples, as a worker reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeResult {
    pub node: Node,
    /// Sum of d(-ELBO)/d(params).
    pub grad: TensorRef,
    pub stats: BatchStats,
}

/// A worker's results for a step (`SubmitResult`).
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub step: u64,
    pub results: Vec<NodeResult>,
    /// CPU seconds of the compute threads divided by their number (finite, not negative).
    pub compute_seconds: f64,
}

/// The coordinator's verdict on a [`Submission`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub accepted: bool,
    /// Why it was rejected or not used; empty when used.
    pub reason: String,
}

/// The answer to `Heartbeat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Known,
    /// Declared lost or never registered: register again.
    Unknown,
    /// Training has ended.
    Done,
}
