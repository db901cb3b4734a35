//! The GEMMs and column sums the engine needs, deterministic for any thread count.
//!
//! Every result here is a pure function of the inputs' shapes and values: work is split at
//! boundaries computed from the shapes alone (never from the number of threads), and no reduction
//! dimension is ever split. Threads only decide *who* computes a piece, never *what* the piece is,
//! so a rayon pool of 1, 2 or 8 threads produces the same bits (tested in `tests/determinism.rs`).
//!
//! Each piece is one single-threaded call: to `ndarray::linalg::general_mat_mul`, i.e. the
//! `matrixmultiply` crate, or on AVX-512 and AVX2 CPUs to kernels of our own (below). Measured on
//! this project's machine (2 cores, AMD EPYC family 26, i.e. Zen 5 *with* AVX-512, unlike the
//! Zen 3 of docs/design.md §4), f32, the five large products of a 784-400-20 VAE step at batch
//! 128 (~400 MFLOP), quiet machine:
//!
//! | kernel                                             | 1 thread | 2 threads |
//! |----------------------------------------------------|----------|-----------|
//! | matrixmultiply 0.3 (AVX-512 kernel), one call      | 1.9 ms   | (single-threaded per call) |
//! | matrixmultiply, fixed pieces of >= 192 (this file) | 2.1 ms   | 1.08 ms   |
//! | `gemm` 0.19, `Parallelism::None` / `Rayon(2)`      | 3.2 ms   | 1.65 ms   |
//! | `gemm` 0.19, fixed pieces                          | 3.3 ms   | 1.72 ms   |
//!
//! `gemm` 0.19 uses AVX2 only on stable Rust (its AVX-512 path needs its `nightly` feature), so on
//! this CPU `matrixmultiply` is ~1.6x faster; on an AVX2-only CPU `gemm` was ~10% faster per call
//! (docs/design.md §4). `gemm`'s own `Rayon(n)` split gave bit-identical results for 1, 2, 3 and 8
//! threads on these shapes (it splits output tiles only; its k-blocking ignores the thread count),
//! so it would be an acceptable choice there. We keep `matrixmultiply`: safe to call through
//! ndarray, faster here, and every piece's result is independent of any thread setting.
//! `matrixmultiply` needs its default `avx512` feature, which ndarray turns off: `common` depends
//! on it directly to turn it back on.
//!
//! On AVX-512 CPUs, and on CPUs with AVX2 and FMA, the engine's f32 pieces (`alpha` 1, `beta` 0
//! or 1, rows contiguous) go to kernels of our own instead (`gemm_avx512.rs`, `gemm_avx2.rs`),
//! which do not re-pack the weights for every piece, and give `matrixmultiply`'s bits exactly.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use crate::kernels::Float;

/// Products below this many flops run as one call: a rayon split costs a few microseconds.
const SPLIT_MIN_FLOPS: usize = 6 << 20;

/// Target flops per piece of a split product.
const PIECE_FLOPS: usize = 16 << 20;

/// At most this many pieces per product.
const MAX_PIECES: usize = 8;

/// Pieces are at least this long along the split side. Every piece re-packs the other operand
/// (`matrixmultiply` packs both operands per call), which at ~250 GFLOP/s per core costs
/// ~ (pieces / split length) x 10-20 of the product's time: short pieces spend more time packing
/// than multiplying. 192 gives 2 pieces of a 400-wide product and 4 of a 784-wide one.
/// (Measured with `matrixmultiply`; the AVX-512 kernels pack only a 32-row strip of `x`.)
const MIN_PIECE_LEN: usize = 192;

/// Piece lengths are multiples of this (the AVX-512 sgemm micro-kernel is 16 x 16).
const PIECE_ALIGN: usize = 16;

/// Column-sum work (rows * cols) below which one thread does it all.
const PARALLEL_COLSUM_MIN: usize = 1 << 15;

/// Columns per piece of a parallel column sum.
const COLSUM_PIECE: usize = 128;

/// `c = alpha * a b + beta * c` for `a: [m, k]`, `b: [k, n]`, `c: [m, n]` (any strides). When
/// `beta` is zero `c` is not read, so it may hold anything.
///
/// Large products are cut into pieces along `c`'s longer side (columns of `b` and `c`, or rows of
/// `a` and `c`), sized from the shape alone, and the pieces run on the current rayon pool.
///
/// # Panics
/// If the shapes do not agree.
pub fn gemm<T: Float>(alpha: T, a: ArrayView2<T>, b: ArrayView2<T>, beta: T, c: ArrayViewMut2<T>) {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert!(
        k == k2 && c.dim() == (m, n),
        "gemm shapes: a {:?}, b {:?}, c {:?}",
        a.dim(),
        b.dim(),
        c.dim()
    );
    let mut c = c;
    let (axis, len) = if n >= m { (Axis(1), n) } else { (Axis(0), m) };
    let chunk = piece_len(m, n, k, len);
    if chunk >= len {
        product(alpha, &a, &b, beta, &mut c);
        return;
    }
    if axis == Axis(1) {
        let pieces: Vec<_> = b
            .axis_chunks_iter(Axis(1), chunk)
            .zip(c.axis_chunks_iter_mut(Axis(1), chunk))
            .collect();
        pieces
            .into_par_iter()
            .for_each(|(b, mut c)| product(alpha, &a, &b, beta, &mut c));
    } else {
        let pieces: Vec<_> = a
            .axis_chunks_iter(Axis(0), chunk)
            .zip(c.axis_chunks_iter_mut(Axis(0), chunk))
            .collect();
        pieces
            .into_par_iter()
            .for_each(|(a, mut c)| product(alpha, &a, &b, beta, &mut c));
    }
}

