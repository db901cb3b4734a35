//! Which of our own GEMM kernels' two layouts a product has (`gemm_avx512.rs`, `gemm_avx2.rs`):
//! the checks both make before they form pointers from ndarray views.

use ndarray::{ArrayView2, ArrayViewMut2};

/// A product `c (+)= a b` in a layout the kernels take, with its dimensions and leading strides
/// (in `f32`s): `a: [m, k]` and `c: [m, n]` with contiguous rows of strides `lda` and `ldc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    /// `b = W^T` with `W: [n, k]` in contiguous rows of stride `ldw` (a layer's weight in
    /// `x W^T`), and `lda`, `ldc` times the kernel's strip width within `i32` (its gathers and
    /// scatters reach that many rows ahead with `i32` offsets).
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
