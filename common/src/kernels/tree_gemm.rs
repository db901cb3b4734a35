//! A layer's weight gradient over a tree node's stacked shards, in one pass: for every element of
//! `dW = delta^T input`, each shard's sum over its own rows, added along the reduction tree.
//!
//! Why a kernel of our own: the contract (docs/design.md §2) needs each shard's sum on its own,
//! then `left + right` along the tree. Done as one GEMM per shard, the default 16 shards of a
//! batch of 128 are 16 products with 8 rows each, each writing (and the tree then re-reading) a
//! full 1.25 MB `dW` of the 784-400 layers: the engine ran at 0.63x its one-shard speed. Here each
//! output tile keeps the tree's partial sums in a small stack while it walks the node's shards, so
//! `dW` is written once and the inputs are read once per tile, as in one GEMM.
//!
//! Bits: every output element is the same sequence of operations on every path, tile and thread
//! count: per shard `acc = fma(delta, input, acc)` over the shard's rows in order from zero, then
//! `left + right` in the tree's order. The fused multiply-add rounds once everywhere: the hardware
//! instruction on x86-64 CPUs with AVX2 or AVX-512F and FMA, and the standard library's correctly
//! rounded `mul_add` otherwise (slow, but the same bits), so this kernel gives the same bits on
//! every machine. (The rest of the engine does not promise that: `matrixmultiply` picks its
//! kernel per CPU.)

use std::ops::Range;

use rayon::prelude::*;

use crate::kernels::{Float, with_widest_vectors};
use crate::train::Node;

/// One leaf of a tree node's sum in postfix order, with the additions that follow it.
#[derive(Debug, Clone, PartialEq)]
struct Step {
    /// The leaf's rows (one shard's): its sum is computed next.
    rows: Range<usize>,
    /// How many sums waiting on the stack are then added to it, each as `waiting + running`
    /// (the tree's `left + right`), before the running sum is pushed.
    adds: usize,
}

/// The shape of a node's sum along the reduction tree, with each leaf's rows: the fold of
/// [`Node::fold_leaves`] written out as a program for a small stack machine. Every `Add` of the
/// postfix form directly follows a leaf or another `Add`, so it is kept as a count on the leaf
/// before it: the running sum stays in registers from the leaf through its additions.
#[derive(Debug, Clone)]
pub struct TreeProgram {
    steps: Vec<Step>,
    /// Whether a leaf's sum waits only for the next leaf's, which adds it at once: true of every
    /// tree of two leaves or more (the deepest inner node's two leaves), false of one leaf.
    has_pair: bool,
    /// The most sums ever waiting on the stack.
    waiting: usize,
    /// One past the last row any leaf reads.
    rows: usize,
}

impl TreeProgram {
    /// The program of `node`'s tree sum, `rows(leaf)` giving each shard's rows.
    pub fn new(node: Node, rows: impl Fn(Node) -> Range<usize>) -> Self {
        // A fold whose values are (steps, sums waiting while it runs): the same shape and order
        // as every other sum along the tree. The right subtree runs with the left's sum waiting.
        let (steps, waiting) = node.fold_leaves(
            &mut |leaf| {
                let step = Step {
                    rows: rows(leaf),
                    adds: 0,
                };
                (vec![step], 0)
            },
            &mut |(mut left, left_waiting): (Vec<Step>, usize), (right, right_waiting)| {
                left.extend(right);
                left.last_mut().expect("a subtree has a leaf").adds += 1;
                (left, left_waiting.max(right_waiting + 1))
            },
        );
        let rows = steps.iter().map(|s| s.rows.end).max().unwrap_or(0);
        let has_pair = steps.windows(2).any(|w| w[0].adds == 0 && w[1].adds >= 1);
        TreeProgram {
            steps,
            has_pair,
            waiting,
            rows,
        }
    }

    /// Each leaf's rows with the number of waiting sums added to its sum after it, in order.
    pub(super) fn leaf_steps(&self) -> impl Iterator<Item = (Range<usize>, usize)> + '_ {
        self.steps.iter().map(|s| (s.rows.clone(), s.adds))
    }

    /// The most sums ever waiting on the stack while the program runs.
    pub(super) fn waiting(&self) -> usize {
        self.waiting
    }

    /// Whether some leaf's sum is added to the next leaf's at once (see the field).
    pub(super) fn has_pair(&self) -> bool {
        self.has_pair
    }
}

