//! The engine's large f32 products on AVX-512, written with intrinsics, giving `matrixmultiply`'s
//! bits exactly.
//!
//! Why: `matrixmultiply` packs both operands into its own layout on every call, and the engine
//! calls it once per piece of a product (`linalg::gemm` splits them across threads), so every
//! piece re-packs the whole weight matrix. With 32 rows a worker (4 workers, batch 128) that
//! packing is most of the work. `x W^T` (the forward products) is computed as its transpose
//! `W x^T`, broadcasting weights in place against vectors of a packed `x^T` (32 rows of
//! activations, not 400 x 784 weights); `delta W` (the backward products) broadcasts `delta` in
//! place against vectors of `W`'s rows, packed 32 columns by 256 rows at a time (each pack read
//! by every tile of its strip), which measured faster than reading them in place. On the
//! Intel Xeon of docs/scaling.md §22, one thread, the three large products of a step at 128 rows
//! ran 20-35% faster than `matrixmultiply`'s AVX-512 kernel, at 32 rows 30-60% faster; on the one
//! of §38, at 128 rows, 0.99-1.13x its speed.
//!
//! Bits: every output element gets `matrixmultiply`'s operations in its order (see
//! `archparam::S_KC` and `gemm_loop` in that crate): the inner dimension is cut into blocks of
//! [`KC`] from the start; within a block the sum starts at zero and takes one fused multiply-add
//! per step, in order; the first block's sum is the result (or is added to `c` when
//! accumulating), each later block's sum is added to it. The order of elements' work is free;
//! each element's is not. So on these CPUs the engine computes the bits `matrixmultiply`'s
//! AVX-512 kernel computed before (AVX2 CPUs run `gemm_avx2.rs`, others `matrixmultiply`); the
//! tests compare the bits with `matrixmultiply` on whole and partial tiles and strips, one block
//! and several, both layouts, overwrite and accumulate. (NaN payloads aside: where two NaNs meet,
//! which one survives may differ; any NaN stays a NaN.)
//!
//! Unsafe: the `#[target_feature]` functions are called only after
//! `is_x86_feature_detected!("avx512f")`. Pointers are formed from views whose shapes and strides
//! [`super::gemm_layout::layout`] checked (shapes that agree, non-negative strides, unit stride
//! where read contiguously), and every access is inside the view: scalar loads of broadcast
//! values, masked loads and stores of rows (masked-off lanes are not accessed), and, in `x W^T`
//! when accumulating, masked gathers of `c`; gather offsets fit in `i32` (checked).
#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m512, __m512i, __mmask16, _mm512_add_epi32, _mm512_add_ps, _mm512_fmadd_ps, _mm512_load_ps,
    _mm512_loadu_ps, _mm512_mask_i32gather_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps,
    _mm512_mullo_epi32, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setr_epi32, _mm512_setzero_ps,
    _mm512_shuffle_f32x4, _mm512_shuffle_ps, _mm512_store_ps, _mm512_unpackhi_ps,
    _mm512_unpacklo_ps,
};

use ndarray::{ArrayView2, ArrayViewMut2};

use super::gemm_layout::{KC, Layout, layout};

/// Columns of a tile's vector side: two `zmm` registers.
const NR: usize = 32;
/// Rows of a tile's broadcast side: 24 accumulators, two vectors, one broadcast.
const MR: usize = 12;

/// Inner dimensions below this go to `matrixmultiply` in the `x W^T` layout (see [`sgemm`]).
const SHORT_K: usize = 64;

/// A 64-byte-aligned block of floats for packed operands and tiles.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; 16]);

/// `c = a b` (or `c += a b` when `accumulate`) for f32 views, with `matrixmultiply`'s bits.
/// Returns `false`, touching nothing, when this CPU lacks AVX-512F, the layout is not one these
/// kernels take (`a` and `c` with contiguous rows, `b` with contiguous rows or columns), or it is
/// an `x W^T` with an inner dimension below [`SHORT_K`].
pub(super) fn sgemm(
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    accumulate: bool,
    c: &mut ArrayViewMut2<f32>,
) -> bool {
    let ((m, k), n) = (a.dim(), b.ncols());
    let Some(layout) = layout(a, b, c, NR) else {
        return false;
    };
    if !std::arch::is_x86_feature_detected!("avx512f") {
        return false;
    }
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    match layout {
        // Over a short inner dimension (the decoder's first layer, `k` = the latent size) storing
        // each tile's results outweighs its sums, and `matrixmultiply` is faster: 0.014 against
        // 0.019 ms at `k` = 20 with tiles stored by rows (0.025 with scatters; §38 of
        // docs/scaling.md).
        Layout::ATimesWT { .. } if k < SHORT_K => return false,
        Layout::ATimesWT { lda, ldw, ldc } => {
            // SAFETY: AVX-512F is present; the views hold every element the kernel reads and
            // writes (checked by `layout`).
            unsafe { a_times_w_t(m, k, n, a, lda, b, ldw, c, ldc, accumulate) }
        }
        // SAFETY: as above.
        Layout::ATimesB { lda, ldb, ldc } => unsafe {
            a_times_b(m, k, n, a, lda, b, ldb, c, ldc, accumulate)
        },
    }
    true
}

