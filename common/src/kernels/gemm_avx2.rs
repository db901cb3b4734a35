//! The engine's large f32 products on CPUs with AVX2 and FMA but not AVX-512, written with
//! intrinsics, giving `matrixmultiply`'s bits exactly: `gemm_avx512.rs`'s two kernels at half the
//! vector width.
//!
//! Why: `matrixmultiply` packs both operands for every piece of a product (see
//! `gemm_avx512.rs`), and its AVX2 micro-kernel is 8 x 8: eight accumulators, just enough to hide
//! the multiply-add's latency. These kernels run 6 x 16 tiles (twelve accumulators, two vector
//! loads and six broadcasts per twelve multiply-adds, in the sixteen `ymm` registers). `x W^T`
//! reads `W` in place and packs only a 16-row strip of `x`; `delta W` packs `W` 16 columns by 256
//! rows at a time (16 KiB, used by every tile of the strip), which measured faster on Zen 3 than
//! reading it in place, and never packs `delta`. Measured in docs/scaling.md §35: 6-12% faster
//! than `matrixmultiply` per product at 128 rows, 5-9% a training step.
//!
//! Bits: as in `gemm_avx512.rs`, every output element gets `matrixmultiply`'s operations in its
//! order: the inner dimension cut into blocks of [`KC`] from the start, each block's sum from zero
//! with one fused multiply-add per step in order, later blocks' sums added to the first's (or the
//! first added to `c` when accumulating). `matrixmultiply`'s AVX2 kernel (`kernel_target_fma`)
//! does the same, and stores a first block's sum as `1 * sum + 0`, which turns a sum of -0.0 into
//! +0.0: so do we. (Where `c` is -0.0 and a later block's sum or an accumulated one is -0.0 too,
//! `matrixmultiply` gives -0.0 in whole tiles and +0.0 in partial ones; we give -0.0. A sum from
//! +0.0 is -0.0 only when its nonzero products all underflow. And where two NaNs meet, which
//! survives may differ; any NaN stays a NaN.) The tests compare the bits with `matrixmultiply` on this CPU.
//!
//! Unsafe: the `#[target_feature]` functions are called only after `is_x86_feature_detected!`
//! found AVX2 and FMA. Pointers are formed from views whose shapes and strides
//! [`super::gemm_layout::layout`] checked, and every access is inside the view: vector loads and
//! stores of `b` and `c` rows only for whole 16-column strips, masked loads and stores (masked-off
//! lanes are not accessed) for partial ones; in `x W^T`, loads of 8 values from whole strips' rows
//! of `x`, masked gathers of `x` and `c` elsewhere, and stores of `c` as six values of a row of a
//! whole tile or one value; gather offsets fit in `i32` (checked).
#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m256, __m256i, _mm_castps_si128, _mm_storel_epi64, _mm_storeu_ps, _mm256_add_epi32,
    _mm256_add_ps, _mm256_castps256_ps128, _mm256_castsi256_ps, _mm256_cmpgt_epi32,
    _mm256_extractf128_ps, _mm256_fmadd_ps, _mm256_load_ps, _mm256_loadu_ps,
    _mm256_mask_i32gather_ps, _mm256_maskload_ps, _mm256_maskstore_ps, _mm256_mullo_epi32,
    _mm256_permute2f128_ps, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setr_epi32,
    _mm256_setzero_ps, _mm256_shuffle_ps, _mm256_store_ps, _mm256_storeu_ps, _mm256_unpackhi_ps,
    _mm256_unpacklo_ps,
};

use ndarray::{ArrayView2, ArrayViewMut2};

use super::gemm_layout::{KC, Layout, layout};

/// Columns of a tile's vector side: two `ymm` registers.
const NR: usize = 16;
/// Rows of a tile's broadcast side: 12 accumulators, two vectors, one broadcast (15 registers).
const MR: usize = 6;

/// Inner dimensions below this go to `matrixmultiply` in the `x W^T` layout (see [`sgemm`]).
const SHORT_K: usize = 64;

/// A 32-byte-aligned block of floats for packed operands and tiles.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
struct Line([f32; 8]);

/// `c = a b` (or `c += a b` when `accumulate`) for f32 views, with `matrixmultiply`'s bits.
/// Returns `false`, touching nothing, when this CPU lacks AVX2 or FMA, has AVX-512F (its own
/// kernels, `gemm_avx512.rs`, take what they can and `matrixmultiply` the rest, as before these
/// existed), or the layout is not one these kernels take: `a` and `c` with contiguous rows, `b`
/// with contiguous rows or columns.
pub(super) fn sgemm(
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    accumulate: bool,
    c: &mut ArrayViewMut2<f32>,
) -> bool {
    !std::arch::is_x86_feature_detected!("avx512f") && sgemm_on_any_avx2(a, b, accumulate, c)
}