/// Output rows per parallel task: a multiple of the 8- and 4-row tiles' heights.
const ROWS_PER_TASK: usize = 32;

/// [`ROWS_PER_TASK`], or a multiple of the AVX-512 paired tiles' six rows where those run (which
/// thread sums a row never changes its bits).
fn rows_per_task<T: Float>(program: &TreeProgram) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use super::tree_tile_avx512::{PAIR_MR, pairs};
        if avx512_tiles_run::<T>() && pairs(program) {
            return 5 * PAIR_MR;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = program;
    ROWS_PER_TASK
}

/// `out[o, i] = tree sum over the leaves of (sum over the leaf's rows r of delta[r, o] *
/// input[r, i])` for row-major `delta: [n, out_dim]`, `input: [n, in_dim]` (rows `in_stride`
/// apart) and `out: [out_dim, in_dim]`. Parallel over fixed blocks of output rows.
///
/// # Panics
/// If the buffers are shorter than the shapes and the program's rows need.
pub fn tree_weight_grad<T: Float>(
    program: &TreeProgram,
    delta: &[T],
    out_dim: usize,
    input: &[T],
    in_dim: usize,
    in_stride: usize,
    out: &mut [T],
) {
    assert_eq!(out.len(), out_dim * in_dim, "dW is [out_dim, in_dim]");
    assert!(in_stride >= in_dim, "input rows overlap");
    let rows = program.rows;
    assert!(delta.len() >= rows * out_dim, "delta holds every row");
    assert!(
        rows == 0 || input.len() >= (rows - 1) * in_stride + in_dim,
        "input holds every row"
    );
    if in_dim == 0 {
        return;
    }
    let shape = Shape {
        out_dim,
        in_dim,
        in_stride,
    };
    // The tiles read the input's strips packed, at their width; packed here once, not by every
    // task. (The AVX-512 tiles read them in place until docs/scaling.md §38: packed, the engine
    // with 16 shards gained 2.7%.)
    let (packed, width) = if avx512_tiles_run::<T>() {
        let packed = pack_strips::<T, AVX512_NR>(input, rows, shape);
        (packed.into_flattened(), AVX512_NR)
    } else {
        let packed = pack_strips::<T, PORTABLE_NR>(input, rows, shape);
        (packed.into_flattened(), PORTABLE_NR)
    };
    let rows_per_task = rows_per_task::<T>(program);
    out.par_chunks_mut(rows_per_task * in_dim)
        .enumerate()
        .for_each(|(task, out)| {
            let operands = Block {
                program,
                delta,
                input,
                packed_strips: Some(PackedStrips {
                    values: &packed,
                    width,
                }),
                shape,
                first_row: task * rows_per_task,
            };
            block(operands, out);
        });
}

/// Columns of the portable tile.
const PORTABLE_NR: usize = 16;

/// Columns of the AVX-512 tiles (`tree_tile_avx512::NR`).
const AVX512_NR: usize = 32;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(AVX512_NR == super::tree_tile_avx512::NR);

/// The input cut into column strips of `width` values a row by [`pack_strips`].
#[derive(Clone, Copy)]
struct PackedStrips<'a, T> {
    values: &'a [T],
    width: usize,
}

/// Whether [`block`] runs the AVX-512 tiles (which read strips [`AVX512_NR`] columns wide).
/// Only f32 on a CPU with AVX-512F: the same test as `tree_tile_avx512::with_avx512`'s.
fn avx512_tiles_run<T: Float>() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        T::as_f32_slice(&[]).is_some() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The input's first `rows` rows cut into column strips of `NR`, each strip's rows one after
/// another (`NR` values a row, a partial last strip padded with zeros), as [`block_tiles`] reads
/// them. Packed once per product: when every task copied the strips it read, a 784-wide input was
/// copied once per 32 output rows, and a 400 x 784 weight gradient took 1.3-1.5 times as long on
/// one thread of a Zen 3 (docs/scaling.md §36). Strip by strip, in parallel: row by row, writing
/// into every strip in turn, took twice as long (docs/scaling.md §37).
fn pack_strips<T: Float, const NR: usize>(input: &[T], rows: usize, shape: Shape) -> Vec<[T; NR]> {
    let mut packed = vec![[T::zero(); NR]; shape.in_dim.div_ceil(NR) * rows];
    // (Chunks must not be empty; with no rows the vector is, and there are none.)
    packed
        .par_chunks_mut(rows.max(1))
        .enumerate()
        .for_each(|(strip, strip_rows)| {
            let (first, width) = (strip * NR, NR.min(shape.in_dim - strip * NR));
            for (row, dst) in strip_rows.iter_mut().enumerate() {
                let at = row * shape.in_stride + first;
                copy_short::<T, NR>(dst, &input[at..at + width]);
            }
        });
    packed
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    out_dim: usize,
    in_dim: usize,
    in_stride: usize,
}

