//! Copies of f32 values that avoid `memcpy`'s slow case on some CPUs, the copy that measures
//! what it stores, and the addition that measures what it adds.
//!
//! glibc copies kilobytes with `rep movsb`. On a Zen 3 EPYC `rep movsb` runs at a seventh of its
//! speed when source and destination sit at different offsets within a 64-byte cache line: 2.6 MB
//! in 8 KiB pieces took 1.4 ms against 0.2-0.3 ms (docs/scaling.md §25). The step's large copies
//! meet that case every time: a shared-memory mapping starts on a page (the parameter file's
//! values 64 bytes into it), a large `Vec` 16 bytes into one. So where the offsets differ these
//! copies run as our own loop. Where they match they stay `memcpy`, which an Emerald Rapids Xeon
//! ran 1.8x faster than a loop (its large copies skip reading the destination first;
//! docs/scaling.md §17).

use super::with_widest_vectors;

/// The bits of `|v|` for an f32: for non-negative floats the bit patterns order like the values,
/// with infinity and then NaN above every finite value.
const MAGNITUDE_BITS: u32 = 0x7fff_ffff;

/// `dst.copy_from_slice(src)`, by `copy_measuring`'s choice of way (its magnitude, folded beside
/// the stores, costs little in a copy bound by memory, and is dropped).
///
/// # Panics
/// If the lengths differ.
pub fn copy_values(dst: &mut [f32], src: &[f32]) {
    copy_measuring(dst, src);
}

/// Copies `src` into `dst` and returns the largest `|v|` bit pattern among the values stored
/// (zero for none), measured from what was stored, whatever another process does to `src`
/// meanwhile:
/// - the same offset within a line: pieces by `memcpy`, each measured in `dst` while in L1;
/// - different offsets: one loop, each value measured from the register it was stored from.
///
/// # Panics
/// If the lengths differ.
pub fn copy_measuring(dst: &mut [f32], src: &[f32]) -> u32 {
    assert_eq!(dst.len(), src.len(), "copy lengths");
    let line_offset = |values: &[f32]| values.as_ptr() as usize % 64;
    if line_offset(dst) == line_offset(src) {
        fill_measuring(dst, |at, piece| {
            piece.copy_from_slice(&src[at..at + piece.len()]);
        })
    } else {
        with_widest_vectors(
            #[inline(always)]
            || one_loop(dst, src),
        )
    }
}

/// Fills `dst` piece by piece (`fill(start, piece)` writes the values from `start` on) and
/// returns the largest `|v|` bit pattern among them, each piece measured while it is in L1.
pub fn fill_measuring(dst: &mut [f32], mut fill: impl FnMut(usize, &mut [f32])) -> u32 {
    /// Values per piece: 8 KiB, well inside L1.
    const PIECE: usize = 2048;
    dst.chunks_mut(PIECE)
        .enumerate()
        .map(|(i, piece)| {
            fill(i * PIECE, piece);
            magnitude_bits(piece)
        })
        .max()
        .unwrap_or(0)
}

/// The largest `|v|` bit pattern among `values`: a plain fold, which LLVM turns into vector
/// maxima over several accumulators (an array of 16 running maxima was compiled for AVX-512 into
/// `vpgatherdd`, 10x slower on a Zen 4: docs/scaling.md §20).
pub fn magnitude_bits(values: &[f32]) -> u32 {
    with_widest_vectors(
        #[inline(always)]
        || fold_magnitude(values),
    )
}

#[inline(always)]
fn fold_magnitude(values: &[f32]) -> u32 {
    values
        .iter()
        .fold(0, |peak, v| peak.max(v.to_bits() & MAGNITUDE_BITS))
}

/// Stores each value and folds its magnitude. The slices pass through `black_box` first, so LLVM
/// cannot prove they do not overlap: it may then neither turn the loop into a `memcpy` (which
/// it did for the baseline path, measuring by reading `src` a second time) nor read `src` again
/// after a store that might have changed it, so the value measured is the register stored.
/// `black_box` promises this only in practice; `objdump` of the release coordinator showed the
/// baseline, AVX2 and AVX-512 loops as loads, stores and maxima of the stored registers, with no
/// call (docs/scaling.md §25), and no test can see a second read.
#[inline(always)]
fn one_loop(dst: &mut [f32], src: &[f32]) -> u32 {
    let (dst, src) = std::hint::black_box((dst, src));
    dst.iter_mut().zip(src).fold(0, |peak, (d, &v)| {
        *d = v;
        peak.max(v.to_bits() & MAGNITUDE_BITS)
    })
}

/// `acc[i] += src[i]` for every value, and the largest `|v|` bit pattern among the `src` values
/// (zero for none), each measured from the register it was added from, whatever another process
/// does to `src` meanwhile: the loop of [`one_loop`] with an addition for the store, and the same
/// `black_box` on the slices, so that LLVM reads each `src` value once.
///
/// # Panics
/// If the lengths differ.
pub fn add_measuring(acc: &mut [f32], src: &[f32]) -> u32 {
    assert_eq!(acc.len(), src.len(), "addition lengths");
    with_widest_vectors(
        #[inline(always)]
        || add_loop(acc, src),
    )
}