/// One piece: the type's own kernel where it has one for this case (f32 on AVX-512 or AVX2, `alpha`
/// 1, `beta` 0 or 1: the engine's products), else `matrixmultiply`. Both give the same bits.
fn product<T: Float>(
    alpha: T,
    a: &ArrayView2<T>,
    b: &ArrayView2<T>,
    beta: T,
    c: &mut ArrayViewMut2<T>,
) {
    let accumulate = beta == T::one();
    let fast = alpha == T::one() && (accumulate || beta == T::zero());
    if !(fast && T::product_fast_path(a, b, accumulate, c)) {
        general_mat_mul(alpha, a, b, beta, c);
    }
}

/// Length of a piece along the split side of an `[m, n]` result with inner dimension `k`, from the
/// shape alone. Returns `len` (no split) for small products.
fn piece_len(m: usize, n: usize, k: usize, len: usize) -> usize {
    let flops = 2 * m * n * k;
    if flops < SPLIT_MIN_FLOPS || len < 2 * MIN_PIECE_LEN {
        return len;
    }
    let pieces = (flops / PIECE_FLOPS)
        .clamp(2, MAX_PIECES)
        .min(len / MIN_PIECE_LEN);
    len.div_ceil(pieces).next_multiple_of(PIECE_ALIGN)
}

/// `out[j] = sum_r a[r, j]` for a row-major `a: [rows, cols]`, rows added in order `0..rows`
/// (parallel over fixed column pieces, so the order never changes).
pub fn colsum_into<T: Float>(a: &[T], cols: usize, out: &mut [T]) {
    assert_eq!(out.len(), cols, "colsum output length");
    assert_eq!(a.len() % cols.max(1), 0, "colsum input is not whole rows");
    let kernel = |j0: usize, out: &mut [T]| {
        out.fill(T::zero());
        let w = out.len();
        for row in a.chunks_exact(cols) {
            for (o, &v) in out.iter_mut().zip(&row[j0..j0 + w]) {
                *o = *o + v;
            }
        }
    };
    if a.len() < PARALLEL_COLSUM_MIN {
        kernel(0, out);
    } else {
        out.par_chunks_mut(COLSUM_PIECE)
            .enumerate()
            .for_each(|(p, out)| kernel(p * COLSUM_PIECE, out));
    }
}

/// A row-major `[rows, cols]` view of the first `rows * cols` values of `buf`.
pub(crate) fn view<T>(buf: &[T], rows: usize, cols: usize) -> ArrayView2<'_, T> {
    ArrayView2::from_shape((rows, cols), &buf[..rows * cols]).expect("buffer holds rows * cols")
}

