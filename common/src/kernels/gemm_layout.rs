//! Which of our own GEMM kernels' two layouts a product has (`gemm_avx512.rs`, `gemm_avx2.rs`):
//! the checks both make before they form pointers from ndarray views.

use ndarray::{ArrayView2, ArrayViewMut2};

/// `matrixmultiply`'s block of the inner dimension for f32 (`archparam::S_KC`): both kernels cut
/// every sum at these boundaries, so it decides their bits.
pub(super) const KC: usize = 256;

/// A product `c (+)= a b` in a layout the kernels take, with its dimensions and leading strides
/// (in `f32`s): `a: [m, k]` and `c: [m, n]` with contiguous rows of strides `lda` and `ldc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    /// `b = W^T` with `W: [n, k]` in contiguous rows of stride `ldw` (a layer's weight in
    /// `x W^T`), and `lda`, `ldc` times the kernel's strip width within `i32` (its gathers reach
    /// that many rows ahead with `i32` offsets).
    ATimesWT { lda: usize, ldw: usize, ldc: usize },
    /// `b: [k, n]` in contiguous rows of stride `ldb`.
    ATimesB { lda: usize, ldb: usize, ldc: usize },
}

/// The layout of `c (+)= a b`, or `None` when it is neither (or empty). `strip` is the kernel's
/// strip width, for the `i32` offsets of [`Layout::ATimesWT`].
///
/// # Panics
/// If the shapes do not agree: this is reachable from safe code (`Float::product_fast_path`), and
/// the kernels trust these shapes.
pub(super) fn layout(
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    c: &ArrayViewMut2<f32>,
    strip: usize,
) -> Option<Layout> {
    let ((m, k), n) = (a.dim(), b.ncols());
    assert_eq!((b.nrows(), c.dim()), (k, (m, n)), "product shapes");
    if m == 0 || n == 0 || k == 0 {
        return None;
    }
    // A stride matters only along an axis longer than one (ndarray may give a length-1 axis
    // stride 0).
    let unit = |len: usize, stride: isize| len == 1 || stride == 1;
    let leading = |len: usize, stride: isize, min: usize| match len {
        1 => Some(min),
        _ => usize::try_from(stride).ok().filter(|&ld| ld >= min),
    };
    let (Some(lda), true) = (leading(m, a.strides()[0], k), unit(k, a.strides()[1])) else {
        return None;
    };
    let (Some(ldc), true) = (leading(m, c.strides()[0], n), unit(n, c.strides()[1])) else {
        return None;
    };
    let fits = |ld: usize| {
        ld.checked_mul(strip)
            .is_some_and(|v| v <= i32::MAX as usize)
    };
    let [rsb, csb] = [b.strides()[0], b.strides()[1]];
    if let (true, Some(ldw), true) = (unit(k, rsb), leading(n, csb, k), fits(lda) && fits(ldc)) {
        Some(Layout::ATimesWT { lda, ldw, ldc })
    } else if let (true, Some(ldb)) = (unit(n, csb), leading(k, rsb, n)) {
        Some(Layout::ATimesB { lda, ldb, ldc })
    } else {
        None
    }
}

/// Inputs and bit patterns for both kernels' tests.
#[cfg(test)]
pub(super) mod test_arrays {
    use ndarray::{Array2, ArrayView2, ArrayViewMut2, s};

    use super::{Layout, layout};

