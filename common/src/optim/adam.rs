//! Adam and AdamW, as PyTorch's `_single_tensor_adam` (non-capturable, non-amsgrad).
//!
//! At step t (counting from 1), for every element:
//!
//! ```text
//! p <- p * (1 - lr * wd)                      (AdamW only: decoupled weight decay)
//! m <- lerp(m, g, 1 - beta1)  = beta1 m + (1 - beta1) g
//! v <- v * beta2 + (1 - beta2) * g * g
//! bc1 = 1 - beta1^t,  bc2 = 1 - beta2^t       (f64)
//! step_size = lr / bc1                        (f64)
//! denom = sqrt(v) / sqrt(bc2) + eps
//! p <- p + (-step_size) * m / denom
//! ```
//!
//! One departure: a moment whose magnitude falls below [`super::MOMENT_FLOOR`] (2^-96, about
//! 1.3e-29) is stored as zero (SGD's momentum buffer too). A weight whose gradient stays zero (a
//! pixel that is blank in every recent batch) has its first moment decay by `beta1` each step
//! into f32's subnormal range, where it sticks (`m - 0.1 m` rounds back to `m` for the smallest
//! few), and on Intel CPUs every vector operation with a subnormal input or result takes a
//! microcode assist: from the third epoch on the built-in data, Adam took 2.5x its first epoch's
//! time (docs/scaling.md §27). Above the floor, a stored moment's products with the step's
//! scalars (down to 2^-30) stay normal. Otherwise the arithmetic is the per-element definition's,
//! bit for bit. What the floor changes: a flushed `m` moved `p` by less than
//! `lr / bc1 * 2^-96 / eps`, which changes only parameters below about 2^24 times that (about
//! 2e-16 at the defaults); a flushed `v` shifts `denom` by up to `2^-48 / sqrt(bc2)`, a few ulps
//! of `eps`, so weights whose gradients stay below about 1e-14 (1e-13 in the first steps) may
//! differ by an ulp.

use rayon::prelude::*;

use super::{CHUNK, GradientBlocks, PARALLEL_MIN, flush_tiny};
use crate::kernels::with_widest_vectors;

/// One step's scalars, computed in f64 as Python floats and cast to f32 once, as PyTorch does
/// when it applies a Python scalar to an f32 tensor.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scalars {
    /// `1 - lr * wd`, or `None` without weight decay (PyTorch skips the multiply; the kernel
    /// multiplies by 1, which gives the same bits).
    decay: Option<f32>,
    /// `1 - beta1`: the lerp weight.
    lerp_weight: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
    /// How every gradient value is divided first.
    grad_scale: GradScale,
}

/// How the step divides every gradient value by a divisor (1 when there is none).
#[derive(Debug, Clone, Copy, PartialEq)]
enum GradScale {
    /// By multiplying with `1 / divisor`, exact because the divisor is a power of two: `g * 2^-k`
    /// and `g / 2^k` are the same correctly rounded value (subnormal results included), and a
    /// vector division takes many multiplications' time (docs/scaling.md §22).
    Multiply(f32),
    /// By dividing: the divisor's reciprocal is not exact.
    Divide(f32),
}

impl Scalars {
    /// `step` is the step being taken, counting from 1.
    pub(super) fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, wd: f64, step: u64) -> Self {
        // PyTorch: `beta1 ** step` with `step` a Python float, i.e. C `pow`, not repeated
        // multiplication.
        let t = step as f64;
        let bias_correction1 = 1.0 - beta1.powf(t);
        let bias_correction2 = 1.0 - beta2.powf(t);
        let step_size = lr / bias_correction1;
        Scalars {
            decay: (wd != 0.0).then_some((1.0 - lr * wd) as f32),
            lerp_weight: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: eps as f32,
            neg_step_size: (-step_size) as f32,
            grad_scale: GradScale::Multiply(1.0),
        }
    }

    /// The step for `grad / divisor`, divided value by value inside the step's one pass.
    pub(super) fn with_divisor(self, divisor: f32) -> Self {
        let grad_scale = match exact_reciprocal(divisor) {
            Some(reciprocal) => GradScale::Multiply(reciprocal),
            None => GradScale::Divide(divisor),
        };
        Scalars { grad_scale, ..self }
    }
}