/// Output rows `first_row..` (as many as `out` holds), on the CPU's widest vectors.
///
/// f32 on AVX-512: 8 x 32 tiles written with intrinsics (`tree_tile_avx512`), sixteen
/// accumulators, or 6 x 32 tiles that keep a pair of leaves' sums in registers.
/// Otherwise one portable tile shape: 4 x 16 accumulators, 8 of the 16 ymm registers for f32 on
/// AVX2 (4 x 24 spilled in the inner loop), 8 zmm on AVX-512 for f64 (used only by gradient
/// checks). Wider portable tiles (4 x 32, 8 x 16) are not vectorised by LLVM: it keeps their
/// accumulators in memory and emits scalar FMAs, 5.6x slower on a Zen 5 EPYC (docs/scaling.md
/// §13).
fn block<T: Float>(b: Block<'_, T>, out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if let (Some(delta), Some(input), Some(out)) = (
        T::as_f32_slice(b.delta),
        T::as_f32_slice(b.input),
        T::as_f32_slice_mut(out),
    ) {
        let b = Block {
            program: b.program,
            delta,
            input,
            // Strips packed for the tiles, or (only where none were, as in tests) read in place.
            packed_strips: b.packed_strips.and_then(|p| {
                Some(PackedStrips {
                    values: T::as_f32_slice(p.values)?,
                    width: p.width,
                })
            }),
            shape: b.shape,
            first_row: b.first_row,
        };
        if avx512_block(b, out).is_some() {
            return;
        }
    }
    // (Strips packed for the AVX-512 tiles are 32 wide; these tiles are 16, and pack their own.)
    let b = Block {
        packed_strips: b.packed_strips.filter(|p| p.width == PORTABLE_NR),
        ..b
    };
    with_widest_vectors(
        #[inline(always)]
        || portable_block::<T, 4, PORTABLE_NR>(b, out),
    );
}

/// One parallel task's operands: the node's program, the layer's delta and input rows (and
/// perhaps the input already cut into strips, [`pack_strips`]), their shape, and the block's
/// first output row.
#[derive(Clone, Copy)]
struct Block<'a, T> {
    program: &'a TreeProgram,
    delta: &'a [T],
    input: &'a [T],
    packed_strips: Option<PackedStrips<'a, T>>,
    shape: Shape,
    first_row: usize,
}

/// The block in AVX-512 tiles (`tree_tile_avx512`), strips packed or in place; `None` (nothing
/// written) when this CPU lacks AVX-512F.
#[cfg(target_arch = "x86_64")]
fn avx512_block(b: Block<'_, f32>, out: &mut [f32]) -> Option<()> {
    use super::tree_tile_avx512::{MR, PAIR_MR, pairs};
    if pairs(b.program) {
        avx512_tiles::<PAIR_MR>(b, out)
    } else {
        avx512_tiles::<MR>(b, out)
    }
}

/// [`avx512_block`] in tiles of `R` rows (`tree_tile_avx512`'s `MR` or `PAIR_MR`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx512_tiles<const R: usize>(b: Block<'_, f32>, out: &mut [f32]) -> Option<()> {
    use super::tree_tile_avx512::{NR, with_avx512};
    with_avx512::<R, _>(
        b.program,
        #[inline(always)]
        |tiles| {
            block_tiles::<f32, R, NR, true>(
                b,
                out,
                #[inline(always)]
                |d, x, stride| tiles.sum(d, x, stride),
            )
        },
    )
}