/// [`sgemm`], on AVX-512 CPUs too (the tests compare these kernels' bits there as well).
fn sgemm_on_any_avx2(
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    accumulate: bool,
    c: &mut ArrayViewMut2<f32>,
) -> bool {
    let ((m, k), n) = (a.dim(), b.ncols());
    let Some(layout) = layout(a, b, c, NR) else {
        return false;
    };
    use std::arch::is_x86_feature_detected as has;
    if !(has!("avx2") && has!("fma")) {
        return false;
    }
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    match layout {
        // Each tile's 96 results are stored transposed (AVX2 has no scatter); over a short inner
        // dimension (the decoder's first layer, `k` = the latent size) that outweighs the tile's
        // sums, and `matrixmultiply` is faster (docs/scaling.md §35; still 0.84-0.92 of its speed
        // at `k` = 20 with whole tiles stored by rows, §37).
        Layout::ATimesWT { .. } if k < SHORT_K => return false,
        Layout::ATimesWT { lda, ldw, ldc } => {
            // SAFETY: AVX2 and FMA are present; the views hold every element the kernel reads
            // and writes (checked by `layout`).
            unsafe { a_times_w_t(m, k, n, a, lda, b, ldw, c, ldc, accumulate) }
        }
        // SAFETY: as above.
        Layout::ATimesB { lda, ldb, ldc } => unsafe {
            a_times_b(m, k, n, a, lda, b, ldb, c, ldc, accumulate)
        },
    }
    true
}

/// Lane mask of the first `len` of 8 lanes (all lanes for `len >= 8`): lanes with the high bit
/// set are read and written by `maskload` and `maskstore`, and gathered.
#[target_feature(enable = "avx2")]
fn mask(len: usize) -> __m256i {
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(len.min(8) as i32), lane)
}

/// The masks of a 16-wide strip of which the first `width` lanes are real.
#[target_feature(enable = "avx2")]
fn strip_masks(width: usize) -> [__m256i; 2] {
    [mask(width), mask(width.saturating_sub(8))]
}

/// Offsets `0, ld, 2 ld, ..` of the 16 lanes of a strip, in units of `f32`.
#[target_feature(enable = "avx2")]
fn lane_offsets(ld: usize) -> [__m256i; 2] {
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let low = _mm256_mullo_epi32(lane, _mm256_set1_epi32(ld as i32));
    [
        low,
        _mm256_add_epi32(low, _mm256_set1_epi32((8 * ld) as i32)),
    ]
}