/// Lane mask of the first `len` of 16 lanes, for `len` in `0..=16` and beyond (all lanes).
fn mask(len: usize) -> __mmask16 {
    if len >= 16 {
        0xffff
    } else {
        ((1u32 << len) - 1) as u16
    }
}

/// The masks of a 32-wide strip of which the first `width` lanes are real.
fn strip_masks(width: usize) -> [__mmask16; 2] {
    [mask(width), mask(width.saturating_sub(16))]
}

/// Offsets `0, ld, 2 ld, ..` of the 32 lanes of a strip, in units of `f32`.
#[target_feature(enable = "avx512f")]
fn lane_offsets(ld: usize) -> [__m512i; 2] {
    let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let low = _mm512_mullo_epi32(lane, _mm512_set1_epi32(ld as i32));
    [
        low,
        _mm512_add_epi32(low, _mm512_set1_epi32((16 * ld) as i32)),
    ]
}

/// The sums of one block of the inner dimension for `R` broadcast rows x 32 vector columns:
/// `acc[r] = sum_p left[r * ldl + p] * right[p * ldr ..][..32]`, `p` in `0..kc` in order, from
/// zero, one fused multiply-add per step. `right`'s second vector is read under `high` (its first
/// is always whole).
#[inline(always)]
unsafe fn block_sums<const R: usize>(
    kc: usize,
    left: *const f32,
    ldl: usize,
    right: *const f32,
    ldr: usize,
    high: __mmask16,
) -> [[__m512; 2]; R] {
    // SAFETY (caller): AVX-512F is present.
    let mut acc = [[unsafe { _mm512_setzero_ps() }; 2]; R];
    for p in 0..kc {
        // SAFETY (caller): rows `0..R` of `left` hold `kc` values; `right` holds `kc` rows of 16
        // values, and 16 more under `high`.
        unsafe {
            let r0 = _mm512_loadu_ps(right.add(p * ldr));
            let r1 = _mm512_maskz_loadu_ps(high, right.add(p * ldr + 16));
            for (r, acc) in acc.iter_mut().enumerate() {
                let l = _mm512_set1_ps(*left.add(r * ldl + p));
                acc[0] = _mm512_fmadd_ps(l, r0, acc[0]);
                acc[1] = _mm512_fmadd_ps(l, r1, acc[1]);
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
            6 => {
                const $r: usize = 6;
                $body
            }
            7 => {
                const $r: usize = 7;
                $body
            }
            8 => {
                const $r: usize = 8;
                $body
            }
            9 => {
                const $r: usize = 9;
                $body
            }
            10 => {
                const $r: usize = 10;
                $body
            }
            11 => {
                const $r: usize = 11;
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
/// against 32-column strips of `b`'s rows, packed 256 rows at a time (32 KiB, read by every tile
/// of the strip). So the 784-400 layer's `delta W` ran at 0.99-1.03x `matrixmultiply`'s speed;
/// reading whole strips in place, at 0.89-0.92x (docs/scaling.md §38).
#[target_feature(enable = "avx512f")]
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
    let mut packed = vec![Line([0.0; 16]); 2 * KC];
    let packed: *mut f32 = packed.as_mut_ptr().cast();
    for j0 in (0..n).step_by(NR) {
        let width = (n - j0).min(NR);
        let [low, high] = strip_masks(width);
        for k0 in (0..k).step_by(KC) {
            let kc = (k - k0).min(KC);
            // SAFETY: rows k0..k0 + kc of b hold columns j0..j0 + width; the pack holds 32 x KC.
            let (right, ldr) = unsafe {
                let strip = b.add(k0 * ldb + j0);
                for p in 0..kc {
                    let row = strip.add(p * ldb);
                    _mm512_store_ps(packed.add(p * NR), _mm512_maskz_loadu_ps(low, row));
                    // `wrapping_add`: past a short last row it points beyond `b`, and the mask
                    // (then empty) keeps it from being read.
                    let rest = _mm512_maskz_loadu_ps(high, row.wrapping_add(16));
                    _mm512_store_ps(packed.add(p * NR + 16), rest);
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
                        let acc = block_sums::<R>(kc, left, lda, right, ldr, high);
                        for (r, acc) in acc.iter().enumerate() {
                            let row = out.add(r * ldc);
                            for (v, (&sum, mask)) in acc.iter().zip([low, high]).enumerate() {
                                // `wrapping_add`: as for the pack above.
                                let at = row.wrapping_add(16 * v);
                                let sum = if add {
                                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), sum)
                                } else {
                                    sum
                                };
                                _mm512_mask_storeu_ps(at, mask, sum);
                            }
                        }
                    })
                }
            }
        }
    }
}