/// The block in portable `MR x NR` tiles ([`tile_sum`]). The tile closure must be inlined (as
/// must this function) for [`with_widest_vectors`] to compile the tiles for its wide vectors: a
/// closure left out of line ran the AVX2 path's tile as baseline code calling `fmaf` per element.
#[inline(always)]
fn portable_block<T: Float, const MR: usize, const NR: usize>(b: Block<'_, T>, out: &mut [T]) {
    let mut stack = vec![Waiting([[T::zero(); NR]; MR]); b.program.waiting];
    block_tiles::<T, MR, NR, false>(
        b,
        out,
        #[inline(always)]
        |d, x, _stride| tile_sum::<T, MR, NR>(b.program, d, x, &mut stack),
    );
}

/// The block in `MR x NR` tiles, each summed by `tile(delta panel, input strip, strip's row
/// stride)`. The block's delta columns are first copied into panels of `MR` output rows, row after
/// row. The input's column strips come packed once per product and shared by every block
/// ([`pack_strips`], rows of `NR` values), so the tiles read memory in order. Given none (tests
/// only), they are copied into such rows here, or with `STRIPS_IN_PLACE` read where they are
/// (rows `in_stride` apart; only a partial last strip is copied): copying them again for every
/// block of output rows was 6% of a step under the AVX-512 tiles, and a fifth to a third of a
/// gradient under the portable ones (docs/scaling.md §36).
/// Edge tiles compute all `MR x NR` lanes: the delta panels are zero-padded, a partial strip's
/// spare input lanes hold zeros or whatever the copy buffer held (an earlier strip's values), and
/// only the real lanes are written out (no lane's value depends on another's).
#[inline(always)]
fn block_tiles<T: Float, const MR: usize, const NR: usize, const STRIPS_IN_PLACE: bool>(
    b: Block<'_, T>,
    out: &mut [T],
    mut tile: impl FnMut(&[T], &[T], usize) -> [[T; NR]; MR],
) {
    let Block {
        program,
        delta,
        input,
        packed_strips,
        shape,
        first_row,
    } = b;
    let rows = out.len() / shape.in_dim;
    let n = program.rows;
    if n == 0 {
        // No leaf has a row: every sum is zero.
        out.fill(T::zero());
        return;
    }
    let panels = rows.div_ceil(MR);
    let mut d = vec![T::zero(); panels * n * MR];
    for (p, panel) in d.chunks_exact_mut(n * MR).enumerate() {
        let mr = MR.min(rows - p * MR);
        for (r, packed) in panel.chunks_exact_mut(MR).enumerate() {
            let at = r * shape.out_dim + first_row + p * MR;
            copy_short::<T, MR>(packed, &delta[at..at + mr]);
        }
    }
    if let Some(packed) = packed_strips {
        assert_eq!(packed.width, NR, "strips packed for the tiles' width");
        assert_eq!(
            packed.values.len(),
            shape.in_dim.div_ceil(NR) * n * NR,
            "every strip"
        );
    }
    // The copy buffer for strips: every strip, or only a partial last one, or none when they
    // come packed.
    let copied = packed_strips.is_none() && (!STRIPS_IN_PLACE || shape.in_dim % NR != 0);
    let mut x = vec![T::zero(); if copied { n * NR } else { 0 }];
    // Column strips outside: a strip of every row of the input stays in L1 while the block's
    // output rows walk over it.
    for (s, i) in (0..shape.in_dim).step_by(NR).enumerate() {
        let nr = NR.min(shape.in_dim - i);
        let (strip, stride) = if let Some(packed) = packed_strips {
            (&packed.values[s * n * NR..][..n * NR], NR)
        } else if nr == NR && STRIPS_IN_PLACE {
            (&input[i..], shape.in_stride)
        } else {
            for (r, packed) in x.chunks_exact_mut(NR).enumerate() {
                let at = r * shape.in_stride + i;
                copy_short::<T, NR>(packed, &input[at..at + nr]);
            }
            (&x[..], NR)
        };
        for (p, panel) in d.chunks_exact(n * MR).enumerate() {
            let sum = tile(panel, strip, stride);
            let o = p * MR;
            for (m, sum) in sum[..MR.min(rows - o)].iter().enumerate() {
                let at = (o + m) * shape.in_dim + i;
                copy_short::<T, NR>(&mut out[at..at + nr], &sum[..nr]);
            }
        }
    }
}