#[inline(always)]
fn add_loop(acc: &mut [f32], src: &[f32]) -> u32 {
    let (acc, src) = std::hint::black_box((acc, src));
    acc.iter_mut().zip(src).fold(0, |peak, (a, &v)| {
        *a += v;
        peak.max(v.to_bits() & MAGNITUDE_BITS)
    })
}

/// One value of every kind the magnitude check must catch or pass (tests here and in
/// `train::gradient`).
#[cfg(test)]
pub(crate) const OUTLIERS: [f32; 6] = [3.5, -3.5, 1e30, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::on_every_path;

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// The loop on every vector path this CPU has (baseline included), for lengths around a
    /// vector and every kind of outlier at every position class.
    #[test]
    fn the_loop_copies_every_bit_and_measures_on_every_path() {
        for len in [0usize, 1, 15, 16, 17, 33, 1000, 2049] {
            for at in [0, 7, 15, 16, len.saturating_sub(1)] {
                for big in OUTLIERS {
                    if at >= len {
                        continue;
                    }
                    let mut src: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
                    src[at] = big;
                    for (path, (copy, bits)) in on_every_path(
                        #[inline(always)]
                        || {
                            let mut dst = vec![0.0f32; len];
                            let bits = one_loop(&mut dst, &src);
                            (dst, bits)
                        },
                    ) {
                        assert!(same_bits(&copy, &src), "{path}: len {len}");
                        assert_eq!(bits, big.abs().to_bits(), "{path}: len {len}, at {at}");
                        assert_eq!(bits, fold_magnitude(&src), "{path}");
                    }
                }
            }
        }
    }

    /// The measuring addition on every vector path: each sum's bits are `a + v`'s, and the
    /// magnitude is the added values' largest.
    #[test]
    fn the_addition_adds_every_value_and_measures_on_every_path() {
        assert_eq!(
            add_measuring(&mut [], &[]),
            0,
            "nothing added, nothing measured"
        );
        for len in [1usize, 15, 16, 17, 33, 1000, 2049] {
            for at in [0, 7, 15, 16, len - 1] {
                for big in OUTLIERS {
                    if at >= len {
                        continue;
                    }
                    let acc: Vec<f32> = (0..len).map(|i| (i as f32 * 0.91).cos() * 1e3).collect();
                    let mut src: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
                    src[at] = big;
                    let want: Vec<f32> = acc.iter().zip(&src).map(|(a, v)| a + v).collect();
                    for (path, (sum, bits)) in on_every_path(
                        #[inline(always)]
                        || {
                            let mut sum = acc.clone();
                            let bits = add_loop(&mut sum, &src);
                            (sum, bits)
                        },
                    ) {
                        assert!(same_bits(&sum, &want), "{path}: len {len}");
                        assert_eq!(bits, big.abs().to_bits(), "{path}: len {len}, at {at}");
                        assert_eq!(bits, fold_magnitude(&src), "{path}");
                    }
                    let mut sum = acc.clone();
                    assert_eq!(add_measuring(&mut sum, &src), big.abs().to_bits());
                    assert!(same_bits(&sum, &want));
                }
            }
        }
    }

    /// Sixteen source starts cover every 4-byte offset within a line, so exactly one shares the
    /// fixed destination's: both ways run, and give the same copy and magnitude.
    #[test]
    fn both_ways_copy_every_bit_and_measure_alike() {
        let len = 2 * 2048 + 37;
        let mut backing: Vec<f32> = (0..len + 16).map(|i| (i as f32 * 0.71).cos()).collect();
        backing[len / 2] = -1e20;
        let line_offset = |values: &[f32]| values.as_ptr() as usize % 64;
        let mut dst = vec![0.0f32; len];
        let mut shared_offset = 0;
        for shift in 0..16 {
            let src = &backing[shift..shift + len];
            shared_offset += usize::from(line_offset(&dst) == line_offset(src));
            dst.fill(0.0);
            assert_eq!(
                copy_measuring(&mut dst, src),
                1e20f32.to_bits(),
                "shift {shift}"
            );
            assert!(same_bits(&dst, src), "shift {shift}");
            dst.fill(0.0);
            copy_values(&mut dst, src);
            assert!(same_bits(&dst, src), "shift {shift}");
        }
        assert_eq!(shared_offset, 1);
        // Empty slices both ways: at the same offset, and at two different ones.
        assert_eq!(copy_measuring(&mut dst[..0], &backing[..0]), 0);
        assert_eq!(copy_measuring(&mut dst[..0], &backing[1..1]), 0);
        assert_eq!(copy_measuring(&mut dst[..0], &backing[2..2]), 0);
    }
}
