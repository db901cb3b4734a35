//! Runs a kernel compiled for the widest vector instructions this CPU has.
//!
//! Our binaries are built for baseline x86-64 (SSE2, four f32 lanes) so that they run on any
//! x86-64 machine. The hot elementwise loops (Adam's two divisions and square root per value, the
//! output layer's likelihood terms) and the weight-gradient kernel are worth 2-4x more lanes, so
//! [`with_widest_vectors`] calls them through a copy compiled with AVX-512F or AVX2 (and FMA),
//! chosen at run time. (The weight-gradient kernel's f32 tiles on AVX-512 are written with
//! intrinsics instead, `tree_tile_avx512.rs`, and dispatched there; its other cases come here.)
//!
//! Bits: the path changes only the vector width, never an operation. Rust never fuses a multiply
//! and an add unless the code asks for `mul_add` (which rounds once on every path: the FMA
//! instruction here, the correctly rounded software routine on baseline), and every other
//! floating-point operation is correctly rounded at any width. So every path gives the same bits
//! for every result that is not a NaN (a NaN's sign and payload may differ; non-finite gradients
//! are rejected anyway). Tests run kernels on every path this CPU has ([`on_every_path`]).
//!
//! Unsafe: the only unsafe code here is the call of a `#[target_feature]` function after
//! `is_x86_feature_detected!` has confirmed that this CPU has those features.

/// Calls `kernel` compiled for AVX-512F + FMA or AVX2 + FMA when the CPU has them, else as it is.
/// Only code inlined into the wrappers is compiled for the wider instructions, so `kernel` must be
/// an `#[inline(always)]` closure calling `#[inline(always)]` code (a plain closure was left out of
/// line, in another codegen unit, and kept its four lanes).
#[inline(always)]
pub(crate) fn with_widest_vectors<R>(kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("fma") {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX-512F and FMA, the features `avx512` is compiled for.
            return unsafe { avx512(kernel) };
        }
        if has!("avx2") && has!("fma") {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2 and FMA, the features `avx2` is compiled for.
            return unsafe { avx2(kernel) };
        }
    }
    kernel()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn avx512<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

/// `kernel`'s results on every path this CPU has: baseline, then AVX2 + FMA and AVX-512F + FMA
/// where detected (for tests comparing the paths bit for bit; `kernel` as for
/// [`with_widest_vectors`], and it must not dispatch again inside). `kernel` is called directly
/// inside the wrappers: passed as `&kernel`, the call went through `<&F as FnOnce>::call_once`,
/// which LLVM left out of line (`objdump` of the test binary), so every "path" ran baseline code.
#[cfg(test)]
#[allow(clippy::redundant_closure)] // the closures are what gets `kernel` inlined
pub(crate) fn on_every_path<R>(kernel: impl Fn() -> R) -> Vec<(&'static str, R)> {
    let mut results = vec![("baseline", kernel())];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2 and FMA.
            results.push(("avx2", unsafe {
                avx2(
                    #[inline(always)]
                    || kernel(),
                )
            }));
        }
        if has!("avx512f") && has!("fma") {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX-512F and FMA.
            results.push(("avx512", unsafe {
                avx512(
                    #[inline(always)]
                    || kernel(),
                )
            }));
        }
    }
    results
}