/// A mutable row-major `[rows, cols]` view of the first `rows * cols` values of `buf`.
pub(crate) fn view_mut<T>(buf: &mut [T], rows: usize, cols: usize) -> ArrayViewMut2<'_, T> {
    ArrayViewMut2::from_shape((rows, cols), &mut buf[..rows * cols])
        .expect("buffer holds rows * cols")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::relu_mask;
    use ndarray::Array2;

    fn filled(rows: usize, cols: usize, salt: usize) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            (((i * 131 + j * 71 + salt * 17) % 997) as f32 / 997.0) - 0.5
        })
    }

    fn naive(a: &Array2<f32>, b: &Array2<f32>) -> Array2<f64> {
        let (m, k) = a.dim();
        let n = b.ncols();
        Array2::from_shape_fn((m, n), |(i, j)| {
            (0..k).map(|p| a[[i, p]] as f64 * b[[p, j]] as f64).sum()
        })
    }

    #[test]
    fn split_products_are_correct_and_thread_count_independent() {
        // Shapes that split along columns, along rows, and not at all; transposed operands too.
        for &(m, k, n) in &[(128, 784, 400), (784, 128, 400), (400, 128, 784), (7, 5, 3)] {
            let a = filled(m, k, 1);
            let bt = filled(n, k, 2); // b = bt^T, a transposed view as in y = x W^T
            let want = naive(&a, &bt.t().to_owned());
            let mut results = Vec::new();
            for threads in [1, 2, 8] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut c = Array2::<f32>::from_elem((m, n), f32::NAN);
                pool.install(|| gemm(1.0, a.view(), bt.t(), 0.0, c.view_mut()));
                results.push(c);
            }
            for c in &results {
                for (got, want) in c.iter().zip(want.iter()) {
                    assert!((*got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
                }
            }
            let bits = |c: &Array2<f32>| c.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&results[0]), bits(&results[1]), "{m}x{k}x{n}");
            assert_eq!(bits(&results[0]), bits(&results[2]), "{m}x{k}x{n}");
        }
    }

    /// Through the split and the dispatch to our kernels where the CPU has them: the engine's
    /// products give `matrixmultiply`'s bits, as one call.
    #[test]
    fn split_products_give_matrixmultiplys_bits() {
        for &(m, k, n) in &[
            (128, 784, 400),
            (128, 400, 784),
            (32, 784, 400),
            (128, 20, 400),
        ] {
            let a = filled(m, k, 3);
            let w = filled(n, k, 4); // forward: x W^T
            let b = filled(k, n, 5); // backward: delta W
            let bits = |c: &Array2<f32>| c.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            for (b, beta) in [(w.t(), 0.0), (b.view(), 0.0), (b.view(), 1.0)] {
                let start = filled(m, n, 6);
                let mut want = start.clone();
                general_mat_mul(1.0, &a, &b, beta, &mut want);
                let mut got = start.clone();
                gemm(1.0, a.view(), b, beta, got.view_mut());
                assert_eq!(bits(&got), bits(&want), "{m}x{k}x{n} beta {beta}");
            }
        }
    }

    #[test]
    fn beta_accumulates() {
        let a = filled(3, 4, 1);
        let b = filled(4, 2, 2);
        let mut c = Array2::<f32>::ones((3, 2));
        gemm(2.0, a.view(), b.view(), 1.0, c.view_mut());
        let want = naive(&a, &b);
        for (got, want) in c.iter().zip(want.iter()) {
            assert!((*got as f64 - (2.0 * want + 1.0)).abs() < 1e-5);
        }
    }

    #[test]
    fn column_sums_and_relu_backward() {
        for &(rows, cols) in &[(3, 5), (300, 400)] {
            let a = filled(rows, cols, 3);
            let mut out = vec![0.0f32; cols];
            colsum_into(a.as_slice().unwrap(), cols, &mut out);
            for j in 0..cols {
                let mut want = 0.0f32;
                for r in 0..rows {
                    want += a[[r, j]];
                }
                assert_eq!(out[j].to_bits(), want.to_bits(), "column {j}");
            }

            let act = filled(rows, cols, 4);
            let mut d = a.clone();
            relu_mask(d.as_slice_mut().unwrap(), act.as_slice().unwrap());
            for ((dv, av), orig) in d.iter().zip(act.iter()).zip(a.iter()) {
                assert_eq!(*dv, if *av > 0.0 { *orig } else { 0.0 });
            }
        }
    }

    /// docs/design.md §2 relies on this: a row of a product does not depend on which other rows
    /// are computed with it (how many, or where the piece boundaries fall), so the engine may
    /// batch the rows of several shards. Holds for matrixmultiply by construction (every element is
    /// the same FMA chain over fixed k-blocks, edge tiles included); checked here for the
    /// operand layouts the engine uses: `x W^T` and `delta W`.
    #[test]
    fn a_row_of_a_product_does_not_depend_on_the_other_rows() {
        use ndarray::s;
        let m = 300;
        for &(k, n) in &[
            (20, 400),
            (400, 784),
            (784, 400),
            (400, 20),
            (784, 20),
            (20, 784),
        ] {
            let wt = filled(n, k, 5);
            let x = filled(m, k, 6);
            let delta = filled(m, n, 7);
            let mut fwd = Array2::<f32>::zeros((m, n));
            gemm(1.0, x.view(), wt.t(), 0.0, fwd.view_mut());
            let mut bwd = Array2::<f32>::zeros((m, k));
            gemm(1.0, delta.view(), wt.view(), 0.0, bwd.view_mut());
            for &(r0, r1) in &[
                (0, 1),
                (5, 12),
                (0, 8),
                (16, 24),
                (100, 228),
                (0, 128),
                (3, 300),
            ] {
                let mut part = Array2::<f32>::zeros((r1 - r0, n));
                gemm(1.0, x.slice(s![r0..r1, ..]), wt.t(), 0.0, part.view_mut());
                let want = fwd.slice(s![r0..r1, ..]);
                assert!(
                    part.iter()
                        .zip(want.iter())
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "x W^T, k={k} n={n}, rows {r0}..{r1}"
                );
                let mut part = Array2::<f32>::zeros((r1 - r0, k));
                gemm(
                    1.0,
                    delta.slice(s![r0..r1, ..]),
                    wt.view(),
                    0.0,
                    part.view_mut(),
                );
                let want = bwd.slice(s![r0..r1, ..]);
                assert!(
                    part.iter()
                        .zip(want.iter())
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "delta W, k={k} n={n}, rows {r0}..{r1}"
                );
            }
        }
    }
}