/// `dst[..src.len()] = src` for a tile's row of at most `N` values. The full-length case is a
/// copy of known length (a few vector moves) instead of a `memcpy` call: a step copies tens of
/// thousands of such rows (`memmove` was 2.55% of `worker bench --shards 16`, 0.33% after;
/// docs/scaling.md §15).
#[inline(always)]
fn copy_short<T: Float, const N: usize>(dst: &mut [T], src: &[T]) {
    if src.len() == N {
        let dst: &mut [T; N] = (&mut dst[..N]).try_into().expect("N values");
        *dst = src.try_into().expect("N values");
    } else {
        dst[..src.len()].copy_from_slice(src);
    }
}

/// A tile's sum waiting on [`tile_sum`]'s stack, aligned to a cache line: a `vec!` of plain
/// arrays is only as aligned as the allocator makes it (16 bytes with glibc), so a push's or a
/// pop's vector stores and loads could straddle two lines. On one thread of a Zen 3, 16-leaf
/// gradients gained 1-2% in two of three runs (400 x 784) and 5-12% (784 x 400); a whole step,
/// nothing beyond the noise (docs/scaling.md §37).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Waiting<T, const MR: usize, const NR: usize>([[T; NR]; MR]);

/// Runs the program for one tile: row `r`'s delta values are `d[r * MR..][..MR]`, its input
/// values `x[r * NR..][..NR]`. The running sum stays in registers; only sums waiting for their
/// right neighbour go to `stack`.
#[inline(always)]
fn tile_sum<T: Float, const MR: usize, const NR: usize>(
    program: &TreeProgram,
    d: &[T],
    x: &[T],
    stack: &mut [Waiting<T, MR, NR>],
) -> [[T; NR]; MR] {
    let mut top = 0;
    let mut acc = [[T::zero(); NR]; MR];
    for (k, step) in program.steps.iter().enumerate() {
        if k > 0 {
            // The previous leaf's sum waits for its right neighbour.
            stack[top].0 = acc;
            top += 1;
        }
        acc = [[T::zero(); NR]; MR];
        let (lo, hi) = (step.rows.start, step.rows.end);
        let rows = d[lo * MR..hi * MR]
            .chunks_exact(MR)
            .zip(x[lo * NR..hi * NR].chunks_exact(NR));
        for (d, x) in rows {
            let d: &[T; MR] = d.try_into().expect("MR values");
            let x: &[T; NR] = x.try_into().expect("NR values");
            for (acc, &d) in acc.iter_mut().zip(d) {
                for (a, &x) in acc.iter_mut().zip(x) {
                    *a = d.mul_add(x, *a);
                }
            }
        }
        for _ in 0..step.adds {
            top -= 1;
            let left = &stack[top].0;
            for (right, left) in acc.iter_mut().zip(left) {
                for (r, &l) in right.iter_mut().zip(left) {
                    *r = l + *r;
                }
            }
        }
    }
    debug_assert_eq!(top, 0, "a tree sum leaves one value");
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(len: usize, salt: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) / 317.0)
            .collect()
    }

    /// Every output row of an `out_dim x in_dim` weight gradient as one block.
    fn whole_block<'a>(
        program: &'a TreeProgram,
        delta: &'a [f32],
        input: &'a [f32],
        out_dim: usize,
        in_dim: usize,
    ) -> Block<'a, f32> {
        Block {
            program,
            delta,
            input,
            packed_strips: None,
            shape: Shape {
                out_dim,
                in_dim,
                in_stride: in_dim,
            },
            first_row: 0,
        }
    }

    /// The definition: each shard's product on its own (fused multiply-adds in row order), then
    /// the tree.
    fn reference(
        node: Node,
        bounds: &[usize],
        delta: &[f32],
        out_dim: usize,
        input: &[f32],
        in_dim: usize,
    ) -> Vec<f32> {
        node.fold_leaves(
            &mut |leaf| {
                let s = (leaf.lo - node.lo) as usize;
                let mut dw = vec![0f32; out_dim * in_dim];
                for r in bounds[s]..bounds[s + 1] {
                    for o in 0..out_dim {
                        for i in 0..in_dim {
                            let a = &mut dw[o * in_dim + i];
                            *a = delta[r * out_dim + o].mul_add(input[r * in_dim + i], *a);
                        }
                    }
                }
                dw
            },
            &mut |mut left, right| {
                left.iter_mut().zip(&right).for_each(|(l, r)| *l += r);
                left
            },
        )
    }

    #[test]
    fn the_fused_sum_is_the_per_shard_products_added_along_the_tree_bit_for_bit() {
        // Edges on both sides (37 rows, 45 columns), uneven and empty shards.
        for (shards, sizes) in [
            (1usize, vec![9usize]),
            (6, vec![3, 0, 8, 1, 5, 0]),
            (16, vec![2; 16]),
            (3, vec![0, 0, 0]),
        ] {
            let node = Node {
                lo: 3,
                hi: 3 + shards as u32,
            };
            let mut bounds = vec![0];
            for s in &sizes {
                bounds.push(bounds.last().unwrap() + s);
            }
            let n = *bounds.last().unwrap();
            let (out_dim, in_dim) = (37, 45);
            let delta = filled(n * out_dim, 1);
            let input = filled(n * in_dim, 2);
            let program = TreeProgram::new(node, |leaf| {
                let s = (leaf.lo - node.lo) as usize;
                bounds[s]..bounds[s + 1]
            });
            let mut out = vec![f32::NAN; out_dim * in_dim];
            tree_weight_grad(&program, &delta, out_dim, &input, in_dim, in_dim, &mut out);
            let want = reference(node, &bounds, &delta, out_dim, &input, in_dim);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&want), "{shards} shards");
            // Every portable path gives the same bits as the best one.
            let mut portable = vec![f32::NAN; out_dim * in_dim];
            let b = whole_block(&program, &delta, &input, out_dim, in_dim);
            portable_block::<f32, 3, 5>(b, &mut portable);
            assert_eq!(bits(&portable), bits(&want), "{shards} shards, 3 x 5 tiles");
            portable.fill(f32::NAN);
            portable_block::<f32, 1, 1>(b, &mut portable);
            assert_eq!(bits(&portable), bits(&want), "{shards} shards, 1 x 1 tiles");
            // With the strips packed once for all tasks, as the dispatch does without AVX-512.
            let packed = pack_strips::<f32, PORTABLE_NR>(&input, n, b.shape);
            let mut b = b;
            b.packed_strips = Some(PackedStrips {
                values: packed.as_flattened(),
                width: PORTABLE_NR,
            });
            portable.fill(f32::NAN);
            portable_block::<f32, 4, PORTABLE_NR>(b, &mut portable);
            assert_eq!(
                bits(&portable),
                bits(&want),
                "{shards} shards, packed strips"
            );
        }
    }

    /// The AVX-512 tiles against the portable ones, directly (not through the dispatch), over
    /// shapes with partial panels and strips on both sides: both tile heights (pairs fused in the
    /// paired tiles' height, and not in the other) on trees with and without pairs of leaves,
    /// strips read in place and packed.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_tiles_give_the_portable_tiles_bits() {
        use super::super::tree_tile_avx512::{MR, PAIR_MR, pairs};
        let trees: [(Node, Vec<usize>, bool); 4] = [
            (Node { lo: 0, hi: 6 }, vec![0, 5, 5, 12, 13, 20, 29], true),
            (Node { lo: 0, hi: 1 }, vec![0, 29], false),
            (
                Node { lo: 0, hi: 16 },
                (0..=16).map(|s| s * 29 / 16).collect(),
                true,
            ),
            (Node { lo: 3, hi: 6 }, vec![0, 11, 11, 29], true),
        ];
        for (node, bounds, has_pairs) in trees {
            let program = TreeProgram::new(node, |leaf| {
                let s = (leaf.lo - node.lo) as usize;
                bounds[s]..bounds[s + 1]
            });
            assert_eq!(pairs(&program), has_pairs, "{node:?}");
            for (out_dim, in_dim) in [(37, 45), (32, 64), (8, 32), (5, 7), (40, 100)] {
                let delta = filled(29 * out_dim, 5);
                let input = filled(29 * in_dim, 6);
                let b = whole_block(&program, &delta, &input, out_dim, in_dim);
                let mut want = vec![f32::NAN; out_dim * in_dim];
                portable_block::<f32, 4, 16>(b, &mut want);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let mut got = vec![f32::NAN; out_dim * in_dim];
                if avx512_block(b, &mut got).is_none() {
                    eprintln!("this CPU has no AVX-512F: its tiles were not run");
                    return;
                }
                assert_eq!(bits(&got), bits(&want), "{node:?} {out_dim} x {in_dim}");
                got.fill(f32::NAN);
                avx512_tiles::<MR>(b, &mut got);
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{node:?} {out_dim} x {in_dim}, 8 rows"
                );
                got.fill(f32::NAN);
                avx512_tiles::<PAIR_MR>(b, &mut got);
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{node:?} {out_dim} x {in_dim}, 6 rows"
                );
                // With the strips packed once, 32 wide, as the dispatch gives them.
                let packed = pack_strips::<f32, AVX512_NR>(&input, 29, b.shape);
                let mut b = b;
                b.packed_strips = Some(PackedStrips {
                    values: packed.as_flattened(),
                    width: AVX512_NR,
                });
                for rows in [None, Some(MR), Some(PAIR_MR)] {
                    got.fill(f32::NAN);
                    match rows {
                        None => avx512_block(b, &mut got),
                        Some(MR) => avx512_tiles::<MR>(b, &mut got),
                        Some(_) => avx512_tiles::<PAIR_MR>(b, &mut got),
                    };
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{node:?} {out_dim} x {in_dim}, {rows:?} rows, packed strips"
                    );
                }
            }
        }
    }

    /// Input rows farther apart than their width (padding that must never be read: NaN), through
    /// the dispatch (which packs the strips), the AVX-512 tiles reading the strips in place (rows
    /// `in_stride` apart) and the portable tiles.
    #[test]
    fn input_rows_with_padding_between_them_give_the_same_bits() {
        let node = Node { lo: 0, hi: 5 };
        let bounds = [0usize, 4, 9, 9, 16, 23];
        for (out_dim, in_dim) in [(37, 45), (40, 64), (9, 32)] {
            let stride = in_dim + 3;
            let delta = filled(23 * out_dim, 7);
            let dense = filled(23 * in_dim, 8);
            let mut padded = vec![f32::NAN; 22 * stride + in_dim];
            for r in 0..23 {
                padded[r * stride..][..in_dim].copy_from_slice(&dense[r * in_dim..][..in_dim]);
            }
            let program = TreeProgram::new(node, |leaf| {
                bounds[leaf.lo as usize]..bounds[leaf.lo as usize + 1]
            });
            let want = reference(node, &bounds, &delta, out_dim, &dense, in_dim);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let mut out = vec![f32::NAN; out_dim * in_dim];
            tree_weight_grad(&program, &delta, out_dim, &padded, in_dim, stride, &mut out);
            assert_eq!(bits(&out), bits(&want), "{out_dim} x {in_dim}, dispatched");
            let mut b = whole_block(&program, &delta, &padded, out_dim, in_dim);
            b.shape.in_stride = stride;
            #[cfg(target_arch = "x86_64")]
            {
                out.fill(f32::NAN);
                if avx512_block(b, &mut out).is_some() {
                    assert_eq!(bits(&out), bits(&want), "{out_dim} x {in_dim}, in place");
                }
            }
            out.fill(f32::NAN);
            portable_block::<f32, 4, PORTABLE_NR>(b, &mut out);
            assert_eq!(bits(&out), bits(&want), "{out_dim} x {in_dim}, portable");
            let packed = pack_strips::<f32, PORTABLE_NR>(&padded, 23, b.shape);
            b.packed_strips = Some(PackedStrips {
                values: packed.as_flattened(),
                width: PORTABLE_NR,
            });
            out.fill(f32::NAN);
            portable_block::<f32, 4, PORTABLE_NR>(b, &mut out);
            assert_eq!(
                bits(&out),
                bits(&want),
                "{out_dim} x {in_dim}, packed strips"
            );
        }
    }

    #[test]
    fn a_node_split_between_processes_adds_up_to_the_same_bits() {
        let node = Node { lo: 0, hi: 8 };
        let (left, right) = node.children().unwrap();
        let bounds: Vec<usize> = (0..=8).map(|s| s * 3).collect();
        let (out_dim, in_dim) = (20, 33);
        let delta = filled(24 * out_dim, 3);
        let input = filled(24 * in_dim, 4);
        let run = |n: Node| {
            let program = TreeProgram::new(n, |leaf| {
                bounds[leaf.lo as usize]..bounds[leaf.lo as usize + 1]
            });
            let mut out = vec![0f32; out_dim * in_dim];
            tree_weight_grad(&program, &delta, out_dim, &input, in_dim, in_dim, &mut out);
            out
        };
        let mut split = run(left);
        split.iter_mut().zip(run(right)).for_each(|(l, r)| *l += r);
        let whole = run(node);
        assert!(
            whole
                .iter()
                .zip(&split)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }
}