/// The sums of one block of the inner dimension for `R` broadcast rows x 16 vector columns:
/// `acc[r] = sum_p left[r * ldl + p] * right[p * ldr ..][..16]`, `p` in `0..kc` in order, from
/// zero, one fused multiply-add per step. `right` holds 16 readable values per row (padded with
/// zeros where the strip is partial).
#[inline(always)]
unsafe fn block_sums<const R: usize>(
    kc: usize,
    left: *const f32,
    ldl: usize,
    right: *const f32,
    ldr: usize,
) -> [[__m256; 2]; R] {
    // SAFETY (caller): AVX2 and FMA are present.
    let mut acc = [[unsafe { _mm256_setzero_ps() }; 2]; R];
    for p in 0..kc {
        // SAFETY (caller): rows `0..R` of `left` hold `kc` values; `right` holds `kc` rows of 16
        // values.
        unsafe {
            let r0 = _mm256_loadu_ps(right.add(p * ldr));
            let r1 = _mm256_loadu_ps(right.add(p * ldr + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let l = _mm256_set1_ps(*left.add(r * ldl + p));
                acc[0] = _mm256_fmadd_ps(l, r0, acc[0]);
                acc[1] = _mm256_fmadd_ps(l, r1, acc[1]);
            }
        }
    }
    acc
}

/// Calls `$body` with `$r` a constant equal to `$rows` (1..=MR), so each tile height gets its own
/// unrolled kernel.
macro_rules! with_rows {
    ($rows:expr, $r:ident => $body:expr) => {
        match $rows {
            1 => {
                const $r: usize = 1;
                $body
            }
            2 => {
                const $r: usize = 2;
                $body
            }
            3 => {
                const $r: usize = 3;
                $body
            }
            4 => {
                const $r: usize = 4;
                $body
            }
            5 => {
                const $r: usize = 5;
                $body
            }
            _ => {
                const $r: usize = MR;
                $body
            }
        }
    };
}

/// `c (+)= a b`, `b: [k, n]` with rows of stride `ldb`: `a`'s values broadcast (rows in place)
/// against 16-column strips of `b`'s rows, packed a block at a time (masked where partial).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn a_times_b(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut packed = vec![Line([0.0; 8]); 2 * KC];
    let packed: *mut f32 = packed.as_mut_ptr().cast();
    for j0 in (0..n).step_by(NR) {
        let width = (n - j0).min(NR);
        let masks = strip_masks(width);
        for k0 in (0..k).step_by(KC) {
            let kc = (k - k0).min(KC);
            // SAFETY: rows k0..k0 + kc of b hold columns j0..j0 + width; the pack holds 16 x KC.
            let (right, ldr) = unsafe {
                let strip = b.add(k0 * ldb + j0);
                for p in 0..kc {
                    let row = strip.add(p * ldb);
                    for (v, &mask) in masks.iter().enumerate() {
                        // `wrapping_add`: past a short last row it points beyond `b`, and
                        // the mask (then empty) keeps it from being read.
                        let part = if width == NR {
                            _mm256_loadu_ps(row.add(8 * v))
                        } else {
                            _mm256_maskload_ps(row.wrapping_add(8 * v), mask)
                        };
                        _mm256_store_ps(packed.add(p * NR + 8 * v), part);
                    }
                }
                (packed.cast_const(), NR)
            };
            let add = accumulate || k0 > 0;
            for i0 in (0..m).step_by(MR) {
                let rows = (m - i0).min(MR);
                // SAFETY: rows i0..i0 + rows of a hold columns k0..k0 + kc; of c, the strip.
                unsafe {
                    let left = a.add(i0 * lda + k0);
                    let out = c.add(i0 * ldc + j0);
                    with_rows!(rows, R => {
                        let acc = block_sums::<R>(kc, left, lda, right, ldr);
                        for (r, acc) in acc.iter().enumerate() {
                            let row = out.add(r * ldc);
                            for (v, (&sum, &mask)) in acc.iter().zip(&masks).enumerate() {
                                // `wrapping_add`: as for the pack above.
                                let at = row.wrapping_add(8 * v);
                                // Overwriting: `sum + 0` as `matrixmultiply` (-0.0 to +0.0).
                                let sum = match (add, width == NR) {
                                    (false, _) => _mm256_add_ps(sum, _mm256_setzero_ps()),
                                    (true, true) => _mm256_add_ps(_mm256_loadu_ps(at), sum),
                                    (true, false) => {
                                        _mm256_add_ps(_mm256_maskload_ps(at, mask), sum)
                                    }
                                };
                                if width == NR {
                                    _mm256_storeu_ps(at, sum);
                                } else {
                                    _mm256_maskstore_ps(at, mask, sum);
                                }
                            }
                        }
                    })
                }
            }
        }
    }
}

/// `packed[p * 16 + lane] = strip[lane * lda + p]` for `p` in `columns` and the lanes `masks`
/// select (zero in the others), two 8-lane gathers a column; `lanes` are the rows' offsets,
/// `lane_offsets(lda)`.
///
/// # Safety
/// AVX2 is present; the selected lanes' rows of `strip` hold the columns; `packed` holds 16
/// values for each column, 32-byte aligned.
#[target_feature(enable = "avx2")]
unsafe fn gather_columns(
    strip: *const f32,
    columns: std::ops::Range<usize>,
    lanes: [__m256i; 2],
    masks: [__m256i; 2],
    packed: *mut f32,
) {
    for p in columns {
        for v in 0..2 {
            // SAFETY (caller): as documented.
            unsafe {
                let g = _mm256_mask_i32gather_ps::<4>(
                    _mm256_setzero_ps(),
                    strip.add(p),
                    lanes[v],
                    _mm256_castsi256_ps(masks[v]),
                );
                _mm256_store_ps(packed.add(p * NR + 8 * v), g);
            }
        }
    }
}

