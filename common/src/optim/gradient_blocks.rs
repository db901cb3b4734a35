//! Where an optimizer's step reads its gradient, one block at a time.

use std::ops::Range;

/// A gradient of known length that an optimizer reads block by block
/// ([`super::OptimizerConfig::step_scaled_from`]): borrowed where it already is, or made just
/// before the block is stepped (the reduction tree's top summed on the fly,
/// `train::BlockwiseSum`), so it is read once and stays in cache.
pub trait GradientBlocks: Sync {
    /// The gradient's values `range`: either where they already are, or written into the
    /// start of `scratch` (grown if shorter than the range; it is reused from block to block)
    /// and returned from there.
    fn block<'a>(&'a self, range: Range<usize>, scratch: &'a mut Vec<f32>) -> &'a [f32];
}

/// A whole gradient is read where it is: copying each block out first, an extra pass over 2.6 MB,
/// took a Zen 3 nearly as long as Adam's own arithmetic (docs/scaling.md §19).
impl GradientBlocks for [f32] {
    fn block<'a>(&'a self, range: Range<usize>, _scratch: &'a mut Vec<f32>) -> &'a [f32] {
        &self[range]
    }
}