/// The 16 x 16 transpose of rows `r`: lane `i` of the result's `j` is lane `j` of `r[i]`.
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // Pairs of rows interleaved, then quads: `u[4 q + j]` holds column `j` (and `j + 4`, `j + 8`,
    // `j + 12` in its other 128-bit lanes) of rows `4 q..4 q + 4`.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (q, j) = (i / 4, i % 4);
        let (a, b) = (t[4 * q + j / 2], t[4 * q + j / 2 + 2]);
        if j % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(a, b)
        } else {
            _mm512_shuffle_ps::<0xEE>(a, b)
        }
    });
    // Then 128-bit lanes: `v[j]` (`v[j + 4]`) holds columns `j`, `j + 8` (`j + 4`, `j + 12`) of
    // rows 0..8, `v[8 + ..]` the same of rows 8..16.
    let v: [__m512; 16] = std::array::from_fn(|i| {
        let (half, j) = (i / 8, i % 4);
        let (a, b) = (u[8 * half + j], u[8 * half + 4 + j]);
        if i % 8 < 4 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xDD>(a, b)
        }
    });
    std::array::from_fn(|j| {
        let (a, b) = (v[j % 8], v[8 + j % 8]);
        if j < 8 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xDD>(a, b)
        }
    })
}

/// Packs the first `height` rows of a strip of `a` transposed: `packed[p * 32 + lane] =
/// strip[lane * lda + p]` for `p` in `0..k`, 16 x 16 blocks loaded by rows (masked past `k`) and
/// transposed in registers: two 16-lane gathers a column took longer (docs/scaling.md §38).
/// Lanes from `height` on are never loaded: zero in the first 16, left as they were in the
/// second 16 when `height` is 16 or less (then read only under an empty mask).
///
/// # Safety
/// AVX-512F is present; the `height` (at most 32) rows of `strip`, `lda` apart, hold `k` values;
/// `packed` holds `k` x 32 values, 64-byte aligned.
#[target_feature(enable = "avx512f")]
unsafe fn pack_transposed(
    strip: *const f32,
    lda: usize,
    k: usize,
    height: usize,
    packed: *mut f32,
) {
    for half in 0..2 {
        let rows = height.saturating_sub(16 * half).min(16);
        if rows == 0 {
            break;
        }
        for p in (0..k).step_by(16) {
            let width = (k - p).min(16);
            let within_k = mask(width);
            // SAFETY (caller): rows 16 half..16 half + rows hold columns p..p + width (masked-off
            // lanes are not read); the pack holds rows p..p + width of 32 values, stored at
            // multiples of 16 values from its aligned start.
            unsafe {
                let row = |r: usize| {
                    if r < rows {
                        _mm512_maskz_loadu_ps(within_k, strip.add((16 * half + r) * lda + p))
                    } else {
                        _mm512_setzero_ps()
                    }
                };
                let columns = transpose16(std::array::from_fn(row));
                for (j, column) in columns.into_iter().enumerate().take(width) {
                    _mm512_store_ps(packed.add((p + j) * NR + 16 * half), column);
                }
            }
        }
    }
}

/// Stores a tile's sums (`R` rows of 32 lanes, `tile[r * 32 + lane]`) into `c` transposed: lane
/// `lane < height`'s `R` values to `c[lane * ldc..][..R]`, one masked store a row of `c` instead
/// of a 16-lane scatter per row of the tile (docs/scaling.md §38).
///
/// # Safety
/// AVX-512F is present; `tile` holds `R` x 32 values, 64-byte aligned; rows `0..height` of `c`,
/// `ldc` apart, hold `R` values each.
#[target_feature(enable = "avx512f")]
unsafe fn store_tile<const R: usize>(tile: *const f32, height: usize, c: *mut f32, ldc: usize) {
    const { assert!(R <= 16, "a tile row per lane of one 16 x 16 transpose") };
    for half in 0..2 {
        let lanes = height.saturating_sub(16 * half).min(16);
        if lanes == 0 {
            break;
        }
        // SAFETY (caller): as documented.
        unsafe {
            let row = |r: usize| {
                if r < R {
                    _mm512_load_ps(tile.add(r * NR + 16 * half))
                } else {
                    _mm512_setzero_ps()
                }
            };
            let values = transpose16(std::array::from_fn(row));
            for (l, values) in values.into_iter().enumerate().take(lanes) {
                _mm512_mask_storeu_ps(c.add((16 * half + l) * ldc), mask(R), values);
            }
        }
    }
}