/// [`gather_columns`] of all `k` columns of a whole 16-row strip, 8 x 8 blocks at a time loaded
/// by rows and transposed in registers (the last `k % 8` columns gathered): gathers of 8 lanes
/// run at a fraction of the rate of row loads and shuffles on Zen 3 (docs/scaling.md §37).
///
/// # Safety
/// AVX2 is present; the 16 rows of `strip`, `lda` apart, hold `k` values; `packed` holds `k` x 16
/// values, 32-byte aligned.
#[target_feature(enable = "avx2")]
unsafe fn pack_transposed(strip: *const f32, lda: usize, k: usize, packed: *mut f32) {
    let whole = k - k % 8;
    for p in (0..whole).step_by(8) {
        for half in 0..2 {
            // SAFETY (caller): rows 8 half..8 half + 8 hold columns p..p + 8; the pack holds
            // rows p..p + 8 of 16 values, stored at multiples of 8 values from its aligned start.
            unsafe {
                let row = |r: usize| _mm256_loadu_ps(strip.add((8 * half + r) * lda + p));
                let columns = transpose8(std::array::from_fn(row));
                for (j, column) in columns.into_iter().enumerate() {
                    _mm256_store_ps(packed.add((p + j) * NR + 8 * half), column);
                }
            }
        }
    }
    let (lanes, all) = (lane_offsets(lda), strip_masks(NR));
    // SAFETY (caller): as above, for the last columns.
    unsafe { gather_columns(strip, whole..k, lanes, all, packed) };
}

/// Stores a whole tile's sums (`MR` rows of 16 lanes, `tile[r * 16 + lane]`) into `c` transposed:
/// lane `lane`'s `MR` values to `c[lane * ldc..][..MR]`, six values in two stores a row instead of
/// one store each (docs/scaling.md §37).
///
/// # Safety
/// AVX2 is present; `tile` holds `MR` x 16 values, 32-byte aligned; rows `0..16` of `c`, `ldc`
/// apart, hold `MR` values each.
#[target_feature(enable = "avx2")]
unsafe fn store_whole_tile(tile: *const f32, c: *mut f32, ldc: usize) {
    const _: () = assert!(MR == 6, "rows stored as four values and two");
    for half in 0..2 {
        // SAFETY (caller): as documented.
        unsafe {
            let row = |r: usize| {
                if r < MR {
                    _mm256_load_ps(tile.add(r * NR + 8 * half))
                } else {
                    _mm256_setzero_ps()
                }
            };
            let lanes = transpose8(std::array::from_fn(row));
            for (l, values) in lanes.into_iter().enumerate() {
                let at = c.add((8 * half + l) * ldc);
                _mm_storeu_ps(at, _mm256_castps256_ps128(values));
                let high = _mm256_extractf128_ps::<1>(values);
                _mm_storel_epi64(at.add(4).cast(), _mm_castps_si128(high));
            }
        }
    }
}

/// The 8 x 8 transpose of rows `r`: lane `i` of the result's `j` is lane `j` of `r[i]`.
#[target_feature(enable = "avx2")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
    ]
}

