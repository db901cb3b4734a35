//! Training: how a step's examples are split into virtual shards ([`ShardPlan`]), the fixed
//! reduction tree over the shards and its one fold ([`ReductionTree`], [`Node`]), what a shard
//! or a tree node contributes to a step ([`GradientSum`]; as the coordinator receives it,
//! [`ReceivedGradient`], possibly left in a worker's shared memory), and the [`Engine`] the coordinator
//! and the workers call to compute a node's gradient. However the shards are split between
//! processes and threads, a step's gradient has the same bits (docs/design.md §2).

mod blockwise;
mod engine;
mod gradient;
mod reduce;
mod shard;
mod shared_values;

pub use blockwise::BlockwiseSum;
pub use engine::{Engine, ShardBatch};
pub use gradient::{
    GradientSum, MAX_ABS_GRADIENT_PER_EXAMPLE, Magnitude, all_finite, check_gradient,
    check_measured,
};
pub use reduce::{Node, ReductionTree, TreeSum};
pub use shard::ShardPlan;
pub use shared_values::{
    GradientValues, ReceivedGradient, SharedGradient, SharedValues, check_shared,
};
