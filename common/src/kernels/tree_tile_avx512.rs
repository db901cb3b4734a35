//! The weight-gradient kernel's f32 tiles on AVX-512, written with intrinsics: 8 output rows x
//! 32 input columns, sixteen `zmm` accumulators; or, for a tree with pairs of leaves, 6 x 32
//! tiles that add each pair in registers ([`pairs`]: 7% less time per 784 x 400 gradient of 16
//! shards on a Zen 4, docs/scaling.md §29).
//!
//! Why: the portable tile ([`super::tree_gemm`]) is 4 x 16: four accumulators, each taking one
//! fused multiply-add per row. An FMA's result is ready four cycles later and a Zen 5 core starts
//! two 512-bit FMAs a cycle, so four dependent chains keep its FMA units half busy; that loop was
//! 39% of a training step (`worker bench`, Zen 5). Wider tiles in portable Rust are not
//! vectorised by LLVM (it emitted 128 scalar FMAs for an 8 x 16 tile, docs/scaling.md §13), so
//! this one spells out its vector operations. Per row of the node it loads two vectors of input
//! (from the strips `tree_gemm` packs once per product: re-packing them for every block of
//! output rows was 6% of a step on a Zen 5, docs/scaling.md §15; packed once, the engine with 16
//! shards ran 1.027x as fast as reading them in place on an Intel Xeon, §38) and broadcasts eight
//! delta values for sixteen FMAs (six for twelve in the paired tiles). Measured on a Zen 5 EPYC
//! (`worker bench`, interleaved, 5 of 5 pairs each): 8 x 16 +10% over 4 x 16, 8 x 32 +12% over
//! 8 x 16, 8 x 48 no better than 8 x 32, strips read in place +8% over strips copied for every
//! block (docs/scaling.md §15).
//!
//! Bits: each output element gets exactly the portable tile's operations in the same order: per
//! leaf `acc = fma(delta, input, acc)` over the leaf's rows from zero, then for each waiting sum
//! `acc = waiting + acc`. So the results are the same bits as every other path's (the tests in
//! `tree_gemm` compare them with the definition and with the portable tiles).
//!
//! Unsafe: the calls into this module's `#[target_feature]` functions, made only after
//! `is_x86_feature_detected!("avx512f")` (in [`with_avx512`]) or through a [`TileSums`], which
//! only [`with_avx512`] makes; and the vector loads and stores, each through a pointer to a
//! fixed-size array (`&[f32; 16]`), so all 64 bytes are in bounds.
#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps,
    _mm512_storeu_ps,
};
use std::ops::Range;

use super::tree_gemm::TreeProgram;

/// Output rows per tile of a program that has no pair of leaves to fuse ([`pairs`]).
pub(super) const MR: usize = 8;
/// Output rows per tile of a program with pairs: six, so that a pair's left sum (twelve
/// registers) waits in registers beside the right one's twelve accumulators, the input's two and
/// the broadcast (27 of the 32 `zmm` registers).
pub(super) const PAIR_MR: usize = 6;
/// Input columns per tile: [`V`] `zmm` registers of f32.
pub(super) const NR: usize = 32;
/// Vectors of 16 f32 per tile row.
const V: usize = NR / 16;

/// A tile's sums: [`V`] vectors ([`NR`] columns) per output row.
type Acc<const R: usize> = [[__m512; V]; R];

/// Whether `program` has a pair to fuse ([`TreeProgram::has_pair`]): then its tiles are
/// [`PAIR_MR`] rows high. Unfused, every leaf's sum (8 rows' worth of multiply-adds for the
/// default 16 shards of 128 rows) went to the stack and back: the 16-shard tile took 30% longer
/// than the one-shard tile on a Zen 4, most of it in those stores. Fused, one 784 x 400 gradient
/// took 1-10% less time for every tree of 2 to 16 leaves measured there (the most with the
/// shortest leaves), and the same for one leaf, which keeps 8-row tiles (docs/scaling.md §29).
pub(super) fn pairs(program: &TreeProgram) -> bool {
    program.has_pair()
}

/// Calls `block(tiles)`, where `tiles` sums `R` x 32 tiles of `program`'s tree with AVX-512 (see
/// [`TileSums::sum`]; `R` is [`MR`], or [`PAIR_MR`] to fuse pairs); `None` when this CPU lacks
/// AVX-512F. Only code inlined into `run` is compiled for AVX-512, so `block` must be an
/// `#[inline(always)]` closure (as for `vector_isa::with_widest_vectors`); the tiles themselves
/// are compiled for it either way.
pub(super) fn with_avx512<'p, const R: usize, T>(
    program: &'p TreeProgram,
    block: impl FnOnce(&mut TileSums<'p, R>) -> T,
) -> Option<T> {
    if !std::arch::is_x86_feature_detected!("avx512f") {
        return None;
    }
    // SAFETY: the CPU has AVX-512F, the feature `run` is compiled for.
    Some(unsafe { run(program, block) })
}