/// `c (+)= a w^T`, `w: [n, k]` with rows of stride `ldw`, computed as `c^T = w a^T`: weights
/// broadcast in place against 16-row strips of `a`, packed transposed (`[k][16]`), once per strip.
/// A tile's sums are kept in an aligned scratch tile across blocks and stored into `c` once:
/// whole tiles transposed in registers, a row of `c` at a time ([`store_whole_tile`]), others one
/// value at a time (AVX2 has no scatter).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn a_times_w_t(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    lda: usize,
    w: *const f32,
    ldw: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut packed = vec![Line([0.0; 8]); 2 * k];
    let packed: *mut f32 = packed.as_mut_ptr().cast();
    let mut tile = [Line([0.0; 8]); 2 * MR];
    let tile: *mut f32 = tile.as_mut_ptr().cast();
    let a_lanes = lane_offsets(lda);
    let c_lanes = lane_offsets(ldc);
    for i0 in (0..m).step_by(NR) {
        let height = (m - i0).min(NR);
        let masks = strip_masks(height);
        // SAFETY: rows i0..i0 + height of a hold k values (masked-off lanes are not read); the
        // pack holds k x 16.
        unsafe {
            let strip = a.add(i0 * lda);
            if height == NR {
                pack_transposed(strip, lda, k, packed);
            } else {
                gather_columns(strip, 0..k, a_lanes, masks, packed);
            }
        }
        for j0 in (0..n).step_by(MR) {
            let rows = (n - j0).min(MR);
            // SAFETY: column j0 + r < n of rows i0..i0 + height of c; rows j0..j0 + rows of w.
            unsafe {
                let out = c.add(i0 * ldc + j0);
                with_rows!(rows, R => {
                    for k0 in (0..k).step_by(KC) {
                        let kc = (k - k0).min(KC);
                        let left = w.add(j0 * ldw + k0);
                        let acc = block_sums::<R>(kc, left, ldw, packed.add(k0 * NR), NR);
                        for (r, acc) in acc.iter().enumerate() {
                            for (v, &sum) in acc.iter().enumerate() {
                                let at = tile.add(r * NR + 8 * v);
                                let sum = if k0 > 0 {
                                    _mm256_add_ps(_mm256_load_ps(at), sum)
                                } else if accumulate {
                                    let old = _mm256_mask_i32gather_ps::<4>(
                                        _mm256_setzero_ps(),
                                        out.add(r),
                                        c_lanes[v],
                                        _mm256_castsi256_ps(masks[v]),
                                    );
                                    _mm256_add_ps(old, sum)
                                } else {
                                    // `sum + 0` as `matrixmultiply` (-0.0 to +0.0).
                                    _mm256_add_ps(sum, _mm256_setzero_ps())
                                };
                                _mm256_store_ps(at, sum);
                            }
                        }
                    }
                    if R == MR && height == NR {
                        store_whole_tile(tile, out, ldc);
                    } else {
                        for r in 0..R {
                            for lane in 0..height {
                                *out.add(lane * ldc + r) = *tile.add(r * NR + lane);
                            }
                        }
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm_layout::test_arrays::{assert_same_bits_as_matrixmultiply, bits};
    use super::*;
    use ndarray::Array2;

    /// Every shape class (whole and partial tiles and strips, one block or several with a short
    /// last one, one row, one column), both layouts of `b`, overwrite and accumulate, views cut
    /// out of wider arrays (`c`'s margins must stay untouched): the same bits as
    /// `matrixmultiply`, whose kernel on these CPUs sums in the same order (its AVX2 kernel, or
    /// on AVX-512 CPUs its AVX-512 one).
    #[test]
    fn same_bits_as_matrixmultiply() {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("fma")) {
            eprintln!("skipped: this CPU lacks AVX2 or FMA");
            return;
        }
        let shapes = [
            (128, 784, 400),
            (32, 400, 784),
            (37, 531, 77),
            (13, 300, 45),
            (1, 257, 1),
            (33, 1, 17),
            (6, 256, 16),
            (15, 513, 11),
            // Whole strips whose last column tile is whole too (the next tile cannot overwrite
            // a store past its six columns).
            (32, 67, 12),
            (16, 64, 6),
            // Strips of exactly one vector; two whole blocks; tile heights 2-5 on both sides;
            // partial strips 9-15.
            (8, 300, 8),
            (2, 512, 20),
            (3, 40, 3),
            (4, 270, 4),
            (5, 100, 5),
            (20, 513, 26),
            (29, 300, 31),
        ];
        assert_same_bits_as_matrixmultiply(sgemm_on_any_avx2, NR, SHORT_K, &shapes);
    }

    /// Products that all underflow: each block's sum is -0.0, which `matrixmultiply`'s AVX2
    /// kernel stores as +0.0 when it overwrites (its AVX-512 kernel keeps -0.0, so this runs only
    /// where `matrixmultiply` runs its AVX2 kernel).
    #[test]
    fn a_sum_of_minus_zero_is_stored_as_matrixmultiply_stores_it() {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("fma")) || has!("avx512f") {
            eprintln!("skipped: matrixmultiply does not run its AVX2 kernel on this CPU");
            return;
        }
        for (m, k, n) in [(16, 300, 16), (13, 70, 11)] {
            let a = Array2::from_elem((m, k), 1e-30f32);
            let w = Array2::from_elem((n, k), -1e-30f32);
            let b_rows = w.t().as_standard_layout().into_owned();
            for b in [w.t(), b_rows.view()] {
                let mut want = Array2::from_elem((m, n), f32::NAN);
                ndarray::linalg::general_mat_mul(1.0, &a, &b, 0.0, &mut want);
                let mut got = Array2::from_elem((m, n), f32::NAN);
                assert!(sgemm_on_any_avx2(&a.view(), &b, false, &mut got.view_mut()));
                assert_eq!(bits(&got), bits(&want), "{m}x{k}x{n}");
                assert!(got.iter().all(|v| v.to_bits() == 0), "+0.0 everywhere");
            }
        }
    }
}
