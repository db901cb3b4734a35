//! The floating-point types the engine runs in: f32 for training, f64 for gradient checks.
//!
//! Everything numeric (`elbo`, `eval`, `linalg`) is generic over [`Float`]. The trait adds what
//! `num_traits::Float` lacks: lossless-enough conversions to and from f64 (where sums are kept),
//! and the one transcendental kernel on the hot path, [`Float::softplus_sigmoid`], which f32
//! implements with branch-free polynomials the compiler vectorises, and f64 with the standard
//! library (so the f64 gradient checks test the maths, not an approximation).

use std::fmt::Debug;

use ndarray::{ArrayView2, ArrayViewMut2, LinalgScalar};

/// A real scalar the engine can run in.
pub trait Float:
    LinalgScalar + num_traits::Float + Send + Sync + Debug + Default + 'static
{
    /// Rounds an f64 to this type.
    fn from_f64(v: f64) -> Self;

    /// Widens to f64. (Not `to_f64`: that name is taken by `num_traits::ToPrimitive`, a supertrait,
    /// and would make every call ambiguous.)
    fn as_f64(self) -> f64;

    /// For a logit `l`: `(softplus(l), sigmoid(l))`, with `softplus(l) = ln(1 + e^l)` computed
    /// stably as `max(l, 0) + ln(1 + e^-|l|)` and `sigmoid(l) = 1 / (1 + e^-l)` from the same
    /// `e^-|l|`. Finite for every finite `l`.
    fn softplus_sigmoid(l: Self) -> (Self, Self);

    /// `values` itself when this type is f32 (for kernels with an f32-only fast path), else
    /// `None`. Only f32's implementation returns `Some`, and it must return the same slice: the
    /// fast paths write their results through it.
    fn as_f32_slice(_values: &[Self]) -> Option<&[f32]> {
        None
    }

    /// [`Self::as_f32_slice`], writable.
    fn as_f32_slice_mut(_values: &mut [Self]) -> Option<&mut [f32]> {
        None
    }

    /// `c = a b` (or `c += a b` when `accumulate`) by a kernel of this type's own, with the same
    /// bits as `matrixmultiply`; `false`, touching nothing, where there is none (f64, CPUs
    /// without AVX2 and FMA, other layouts). See `kernels/gemm_avx512.rs` and `gemm_avx2.rs`.
    fn product_fast_path(
        _a: &ArrayView2<Self>,
        _b: &ArrayView2<Self>,
        _accumulate: bool,
        _c: &mut ArrayViewMut2<Self>,
    ) -> bool {
        false
    }
}

impl Float for f64 {
    #[inline]
    fn from_f64(v: f64) -> Self {
        v
    }

    #[inline]
    fn as_f64(self) -> f64 {
        self
    }

    #[inline]
    fn softplus_sigmoid(l: f64) -> (f64, f64) {
        let e = (-l.abs()).exp();
        let inv = 1.0 / (1.0 + e);
        let sigmoid = if l >= 0.0 { inv } else { e * inv };
        (l.max(0.0) + e.ln_1p(), sigmoid)
    }
}

impl Float for f32 {
    #[inline]
    fn from_f64(v: f64) -> Self {
        v as f32
    }

    #[inline]
    fn as_f32_slice(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }

    #[inline]
    fn as_f32_slice_mut(values: &mut [f32]) -> Option<&mut [f32]> {
        Some(values)
    }

    #[cfg(target_arch = "x86_64")]
    fn product_fast_path(
        a: &ArrayView2<f32>,
        b: &ArrayView2<f32>,
        accumulate: bool,
        c: &mut ArrayViewMut2<f32>,
    ) -> bool {
        super::gemm_avx512::sgemm(a, b, accumulate, c)
            || super::gemm_avx2::sgemm(a, b, accumulate, c)
    }

    #[inline]
    fn as_f64(self) -> f64 {
        self as f64
    }

    #[inline(always)]
    fn softplus_sigmoid(l: f32) -> (f32, f32) {
        let a = if l < 0.0 { -l } else { l };
        let e = exp_nonpositive_f32(-a);
        let inv = 1.0 / (1.0 + e);
        let sigmoid = if l >= 0.0 { inv } else { e * inv };
        let pos = if l > 0.0 { l } else { 0.0 };
        (pos + ln_1p_unit_f32(e), sigmoid)
    }
}