#[target_feature(enable = "avx512f")]
fn run<'p, const R: usize, T>(
    program: &'p TreeProgram,
    block: impl FnOnce(&mut TileSums<'p, R>) -> T,
) -> T {
    let mut tiles = TileSums {
        program,
        stack: vec![[[_mm512_setzero_ps(); V]; R]; program.waiting()],
    };
    block(&mut tiles)
}

/// The tile kernel for one program, with its stack of sums waiting for their right neighbours.
/// Only made by [`with_avx512`], so a `TileSums` exists only on a CPU with AVX-512F.
pub(super) struct TileSums<'p, const R: usize> {
    program: &'p TreeProgram,
    stack: Vec<Acc<R>>,
}

impl<const R: usize> TileSums<'_, R> {
    /// The tree sum of one tile: row `r`'s delta values are `d[r * R..][..R]` (a panel of `R`
    /// output rows), its input values `x[r * stride..][..NR]` (a strip of [`NR`] columns).
    #[inline(always)]
    pub(super) fn sum(&mut self, d: &[f32], x: &[f32], stride: usize) -> [[f32; NR]; R] {
        // SAFETY: a `TileSums` is only made on a CPU with AVX-512F (`with_avx512`).
        unsafe { tile(self.program, d, x, stride, &mut self.stack) }
    }
}

/// The program for one tile. With `R` = [`PAIR_MR`], a pair of leaves ([`pairs`]) keeps the
/// left one's sum in registers while the right one's is made, and adds them there: the same
/// operations in the same order as pushing the left sum and popping it at once.
#[target_feature(enable = "avx512f")]
fn tile<const R: usize>(
    program: &TreeProgram,
    d: &[f32],
    x: &[f32],
    stride: usize,
    stack: &mut [Acc<R>],
) -> [[f32; NR]; R] {
    let fuse_pairs = R <= PAIR_MR;
    let mut top = 0;
    let mut acc: Acc<R> = [[_mm512_setzero_ps(); V]; R];
    let mut steps = program.leaf_steps().peekable();
    let mut first = true;
    while let Some((rows, mut adds)) = steps.next() {
        if !first {
            // The previous sum waits for its right neighbour.
            stack[top] = acc;
            top += 1;
        }
        first = false;
        acc = leaf_sum(d, x, stride, rows);
        if fuse_pairs
            && adds == 0
            && let Some((right, right_adds)) = steps.next_if(|(_, adds)| *adds >= 1)
        {
            let left = acc;
            acc = leaf_sum(d, x, stride, right);
            add_into(&mut acc, &left);
            adds = right_adds - 1;
        }
        for _ in 0..adds {
            top -= 1;
            add_into(&mut acc, &stack[top]);
        }
    }
    debug_assert_eq!(top, 0, "a tree sum leaves one value");
    let mut out = [[0.0f32; NR]; R];
    for (row, acc) in out.iter_mut().zip(acc) {
        for (part, acc) in row.chunks_exact_mut(16).zip(acc) {
            let part: &mut [f32; 16] = part.try_into().expect("16 values");
            // SAFETY: `part` is 16 f32 values, the 64 bytes an unaligned store writes.
            unsafe { _mm512_storeu_ps(part.as_mut_ptr(), acc) };
        }
    }
    out
}

/// One leaf's sum from zero: `acc = fma(delta, input, acc)` over its rows in order.
#[target_feature(enable = "avx512f")]
#[inline]
fn leaf_sum<const R: usize>(d: &[f32], x: &[f32], stride: usize, rows: Range<usize>) -> Acc<R> {
    let mut acc: Acc<R> = [[_mm512_setzero_ps(); V]; R];
    let (lo, hi) = (rows.start, rows.end);
    for (d, r) in d[lo * R..hi * R].chunks_exact(R).zip(lo..hi) {
        let x: &[f32; NR] = x[r * stride..][..NR].try_into().expect("NR values");
        let x: [__m512; V] = std::array::from_fn(|v| {
            let x: &[f32; 16] = x[v * 16..][..16].try_into().expect("16 values");
            // SAFETY: `x` is 16 f32 values, the 64 bytes an unaligned load reads.
            unsafe { _mm512_loadu_ps(x.as_ptr()) }
        });
        for (acc, &d) in acc.iter_mut().zip(d) {
            let d = _mm512_set1_ps(d);
            for (acc, &x) in acc.iter_mut().zip(&x) {
                *acc = _mm512_fmadd_ps(d, x, *acc);
            }
        }
    }
    acc
}

/// `right = left + right`, the tree's addition (operands in that order).
#[target_feature(enable = "avx512f")]
#[inline]
fn add_into<const R: usize>(right: &mut Acc<R>, left: &Acc<R>) {
    for (right, left) in right.iter_mut().zip(left) {
        for (right, &left) in right.iter_mut().zip(left) {
            *right = _mm512_add_ps(left, *right);
        }
    }
}