    /// A `rows x cols` array of values in [-0.5, 0.5) from a xorshift seeded by `salt`.
    pub(in super::super) fn filled(rows: usize, cols: usize, salt: u64) -> Array2<f32> {
        let mut state = salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        Array2::from_shape_fn((rows, cols), |_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
    }

    pub(in super::super) fn bits(c: &Array2<f32>) -> Vec<u32> {
        c.iter().map(|v| v.to_bits()).collect()
    }

    /// A kernel's `sgemm`: `c = a b` (or `c += a b`), `false` (touching nothing) where declined.
    pub(in super::super) type Sgemm =
        fn(&ArrayView2<f32>, &ArrayView2<f32>, bool, &mut ArrayViewMut2<f32>) -> bool;

    /// Checks `sgemm` against `matrixmultiply` over `shapes` (`(m, k, n)`): both layouts of `b`,
    /// views cut out of wider arrays (row strides exceed row lengths), overwrite and accumulate,
    /// `c` inside NaN margins. The same bits where it takes the product, `c` left alone where it
    /// declines; it must take all but an `x W^T` with `k` below `short_k` (`nr`: its tiles' width).
    pub(in super::super) fn assert_same_bits_as_matrixmultiply(
        sgemm: Sgemm,
        nr: usize,
        short_k: usize,
        shapes: &[(usize, usize, usize)],
    ) {
        for (salt, &(m, k, n)) in shapes.iter().enumerate() {
            let salt = salt as u64;
            let a_full = filled(m, k + 3, salt);
            let a = a_full.slice(s![.., 1..k + 1]);
            let w_full = filled(n, k + 5, salt + 100);
            let b_rows_full = filled(k, n + 7, salt + 200);
            let cases = [
                ("a w^T", w_full.slice(s![.., 2..k + 2]).reversed_axes()),
                ("a b", b_rows_full.slice(s![.., 3..n + 3])),
            ];
            for (name, b) in cases {
                for accumulate in [false, true] {
                    let case = format!("{name} {m}x{k}x{n} acc {accumulate}");
                    // `c` inside NaN margins: 2 columns left, 4 right.
                    let mut start = Array2::from_elem((m, n + 6), f32::NAN);
                    if accumulate {
                        start
                            .slice_mut(s![.., 2..n + 2])
                            .assign(&filled(m, n, salt + 300));
                    }
                    let mut want = start.clone();
                    let beta = if accumulate { 1.0 } else { 0.0 };
                    let mut want_c = want.slice_mut(s![.., 2..n + 2]);
                    ndarray::linalg::general_mat_mul(1.0, &a, &b, beta, &mut want_c);
                    let mut got = start.clone();
                    let mut c = got.slice_mut(s![.., 2..n + 2]);
                    // (With `k` = 1 both cases have the `x W^T` layout.)
                    let w_t = matches!(layout(&a, &b, &c, nr), Some(Layout::ATimesWT { .. }));
                    let taken = sgemm(&a, &b, accumulate, &mut c);
                    assert_eq!(taken, !w_t || k >= short_k, "{case}: taken");
                    if taken {
                        assert_eq!(bits(&got), bits(&want), "{case}");
                    } else {
                        assert_eq!(bits(&got), bits(&start), "{case}: left alone");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn layouts_are_told_apart_and_others_declined() {
        let a = Array2::<f32>::zeros((4, 6));
        let w = Array2::<f32>::zeros((5, 6));
        let b = Array2::<f32>::zeros((6, 5));
        let mut c = Array2::<f32>::zeros((4, 5));
        assert_eq!(
            layout(&a.view(), &w.t(), &c.view_mut(), 16),
            Some(Layout::ATimesWT {
                lda: 6,
                ldw: 6,
                ldc: 5
            })
        );
        assert_eq!(
            layout(&a.view(), &b.view(), &c.view_mut(), 16),
            Some(Layout::ATimesB {
                lda: 6,
                ldb: 5,
                ldc: 5
            })
        );
        // `a` by columns, `c` by columns, `b` with neither unit stride: none.
        let a_t = Array2::<f32>::zeros((6, 4));
        assert_eq!(layout(&a_t.t(), &b.view(), &c.view_mut(), 16), None);
        let mut c_t = Array2::<f32>::zeros((5, 4));
        assert_eq!(
            layout(&a.view(), &b.view(), &c_t.view_mut().reversed_axes(), 16),
            None
        );
        let b_wide = Array2::<f32>::zeros((6, 10));
        let strided = b_wide.slice(ndarray::s![.., ..;2]);
        assert_eq!(layout(&a.view(), &strided, &c.view_mut(), 16), None);
        // Empty products: none.
        let (a0, b0, mut c0) = (
            Array2::<f32>::zeros((4, 0)),
            Array2::<f32>::zeros((0, 5)),
            Array2::<f32>::zeros((4, 5)),
        );
        assert_eq!(layout(&a0.view(), &b0.view(), &c0.view_mut(), 16), None);
    }

    #[test]
    #[should_panic(expected = "product shapes")]
    fn shapes_that_disagree_panic() {
        let a = Array2::<f32>::zeros((4, 6));
        let b = Array2::<f32>::zeros((7, 5));
        let mut c = Array2::<f32>::zeros((4, 5));
        layout(&a.view(), &b.view(), &c.view_mut(), 16);
    }
}