/// `c (+)= a w^T`, `w: [n, k]` with rows of stride `ldw`, computed as `c^T = w a^T`: weights
/// broadcast in place against 32-row strips of `a`, packed transposed (`[k][32]`), once per strip.
/// A tile's sums are kept in an aligned scratch tile across blocks and stored into `c` once,
/// transposed in registers.
#[target_feature(enable = "avx512f")]
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
    let mut packed = vec![Line([0.0; 16]); 2 * k];
    let packed: *mut f32 = packed.as_mut_ptr().cast();
    let mut tile = [Line([0.0; 16]); 2 * MR];
    let tile: *mut f32 = tile.as_mut_ptr().cast();
    let c_lanes = lane_offsets(ldc);
    for i0 in (0..m).step_by(NR) {
        let height = (m - i0).min(NR);
        let masks = strip_masks(height);
        // SAFETY: rows i0..i0 + height of a hold k values; the pack holds k x 32.
        unsafe { pack_transposed(a.add(i0 * lda), lda, k, height, packed) };
        for j0 in (0..n).step_by(MR) {
            let rows = (n - j0).min(MR);
            // SAFETY: column j0 + r < n of rows i0..i0 + height of c; rows j0..j0 + rows of w.
            unsafe {
                let out = c.add(i0 * ldc + j0);
                with_rows!(rows, R => {
                    for k0 in (0..k).step_by(KC) {
                        let kc = (k - k0).min(KC);
                        let left = w.add(j0 * ldw + k0);
                        let acc = block_sums::<R>(kc, left, ldw, packed.add(k0 * NR), NR, masks[1]);
                        for (r, acc) in acc.iter().enumerate() {
                            for (v, &sum) in acc.iter().enumerate() {
                                let at = tile.add(r * NR + 16 * v);
                                let sum = if k0 > 0 {
                                    _mm512_add_ps(_mm512_load_ps(at), sum)
                                } else if accumulate {
                                    let old = _mm512_mask_i32gather_ps::<4>(
                                        _mm512_setzero_ps(),
                                        masks[v],
                                        c_lanes[v],
                                        out.add(r),
                                    );
                                    _mm512_add_ps(old, sum)
                                } else {
                                    sum
                                };
                                _mm512_store_ps(at, sum);
                            }
                        }
                    }
                    store_tile::<R>(tile, height, out, ldc);
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm_layout::test_arrays::{assert_same_bits_as_matrixmultiply, filled};
    use super::*;
    use ndarray::Array2;

    /// Every shape class (whole and partial tiles and strips, one block or several with a short
    /// last one, one row, one column), both layouts of `b`, overwrite and accumulate, views cut
    /// out of wider arrays, `c` inside NaN margins: the same bits as `matrixmultiply`, and `c`
    /// left alone where a short `x W^T` is declined.
    #[test]
    fn same_bits_as_matrixmultiply() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU lacks AVX-512F");
            return;
        }
        let shapes = [
            (128, 784, 400),
            (32, 400, 784),
            (37, 531, 77),
            (13, 300, 45),
            (1, 257, 1),
            (33, 1, 17),
            (12, 256, 32),
            (31, 513, 11),
            // Two whole blocks; tile heights 2, 3, 6, 10 on both sides; partial strips 17-31.
            (2, 512, 20),
            (3, 70, 3),
            (6, 270, 6),
            (10, 100, 10),
            (20, 513, 26),
            (29, 300, 31),
            // Whole tiles of 12 in whole strips with k % 16 = 4; a strip of exactly 16 rows.
            (64, 100, 12),
            (16, 70, 24),
            // A strip of 17 rows at `k` = `SHORT_K`; `a b` with a short `k`.
            (17, 64, 13),
            (3, 40, 3),
            (5, 7, 40),
        ];
        assert_same_bits_as_matrixmultiply(sgemm, NR, SHORT_K, &shapes);
    }

    /// Layouts the kernels do not take are declined, leaving `c` alone.
    #[test]
    fn declines_other_layouts() {
        let a = filled(8, 8, 1);
        let b = filled(8, 8, 2);
        let mut c = Array2::from_elem((8, 8), 7.0f32);
        let mut c_t = c.clone().reversed_axes();
        assert!(!sgemm(&a.t(), &b.view(), false, &mut c.view_mut()));
        assert!(!sgemm(&a.view(), &b.view(), false, &mut c_t.view_mut()));
        assert!(c.iter().all(|&v| v == 7.0));
    }
}
