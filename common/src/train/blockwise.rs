//! A step's gradient summed along the reduction tree one block of values at a time, as the
//! optimizer asks for them, instead of in whole-vector passes before it.
//!
//! Why: with four workers the coordinator's update added the top of the tree in three passes
//! over 2.6 MB vectors before Adam's pass, on the step's critical path. Summed block by block,
//! each received gradient is read once and the partial sums stay in cache, next to the optimizer
//! that consumes them (the update's median 1.28 -> 1.15 ms on a Zen 3, docs/scaling.md §16).
//!
//! Bits: every value gets the tree's additions with the same operands in the same order as
//! [`ReductionTree::evaluate_root`] gives it (`left + right` at each node), so the sum is the
//! same whatever the blocks; the tests compare the two.
//!
//! A gradient left in a co-located worker's shared memory ([`GradientValues::Shared`]) is read
//! here, block by block, only through a checked copy or a checked addition into a partial sum
//! ([`SharedGradient::copy_checked`], [`SharedGradient::add_checked`]), so it is never borrowed,
//! each value is read once per pass, and the check is of the value used. A block in which one fails
//! (rewritten since it was accepted) is summed again with that input as zeros, and its writer is
//! reported ([`BlockwiseSum::rewritten`]).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use super::reduce::{Node, ReductionTree, TreeSum};
use super::shared_values::{GradientValues, ReceivedGradient, SharedGradient};
use crate::model::BatchStats;
use crate::optim::GradientBlocks;
use crate::{Error, Result};

/// The received gradients (in no particular order) and the tree's additions that sum them.
#[derive(Debug)]
pub struct BlockwiseSum {
    inputs: Vec<GradientValues>,
    /// Postfix: `Input(k)` pushes input `k`, `Add` replaces the top two (left, right) with
    /// `left + right`.
    program: Vec<Op>,
    /// The writers of shared inputs whose values failed their second check.
    rewritten: Mutex<Vec<u64>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Input(usize),
    Add,
}

/// A node's program and statistics while the tree is evaluated (its gradient stays behind, in
/// [`BlockwiseSum::inputs`]).
struct Pending {
    program: Vec<Op>,
    stats: BatchStats,
}

impl TreeSum for Pending {
    fn add_assign(&mut self, other: &Self) {
        self.program.extend_from_slice(&other.program);
        self.program.push(Op::Add);
        self.stats += other.stats;
    }
}

/// One block's operand during [`BlockwiseSum::sum_into`]: a received gradient's values, a
/// partial sum, a shared input (read only through checked copies and additions; its index), or
/// zeros (a shared input that failed its check in this block).
enum Operand<'a> {
    Input(&'a [f32]),
    Sum(Vec<f32>),
    Shared(usize, &'a SharedGradient),
    Zeros,
}

impl Operand<'_> {
    /// The values, when they can be borrowed.
    fn values(&self) -> Option<&[f32]> {
        match self {
            Operand::Input(values) => Some(values),
            Operand::Sum(values) => Some(values),
            Operand::Shared(..) | Operand::Zeros => None,
        }
    }

    /// Writes the operand's values (from value `start` of the step's gradient) into `dst`;
    /// `Err(k)` when shared input `k` fails its check.
    fn load_into(&self, start: usize, dst: &mut [f32]) -> Result<(), usize> {
        match self {
            Operand::Shared(k, shared) => {
                return shared.copy_checked(start, dst).then_some(()).ok_or(*k);
            }
            Operand::Zeros => dst.fill(0.0),
            readable => dst.copy_from_slice(readable.values().expect("borrowable")),
        }
        Ok(())
    }

    /// `acc += operand` elementwise; `Err(k)` when shared input `k` fails its check.
    fn add_into(&self, start: usize, acc: &mut [f32]) -> Result<(), usize> {
        match self {
            Operand::Shared(k, shared) => {
                return shared.add_checked(start, acc).then_some(()).ok_or(*k);
            }
            Operand::Zeros => acc.iter_mut().for_each(|a| *a += 0.0),
            readable => add_in_place(acc, readable.values().expect("borrowable")),
        }
        Ok(())
    }
}