/// 1.5 * 2^23: adding and subtracting it rounds an f32 of magnitude < 2^22 to the nearest integer
/// (in the default rounding mode), and the sum's low mantissa bits hold that integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `e^x` for `x <= 0`, f32, within ~2 ulp; 0 < result <= 1 (inputs below -87 are clamped, giving
/// ~1.6e-38 instead of a denormal or 0). Branch-free so loops over it vectorise. Cephes' `expf`
/// reduction and polynomial: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, times 2^n.
#[inline(always)]
pub fn exp_nonpositive_f32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| <= 128.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x < -87.0 { -87.0 } else { x };
    let shifted = x * LOG2_E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    // n in [-126, 0]: 2^n is a normal f32.
    y * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// `ln(1 + e)` for `e` in `[0, 1]`, f32, within ~2 ulp, with no cancellation for small `e`.
/// Cephes' `logf` polynomial on `f` in `[sqrt(1/2) - 1, sqrt(2) - 1]`, where
/// `1 + e = 2^k (1 + f)`: `f = e` exactly when `e < sqrt(2) - 1`, otherwise `k = 1` and
/// `f = (e - 1) / 2`.
#[inline(always)]
pub fn ln_1p_unit_f32(e: f32) -> f32 {
    const SQRT2_M1: f32 = std::f32::consts::SQRT_2 - 1.0;
    let big = e >= SQRT2_M1;
    let f = if big { (e - 1.0) * 0.5 } else { e };
    let k = if big { 1.0 } else { 0.0 };
    let z = f * f;
    let p = ((((((((7.037_683_6e-2 * f - 1.151_461e-1) * f + 1.167_699_9e-1) * f
        - 1.242_014_1e-1)
        * f
        + 1.424_932_3e-1)
        * f
        - 1.666_805_8e-1)
        * f
        + 2.000_071_4e-1)
        * f
        - 2.499_999_4e-1)
        * f
        + 3.333_333e-1)
        * f
        * z;
    let y = p + k * -2.121_944_4e-4 - 0.5 * z;
    f + y + k * 0.693_359_4
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error in units of f32 epsilon against the f64 standard library.
    fn ulps(approx: f32, exact: f64) -> f64 {
        ((approx as f64 - exact) / exact.abs().max(f32::MIN_POSITIVE as f64)).abs()
            / f32::EPSILON as f64
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp() {
        let mut worst: f64 = 0.0;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            worst = worst.max(ulps(exp_nonpositive_f32(x), (x as f64).exp()));
        }
        assert!(worst < 3.0, "worst {worst} ulp");
        assert_eq!(exp_nonpositive_f32(0.0), 1.0);
        assert!(exp_nonpositive_f32(-1e4) > 0.0);
    }

    #[test]
    fn fast_ln_1p_is_within_a_few_ulp() {
        let mut worst: f64 = 0.0;
        for i in 0..=200_000 {
            let e = i as f32 / 200_000.0;
            if e == 0.0 {
                continue;
            }
            worst = worst.max(ulps(ln_1p_unit_f32(e), (e as f64).ln_1p()));
        }
        // Tiny e: no cancellation.
        for e in [1e-30_f32, 1e-12, 1e-7, 3e-4] {
            worst = worst.max(ulps(ln_1p_unit_f32(e), (e as f64).ln_1p()));
        }
        assert!(worst < 3.0, "worst {worst} ulp");
        assert_eq!(ln_1p_unit_f32(0.0), 0.0);
    }

    #[test]
    fn f32_softplus_sigmoid_matches_f64() {
        for i in -4000..=4000 {
            let l = i as f32 * 0.025; // -100 ..= 100
            let (sp, s) = f32::softplus_sigmoid(l);
            let (sp64, s64) = f64::softplus_sigmoid(l as f64);
            if l >= -87.0 {
                assert!(ulps(sp, sp64) < 4.0, "softplus({l}) = {sp}, want {sp64}");
                assert!(ulps(s, s64) < 4.0, "sigmoid({l}) = {s}, want {s64}");
            } else {
                // e^l is clamped at e^-87 ~ 1.6e-38: absolutely negligible.
                assert!((sp as f64 - sp64).abs() < 2e-38 && (s as f64 - s64).abs() < 2e-38);
            }
        }
        // Large logits stay finite and exact in the limit.
        let (sp, s) = f32::softplus_sigmoid(1e30);
        assert_eq!((sp, s), (1e30, 1.0));
        let (sp, s) = f32::softplus_sigmoid(-1e30);
        assert!((0.0..1e-37).contains(&sp) && s < 1e-37, "{sp} {s}");
    }

    #[test]
    fn f64_softplus_is_stable() {
        let (sp, s) = f64::softplus_sigmoid(800.0);
        assert_eq!((sp, s), (800.0, 1.0));
        let (sp, s) = f64::softplus_sigmoid(-800.0);
        assert_eq!((sp, s), (0.0, 0.0));
        let (sp, s) = f64::softplus_sigmoid(0.0);
        assert!((sp - 2f64.ln()).abs() < 1e-15 && s == 0.5);
    }
}