/// Applies one Adam step to equally long slices (the caller checks lengths).
pub(super) fn step(
    s: &Scalars,
    params: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
) {
    if params.len() < PARALLEL_MIN {
        kernel(s, params, grad, exp_avg, exp_avg_sq, None);
    } else {
        params
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(exp_avg.par_chunks_mut(CHUNK))
            .zip(exp_avg_sq.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| kernel(s, p, g, m, v, None));
    }
}

/// [`step`] for a gradient read block by block, asked for once per block of [`CHUNK`] values (one
/// block below [`PARALLEL_MIN`]) just before the block's step (the coordinator sums the reduction
/// tree's top this way, `train::BlockwiseSum`). With a `mirror` (as long as `params`), the new
/// values are also stored there, from the registers that hold them (the coordinator's parameter
/// file for the workers on its host): copying each block after its step, `copy_values` read it
/// back at a different offset in a cache line, 0.13 ms of a 3.5 ms step on an Emerald Rapids
/// Xeon (docs/scaling.md §27).
pub(super) fn step_from(
    s: &Scalars,
    params: &mut [f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    grad: &(impl GradientBlocks + ?Sized),
    mirror: Option<&mut [f32]>,
) {
    if let Some(mirror) = &mirror {
        assert_eq!(
            mirror.len(),
            params.len(),
            "a mirror as long as the parameters"
        );
    }
    let block_step = |g: &mut Vec<f32>,
                      c: usize,
                      p: &mut [f32],
                      m: &mut [f32],
                      v: &mut [f32],
                      out: Option<&mut [f32]>| {
        let g = grad.block(c * CHUNK..c * CHUNK + p.len(), g);
        kernel(s, p, g, m, v, out);
    };
    if params.len() < PARALLEL_MIN {
        block_step(&mut Vec::new(), 0, params, exp_avg, exp_avg_sq, mirror);
        return;
    }
    let blocks = params
        .par_chunks_mut(CHUNK)
        .zip(exp_avg.par_chunks_mut(CHUNK))
        .zip(exp_avg_sq.par_chunks_mut(CHUNK))
        .enumerate();
    match mirror {
        None => blocks.for_each_init(Vec::new, |g, (c, ((p, m), v))| {
            block_step(g, c, p, m, v, None)
        }),
        Some(mirror) => blocks
            .zip(mirror.par_chunks_mut(CHUNK))
            .for_each_init(Vec::new, |g, ((c, ((p, m), v)), out)| {
                block_step(g, c, p, m, v, Some(out))
            }),
    }
}

/// Two divisions (three for a divisor that is not a power of two) and a square root per value:
/// compute-bound at baseline SSE2's four lanes (12% of an engine step on a Zen 5), so it runs on
/// the CPU's widest vectors (same bits on every path).
/// With a `mirror`, the new parameters are stored there too.
fn kernel(
    s: &Scalars,
    params: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    mirror: Option<&mut [f32]>,
) {
    with_widest_vectors(
        #[inline(always)]
        || kernel_body(s, params, grad, m, v, mirror),
    );
}

/// The step's three loop-invariant choices (divide the gradient or multiply it? decay? which end
/// of the lerp?), made once per call: left inside the loop, LLVM vectorised it on AVX-512 but ran
/// the AVX2 copy's hot loop scalar, testing them per value (1.2-1.5 ms for 650k values on a Zen 3,
/// 15-21% of an engine step; docs/scaling.md §16). A decay of `None` multiplies by 1, which
/// changes no bits. Like the loop it replaces, it steps the first `params.len()` values of each
/// slice (the callers pass equal lengths; a shorter `mirror` panics).
#[inline(always)]
fn kernel_body(
    s: &Scalars,
    params: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    mirror: Option<&mut [f32]>,
) {
    let n = params.len().min(grad.len()).min(m.len()).min(v.len());
    let (params, grad, m, v) = (&mut params[..n], &grad[..n], &mut m[..n], &mut v[..n]);
    match mirror {
        None => by_choices::<false>(s, params, grad, m, v, &mut []),
        Some(out) => by_choices::<true>(s, params, grad, m, v, &mut out[..n]),
    }
}

/// [`chunked`] for the two choices `kernel_body` leaves to it (divide the gradient or multiply
/// it, which end of the lerp), the mirror already chosen.
#[inline(always)]
fn by_choices<const MIRROR: bool>(
    s: &Scalars,
    params: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    out: &mut [f32],
) {
    match (
        matches!(s.grad_scale, GradScale::Divide(_)),
        s.lerp_weight.abs() < 0.5,
    ) {
        (false, true) => chunked::<false, true, MIRROR>(s, params, grad, m, v, out),
        (false, false) => chunked::<false, false, MIRROR>(s, params, grad, m, v, out),
        (true, true) => chunked::<true, true, MIRROR>(s, params, grad, m, v, out),
        (true, false) => chunked::<true, false, MIRROR>(s, params, grad, m, v, out),
    }
}

/// Values per block: two AVX2 or one AVX-512 register per operand.
const BLOCK: usize = 16;

/// Whole blocks through local arrays (all loads, then the arithmetic, then the stores: a shape
/// that vectorises whatever the compiler concludes about the slices; hoisting the choices alone
/// was not tried apart), then the tail one value at a time. With `MIRROR`, `out` (as long as
/// `params`) gets each new value from the register it is stored from.
#[inline(always)]
fn chunked<const DIVIDE: bool, const LERP_FROM_START: bool, const MIRROR: bool>(
    s: &Scalars,
    params: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    out: &mut [f32],
) {
    let decay = s.decay.unwrap_or(1.0);
    let (GradScale::Multiply(scale) | GradScale::Divide(scale)) = s.grad_scale;
    let mut blocks = params
        .chunks_exact_mut(BLOCK)
        .zip(grad.chunks_exact(BLOCK))
        .zip(m.chunks_exact_mut(BLOCK))
        .zip(v.chunks_exact_mut(BLOCK));
    let mut out_blocks = out.chunks_exact_mut(BLOCK);
    for (((p, g), m), v) in &mut blocks {
        let (mut pl, mut ml, mut vl) = (block(p), block(m), block(v));
        let gl = block(g);
        for i in 0..BLOCK {
            let (p, m, v) = (&mut pl[i], &mut ml[i], &mut vl[i]);
            update::<DIVIDE, LERP_FROM_START>(s, decay, scale, p, gl[i], m, v);
        }
        p.copy_from_slice(&pl);
        m.copy_from_slice(&ml);
        v.copy_from_slice(&vl);
        if MIRROR {
            let out = out_blocks.next().expect("`out` is as long as `params`");
            out.copy_from_slice(&pl);
        }
    }
    let whole = params.len() / BLOCK * BLOCK;
    let tail = params[whole..]
        .iter_mut()
        .zip(&grad[whole..])
        .zip(&mut m[whole..])
        .zip(&mut v[whole..]);
    for (i, (((p, &g), m), v)) in tail.enumerate() {
        update::<DIVIDE, LERP_FROM_START>(s, decay, scale, p, g, m, v);
        if MIRROR {
            out[whole + i] = *p;
        }
    }
}

#[inline(always)]
fn block(values: &[f32]) -> [f32; BLOCK] {
    values.try_into().expect("a whole block")
}

/// `1 / divisor` if it is exact and normal, i.e. `divisor` is a power of two (1 and the usual batch
/// sizes among them), else `None`.
fn exact_reciprocal(divisor: f32) -> Option<f32> {
    let reciprocal = 1.0 / divisor;
    let power_of_two = |v: f32| v.is_normal() && v.to_bits() & 0x007f_ffff == 0;
    (power_of_two(divisor) && power_of_two(reciprocal)).then_some(reciprocal)
}

/// One value's step, in PyTorch's order of operations.
#[inline(always)]
fn update<const DIVIDE: bool, const LERP_FROM_START: bool>(
    s: &Scalars,
    decay: f32,
    scale: f32,
    p: &mut f32,
    g: f32,
    m: &mut f32,
    v: &mut f32,
) {
    // `scale` is the divisor, or its exact reciprocal ([`GradScale`]).
    let g = if DIVIDE { g / scale } else { g * scale };
    *p *= decay;
    *m = flush_tiny(lerp::<LERP_FROM_START>(*m, g, s.lerp_weight));
    // addcmul: self + value * t1 * t2, left to right.
    *v = flush_tiny(*v * s.beta2 + s.one_minus_beta2 * g * g);
    let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
    // addcdiv: self + value * t1 / t2, left to right.
    *p += s.neg_step_size * *m / denom;
}

/// PyTorch's `lerp`: from the nearer end (`FROM_START` when `|weight| < 0.5`), so a weight near 1
/// loses no precision.
#[inline(always)]
fn lerp<const FROM_START: bool>(start: f32, end: f32, weight: f32) -> f32 {
    if FROM_START {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::on_every_path;
    use crate::optim::MOMENT_FLOOR;

    #[test]
    fn lerp_hits_both_ends() {
        assert_eq!(lerp::<true>(2.0, 5.0, 0.0), 2.0);
        assert_eq!(lerp::<false>(2.0, 5.0, 1.0), 5.0);
        assert_eq!(lerp::<true>(2.0, 6.0, 0.25), 3.0);
        assert_eq!(lerp::<false>(2.0, 6.0, 0.75), 5.0);
    }

    /// The per-value definition, every choice made per value as PyTorch's loop reads.
    fn reference(
        s: &Scalars,
        divisor: f32,
        params: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) {
        for (((p, &g), m), v) in params.iter_mut().zip(grad).zip(m).zip(v) {
            let g = if divisor == 1.0 { g } else { g / divisor };
            if let Some(decay) = s.decay {
                *p *= decay;
            }
            *m = if s.lerp_weight.abs() < 0.5 {
                *m + s.lerp_weight * (g - *m)
            } else {
                g - (g - *m) * (1.0 - s.lerp_weight)
            };
            *v = *v * s.beta2 + s.one_minus_beta2 * g * g;
            for moment in [&mut *m, &mut *v] {
                if moment.abs() < 2f32.powi(-96) {
                    *moment = 0.0;
                }
            }
            let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
            *p += s.neg_step_size * *m / denom;
        }
    }

    #[test]
    fn only_powers_of_two_have_exact_reciprocals() {
        assert_eq!(exact_reciprocal(1.0), Some(1.0));
        assert_eq!(exact_reciprocal(128.0), Some(1.0 / 128.0));
        assert_eq!(exact_reciprocal(0.25), Some(4.0));
        let scale = |divisor| Scalars::new(1e-3, 0.9, 0.999, 1e-8, 0.0, 1).with_divisor(divisor);
        assert_eq!(scale(128.0).grad_scale, GradScale::Multiply(1.0 / 128.0));
        assert_eq!(scale(3.0).grad_scale, GradScale::Divide(3.0));
        for divisor in [
            3.0,
            100.0,
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NAN,
            1e-40,
            2f32.powi(127),
        ] {
            assert_eq!(exact_reciprocal(divisor), None, "{divisor}");
        }
    }

    #[test]
    fn every_variant_on_every_vector_path_gives_the_reference_bits() {
        // Awkward values: tiny and huge gradients, zero moments; a length with a tail.
        let n = 4099;
        let grad: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 313.0 - 1.5)
            .map(|g| g * 10f32.powi((g * 7.0) as i32))
            .enumerate()
            // Some tiny enough to give subnormal quotients, a few subnormal already.
            .map(|(i, g)| match i % 101 {
                0 => g * 1e-37,
                1 => g * 1e-43,
                2..=9 => 0.0,
                // Second moments below the floor while first moments stay above it.
                10..=12 => 2.5e-15,
                _ => g,
            })
            .collect();
        let start: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01 - 0.3).collect();
        // Moments at the floor, just above it (decaying below), and subnormal (as an older
        // build's checkpoint may hold), among ordinary ones.
        let moments = |i: usize| match i % 7 {
            0 => (MOMENT_FLOOR, MOMENT_FLOOR),
            1 => (-1.05 * MOMENT_FLOOR, 1.0005 * MOMENT_FLOOR),
            2 => (-1e-40, 1e-41),
            _ => ((i % 5) as f32 * 0.1, (i % 3) as f32 * 0.01),
        };
        let (m0, v0): (Vec<f32>, Vec<f32>) = (0..n).map(moments).unzip();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // Every branch of `kernel_body`: no divisor, one by which it divides (3), ones by which it
        // multiplies (powers of two), decay or not, lerp from either end.
        for (beta1, wd, divisor) in [0.9, 0.3]
            .into_iter()
            .flat_map(|b| [(b, 0.0), (b, 0.01)])
            .flat_map(|(b, wd)| [1.0, 3.0, 128.0, 0.25].map(|d| (b, wd, d)))
        {
            let s = Scalars::new(1e-3, beta1, 0.999, 1e-8, wd, 7).with_divisor(divisor);
            let (mut p, mut m, mut v) = (start.clone(), m0.clone(), v0.clone());
            reference(&s, divisor, &mut p, &grad, &mut m, &mut v);
            let want = (bits(&p), bits(&m), bits(&v));
            assert_ne!(want.0, bits(&start), "the step must change the parameters");
            // The floor fired, for both moments: one decayed from the floor to zero, and a
            // second moment zeroed under a nonzero first moment by a nonzero gradient.
            assert!((0..n).any(|i| m0[i] != 0.0 && m[i] == 0.0 && v0[i] != 0.0 && v[i] == 0.0));
            assert!((0..n).any(|i| grad[i] != 0.0 && m[i] != 0.0 && v[i] == 0.0));
            // `kernel_body` called inside the closure, so that each path's copy inlines it.
            let results = on_every_path(
                #[inline(always)]
                || {
                    let (mut p, mut m, mut v) = (start.clone(), m0.clone(), v0.clone());
                    kernel_body(&s, &mut p, &grad, &mut m, &mut v, None);
                    // The same step with a mirror: the same results, and the mirror holds `p`.
                    let (mut mp, mut mm, mut mv) = (start.clone(), m0.clone(), v0.clone());
                    let mut mirror = vec![f32::NAN; n];
                    kernel_body(&s, &mut mp, &grad, &mut mm, &mut mv, Some(&mut mirror));
                    let mirrored = (bits(&mp), bits(&mm), bits(&mv), bits(&mirror));
                    (bits(&p), bits(&m), bits(&v), mirrored)
                },
            );
            for (path, (p, m, v, mirrored)) in &results {
                assert!(
                    (p, m, v) == (&want.0, &want.1, &want.2),
                    "beta1 {beta1} wd {wd} divisor {divisor}: {path} differs from the reference"
                );
                assert!(
                    *mirrored
                        == (
                            want.0.clone(),
                            want.1.clone(),
                            want.2.clone(),
                            want.0.clone()
                        ),
                    "beta1 {beta1} wd {wd} divisor {divisor}: {path} with a mirror"
                );
            }
        }
    }

    #[test]
    fn a_moment_that_decays_below_the_floor_becomes_zero_not_a_stuck_subnormal() {
        assert_eq!(MOMENT_FLOOR, 2f32.powi(-96));
        let s = Scalars::new(1e-3, 0.9, 0.999, 1e-8, 0.0, 1);
        // Two vector blocks and a tail, every value alike.
        let n = 2 * BLOCK + 1;
        let (mut p, mut m, mut v) = (vec![0.5f32; n], vec![1e-3f32; n], vec![1e-6f32; n]);
        let zeros = vec![0.0f32; n];
        let mut steps_to_zero = None;
        for step in 1..=100_000 {
            kernel(&s, &mut p, &zeros, &mut m, &mut v, None);
            for &moment in m.iter().chain(&v) {
                assert!(
                    moment == 0.0 || moment.abs() >= MOMENT_FLOOR,
                    "step {step}: {moment:e}"
                );
            }
            if m.iter().all(|&x| x == 0.0) && steps_to_zero.is_none() {
                steps_to_zero = Some(step);
            }
        }
        // 1e-3 * 0.9^t < 2^-96 from t = 565 on; v (0.999 a step) after about 52,700 steps.
        let steps = steps_to_zero.expect("m reaches zero");
        assert!(
            (560..=570).contains(&steps),
            "m reached zero after {steps} steps"
        );
        assert!(v.iter().all(|&x| x == 0.0), "v reaches zero too");
        // Unflushed, the same recurrence sticks at a subnormal: PyTorch's m after the same steps.
        let mut unflushed = 1e-3f32;
        for _ in 0..100_000 {
            unflushed = unflushed + 0.1 * (0.0 - unflushed);
        }
        assert!(unflushed.is_subnormal(), "{unflushed:e}");
    }

    #[test]
    fn parallel_and_serial_paths_agree_bit_for_bit() {
        let n = PARALLEL_MIN + 3 * CHUNK + 17;
        let grad: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 313.0 - 1.5)
            .collect();
        let s = Scalars::new(1e-3, 0.9, 0.999, 1e-8, 0.01, 3);
        let start: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01).collect();
        let (mut p1, mut m1, mut v1) = (start.clone(), vec![0.1; n], vec![0.2; n]);
        let (mut p2, mut m2, mut v2) = (p1.clone(), m1.clone(), v1.clone());
        step(&s, &mut p1, &grad, &mut m1, &mut v1);
        kernel(&s, &mut p2, &grad, &mut m2, &mut v2, None);
        assert_eq!(p1, p2);
        assert_eq!(m1, m2);
        assert_eq!(v1, v2);
        assert_ne!(p1, start, "the step must change the parameters");
    }
}