impl BlockwiseSum {
    /// The step's sum from the nodes received, with the checks of
    /// [`ReductionTree::evaluate_root`] (every shard covered exactly once) and that every
    /// gradient has `len` values; the statistics summed along the tree as it sums them.
    pub fn new(
        tree: &ReductionTree,
        received: HashMap<Node, impl Into<ReceivedGradient>>,
        len: usize,
    ) -> Result<(Self, BatchStats)> {
        let mut inputs = Vec::with_capacity(received.len());
        let mut pending = HashMap::with_capacity(received.len());
        for (node, sum) in received {
            let sum = sum.into();
            if sum.values.len() != len {
                return Err(Error::Tensor(format!(
                    "result for shards {}..{} has {} values, the model has {len} parameters",
                    node.lo,
                    node.hi,
                    sum.values.len()
                )));
            }
            let program = vec![Op::Input(inputs.len())];
            inputs.push(sum.values);
            pending.insert(
                node,
                Pending {
                    program,
                    stats: sum.stats,
                },
            );
        }
        let root = tree.evaluate_root(pending)?;
        Ok((
            BlockwiseSum {
                inputs,
                program: root.program,
                rewritten: Mutex::new(Vec::new()),
            },
            root.stats,
        ))
    }

    /// The sum itself when one received gradient covers every shard (nothing to add).
    fn single(&self) -> Option<&GradientValues> {
        match self.program[..] {
            [Op::Input(k)] => Some(&self.inputs[k]),
            _ => None,
        }
    }

    /// Writes the sum's values `range` into `out` (`range.len()` values). A shared input that
    /// fails its check in this block is summed as zeros (the block summed again without it)
    /// and its writer reported.
    pub fn sum_into(&self, range: Range<usize>, out: &mut [f32]) {
        assert_eq!(
            range.len(),
            out.len(),
            "one output value per value of the range"
        );
        let mut zeros = Vec::new();
        while let Err(k) = self.try_sum_into(range.clone(), out, &zeros) {
            zeros.push(k);
            if let GradientValues::Shared(shared) = &self.inputs[k] {
                let mut writers = self.rewritten.lock().unwrap_or_else(|e| e.into_inner());
                if !writers.contains(&shared.writer) {
                    writers.push(shared.writer);
                }
            }
        }
    }

    /// [`BlockwiseSum::sum_into`] with inputs `zeros` as zeros; `Err(k)` when shared input `k`
    /// fails its check (`out` then holds nothing to use).
    fn try_sum_into(
        &self,
        range: Range<usize>,
        out: &mut [f32],
        zeros: &[usize],
    ) -> Result<(), usize> {
        let start = range.start;
        let operand = |k: usize| match &self.inputs[k] {
            _ if zeros.contains(&k) => Operand::Zeros,
            GradientValues::Owned(values) => Operand::Input(&values[range.clone()]),
            GradientValues::Shared(shared) => Operand::Shared(k, shared),
        };
        if let [Op::Input(k)] = self.program[..] {
            return operand(k).load_into(start, out);
        }
        let mut stack: Vec<Operand<'_>> = Vec::new();
        let last = self.program.len() - 1;
        for (i, op) in self.program.iter().enumerate() {
            match *op {
                Op::Input(k) => stack.push(operand(k)),
                Op::Add => {
                    let right = stack.pop().expect("an addition has a right operand");
                    let left = stack.pop().expect("an addition has a left operand");
                    // `left + right` for every value, however each operand is read: a copy of
                    // `left` then `+= right` adds the same operands once, so the bits are the
                    // same as `add_to`'s.
                    if i == last {
                        match (left.values(), right.values()) {
                            (Some(l), Some(r)) => add_to(out, l, r),
                            _ => {
                                left.load_into(start, out)?;
                                right.add_into(start, out)?;
                            }
                        }
                        continue;
                    }
                    let sum = match (left, right.values()) {
                        (Operand::Sum(mut sum), _) => {
                            right.add_into(start, &mut sum)?;
                            sum
                        }
                        (Operand::Input(l), Some(r)) => {
                            let mut sum = vec![0.0; l.len()];
                            add_to(&mut sum, l, r);
                            sum
                        }
                        (left, _) => {
                            let mut sum = vec![0.0; range.len()];
                            left.load_into(start, &mut sum)?;
                            right.add_into(start, &mut sum)?;
                            sum
                        }
                    };
                    stack.push(Operand::Sum(sum));
                }
            }
        }
        Ok(())
    }

    /// The workers whose shared values failed their second check as they were read (rewritten
    /// after they were accepted): those values were summed as zeros.
    pub fn rewritten(&self) -> Vec<u64> {
        self.rewritten
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The received gradients' owned buffers, for reuse (shared values are let go).
    pub fn into_inputs(self) -> Vec<Vec<f32>> {
        self.inputs
            .into_iter()
            .filter_map(|values| match values {
                GradientValues::Owned(values) => Some(values),
                GradientValues::Shared(_) => None,
            })
            .collect()
    }
}

/// The optimizer reads the sum block by block; a single owned gradient where it is.
impl GradientBlocks for BlockwiseSum {
    fn block<'a>(&'a self, range: Range<usize>, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        if let Some(GradientValues::Owned(whole)) = self.single() {
            return &whole[range];
        }
        if scratch.len() < range.len() {
            // A fresh zeroed allocation (`calloc`) rather than filling a grown one.
            *scratch = vec![0.0; range.len()];
        }
        let out = &mut scratch[..range.len()];
        self.sum_into(range, out);
        out
    }
}

/// `out = left + right`, elementwise.
fn add_to(out: &mut [f32], left: &[f32], right: &[f32]) {
    for ((out, &l), &r) in out.iter_mut().zip(left).zip(right) {
        *out = l + r;
    }
}

/// `sum = sum + right`, elementwise.
fn add_in_place(sum: &mut [f32], right: &[f32]) {
    for (s, &r) in sum.iter_mut().zip(right) {
        *s += r;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::train::{GradientSum, Magnitude, SharedValues};

    /// Values of magnitudes far apart, so that another order of additions changes bits.
    fn gradient(len: usize, salt: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = ((i * 7919 + salt * 104_729) % 1000) as f32 / 1000.0 - 0.5;
                x * 10f32.powi(((i + salt) % 9) as i32 - 4)
            })
            .collect()
    }

    fn stats(examples: u64, elbo: f64) -> BatchStats {
        BatchStats {
            examples,
            elbo,
            ..BatchStats::default()
        }
    }

    /// Received sets of every shape a step can have: one root, every leaf, a mix of levels.
    fn received_sets(tree: &ReductionTree, len: usize) -> Vec<HashMap<Node, GradientSum>> {
        let root = tree.root();
        let mut sets = vec![vec![root]];
        let (left, right) = root.children().expect("more than one shard");
        sets.push(vec![left, right]);
        let (rl, rr) = right.children().expect("a deeper tree");
        sets.push(vec![left, rl, rr]);
        // A partial sum on the left of a single node.
        if let Some((ll, lr)) = left.children() {
            sets.push(vec![ll, lr, right]);
        }
        sets.push((0..root.hi).map(|s| Node { lo: s, hi: s + 1 }).collect());
        sets.into_iter()
            .map(|nodes| {
                nodes
                    .into_iter()
                    .enumerate()
                    .map(|(k, node)| {
                        let sum = GradientSum {
                            grad: gradient(len, k + node.lo as usize),
                            stats: stats(node.len() as u64, 0.1 * (k as f64 + 1.0) / 3.0),
                        };
                        (node, sum)
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn every_block_split_gives_the_tree_sum_bit_for_bit() {
        let len = 1000;
        for shards in [3, 5, 16] {
            let tree = ReductionTree::new(shards);
            for received in received_sets(&tree, len) {
                let want = tree.evaluate_root(received.clone()).unwrap();
                let (sum, got_stats) = BlockwiseSum::new(&tree, received.clone(), len).unwrap();
                assert_eq!(got_stats, want.stats, "{shards} shards: the statistics");
                assert_eq!(sum.single().is_some(), received.len() == 1);
                for block in [1, 7, 64, len] {
                    // Summed into the caller's slice, and as the optimizer reads it (borrowed
                    // or made in a scratch reused from block to block).
                    let (mut got, mut read) = (vec![f32::NAN; len], Vec::new());
                    let mut scratch = vec![f32::NAN; 3];
                    for start in (0..len).step_by(block) {
                        let range = start..(start + block).min(len);
                        sum.sum_into(range.clone(), &mut got[range.clone()]);
                        read.extend_from_slice(sum.block(range, &mut scratch));
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    for (how, got) in [("summed into", &got), ("read as blocks", &read)] {
                        assert_eq!(
                            bits(got),
                            bits(&want.grad),
                            "{shards} shards, {} nodes, blocks of {block}, {how}",
                            received.len()
                        );
                    }
                }
            }
        }
    }

    /// Values "in another process's memory": a vector read only through copies, which can be
    /// told to rewrite a range of itself after a number of copies (a worker breaking the
    /// protocol).
    #[derive(Debug)]
    struct Elsewhere {
        values: Mutex<Vec<f32>>,
        rewrite: Option<(usize, Range<usize>, f32)>,
        copies: Mutex<usize>,
    }

    impl Elsewhere {
        fn new(values: Vec<f32>) -> Self {
            Elsewhere {
                values: Mutex::new(values),
                rewrite: None,
                copies: Mutex::new(0),
            }
        }
    }

    impl SharedValues for Elsewhere {
        fn len(&self) -> usize {
            self.values.lock().unwrap().len()
        }

        fn copy_measuring(&self, start: usize, out: &mut [f32]) -> Magnitude {
            let mut copies = self.copies.lock().unwrap();
            *copies += 1;
            let mut values = self.values.lock().unwrap();
            if let Some((after, range, value)) = &self.rewrite
                && *copies > *after
            {
                values[range.clone()].fill(*value);
            }
            Magnitude::copy_measuring(out, &values[start..start + out.len()])
        }
    }

    /// `received` with the gradients of the nodes (by position) that `shared` picks left "in
    /// shared memory".
    fn partly_shared(
        received: &HashMap<Node, GradientSum>,
        shared: impl Fn(usize) -> bool,
    ) -> HashMap<Node, ReceivedGradient> {
        let mut nodes: Vec<_> = received.keys().copied().collect();
        nodes.sort_by_key(|n| n.lo);
        nodes
            .iter()
            .enumerate()
            .map(|(k, node)| {
                let sum = received[node].clone();
                let values = if shared(k) {
                    GradientValues::Shared(SharedGradient {
                        values: Arc::new(Elsewhere::new(sum.grad)),
                        max_abs: 1e6,
                        writer: k as u64,
                    })
                } else {
                    GradientValues::Owned(sum.grad)
                };
                let received = ReceivedGradient {
                    values,
                    stats: sum.stats,
                };
                (*node, received)
            })
            .collect()
    }

    #[test]
    fn gradients_read_where_they_are_give_the_same_bits() {
        let len = 1000;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for shards in [3, 16] {
            let tree = ReductionTree::new(shards);
            // Every input shared, the even ones, the odd ones, every third.
            let patterns = [(1, 0), (2, 0), (2, 1), (3, 0)];
            for (received, (every, phase)) in received_sets(&tree, len)
                .into_iter()
                .flat_map(|received| patterns.map(|pattern| (received.clone(), pattern)))
            {
                let want = tree.evaluate_root(received.clone()).unwrap();
                let is_shared = |k: usize| k % every == phase;
                let shared = partly_shared(&received, is_shared);
                let (sum, stats) = BlockwiseSum::new(&tree, shared, len).unwrap();
                assert_eq!(stats, want.stats);
                for block in [7, len] {
                    let (mut got, mut read) = (vec![f32::NAN; len], Vec::new());
                    let mut scratch = Vec::new();
                    for start in (0..len).step_by(block) {
                        let range = start..(start + block).min(len);
                        sum.sum_into(range.clone(), &mut got[range.clone()]);
                        read.extend_from_slice(sum.block(range, &mut scratch));
                    }
                    let how = format!("{shards} shards, {phase} mod {every} shared");
                    assert_eq!(bits(&got), bits(&want.grad), "{how}, summed into");
                    assert_eq!(bits(&read), bits(&want.grad), "{how}, as blocks");
                }
                assert!(sum.rewritten().is_empty());
                // Only the owned buffers come back for reuse.
                let owned = (0..received.len()).filter(|&k| !is_shared(k)).count();
                assert_eq!(sum.into_inputs().len(), owned);
            }
        }
    }

    /// A worker that rewrites its accepted gradient while the update reads it: the blocks in
    /// which its values fail the second check are summed with its values as zeros (never the
    /// values that failed), whether they were to be copied (a left operand) or added (a right
    /// one, into an input or into a partial sum), beside owned or shared inputs; the worker is
    /// named once however many blocks fail; the other blocks are untouched.
    #[test]
    fn values_rewritten_after_acceptance_are_summed_as_zeros_and_reported() {
        let (len, block) = (1000, 100);
        let tree = ReductionTree::new(4);
        let (left, right) = tree.root().children().unwrap();
        let (ll, lr) = left.children().unwrap();
        let received: HashMap<Node, GradientSum> = received_sets(&tree, len)
            .into_iter()
            .find(|set| set.len() == 3 && set.contains_key(&ll))
            .unwrap();
        for rewriter in [ll, lr, right] {
            for (others_shared, bad) in [(true, f32::NAN), (false, 1e30)] {
                let mut inputs: HashMap<Node, ReceivedGradient> = HashMap::new();
                for (node, sum) in received.clone() {
                    let values = if node == rewriter {
                        let mut values = Elsewhere::new(sum.grad);
                        // Rewritten after the first three reads (blocks 0-2), in blocks 5 and 6.
                        values.rewrite = Some((3, 520..630, bad));
                        GradientValues::Shared(SharedGradient {
                            values: Arc::new(values),
                            max_abs: 1e6,
                            writer: 7,
                        })
                    } else if others_shared {
                        GradientValues::Shared(SharedGradient {
                            values: Arc::new(Elsewhere::new(sum.grad)),
                            max_abs: 1e6,
                            writer: 8,
                        })
                    } else {
                        GradientValues::Owned(sum.grad)
                    };
                    let stats = sum.stats;
                    inputs.insert(node, ReceivedGradient { values, stats });
                }
                let (sum, _) = BlockwiseSum::new(&tree, inputs, len).unwrap();
                let mut got = vec![f32::NAN; len];
                for start in (0..len).step_by(block) {
                    sum.sum_into(start..start + block, &mut got[start..start + block]);
                }
                // The tree's own sum with the rewriter's values in blocks 5 and 6 as zeros.
                let mut zeroed = received.clone();
                zeroed.get_mut(&rewriter).unwrap().grad[500..700].fill(0.0);
                let want = tree.evaluate_root(zeroed).unwrap().grad;
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let case = format!("{bad} in {rewriter:?}, others shared: {others_shared}");
                assert_eq!(bits(&got), bits(&want), "{case}");
                assert_ne!(
                    bits(&got[500..700]),
                    bits(&tree.evaluate_root(received.clone()).unwrap().grad[500..700]),
                    "{case}"
                );
                assert_eq!(sum.rewritten(), vec![7], "{case}");
            }
        }
    }

    #[test]
    fn a_missing_shard_or_a_wrong_length_is_an_error() {
        let tree = ReductionTree::new(4);
        let mut received = received_sets(&tree, 10).pop().unwrap();
        let (_, half) = tree.root().children().unwrap();
        received.retain(|node, _| node.lo < half.lo);
        let e = BlockwiseSum::new(&tree, received, 10).unwrap_err();
        assert!(e.to_string().contains("no result for shard"), "{e}");

        let received = received_sets(&tree, 10).remove(1);
        let e = BlockwiseSum::new(&tree, received, 11).unwrap_err();
        assert!(e.to_string().contains("the model has 11 parameters"), "{e}");
    }
}
