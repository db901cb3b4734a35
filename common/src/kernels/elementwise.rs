//! The elementwise kernels of the forward and backward passes, beside the GEMMs: bias and
//! activation, the ReLU backward step, an output row's terms summed in fixed lanes, and
//! `acc += x`.
//!
//! Every element's result depends only on that element (or, for a row kernel, on that row), so
//! cutting a pass into pieces for threads cannot change a bit; the pieces are sized from the
//! buffer's length alone, and only speed depends on them.

use rayon::prelude::*;

use super::Float;

/// Elements per parallel piece of an elementwise pass (row-aligned for row kernels).
const PIECE_ELEMENTS: usize = 1 << 13;

/// Below this many elements an elementwise pass runs on one thread: splitting costs more than it
/// saves.
const PARALLEL_MIN: usize = 1 << 14;

/// Lanes of the per-row sums: fixed, so the compiler can vectorise the sum and the result is the
/// same whatever instruction set it picks.
const LANES: usize = 8;

/// A prefix of `v` of length `len`, growing `v` if needed (never shrinking, so steady-state
/// training does not reallocate or re-zero).
pub(crate) fn sized<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

/// Runs `f` over matching pieces of `a` and `b` (the same length), in parallel when they are
/// long.
fn zip_pieces<T: Float>(a: &mut [T], b: &[T], f: impl Fn(&mut [T], &[T]) + Sync + Send) {
    if a.len() < PARALLEL_MIN {
        f(a, b);
    } else {
        a.par_chunks_mut(PIECE_ELEMENTS)
            .zip(b.par_chunks(PIECE_ELEMENTS))
            .for_each(|(a, b)| f(a, b));
    }
}

/// `acc[i] += x[i]`, in parallel for long vectors.
///
/// # Panics
/// If the lengths differ.
pub fn add_assign<T: Float>(acc: &mut [T], x: &[T]) {
    assert_eq!(acc.len(), x.len(), "add_assign: lengths differ");
    zip_pieces(acc, x, |acc, x| {
        acc.iter_mut().zip(x).for_each(|(a, &b)| *a = *a + b);
    });
}

/// The ReLU backward step: `d[i] = 0` where `act[i] <= 0` (`act` is the layer's post-ReLU
/// output, so `act > 0` exactly where the pre-activation was positive).
///
/// # Panics
/// If the lengths differ.
pub fn relu_mask<T: Float>(d: &mut [T], act: &[T]) {
    assert_eq!(
        d.len(),
        act.len(),
        "relu backward: gradient and activation differ in size"
    );
    zip_pieces(d, act, |d, act| {
        for (dv, &av) in d.iter_mut().zip(act) {
            // A select with a store to every element, not a store only where `act <= 0`: LLVM
            // vectorises this (compare and mask), where the conditional store became one branch
            // per element (3% of a 4-worker run's CPU). Same bits: `+0` where `act <= 0`, `d`
            // elsewhere (a NaN `act` included).
            *dv = if av <= T::zero() { T::zero() } else { *dv };
        }
    });
}

/// `out[r, :] = act(out[r, :] + bias)` for every row of a row-major `out: [rows, bias.len()]`,
/// with `act` the ReLU when `relu`, else the identity.
pub(crate) fn add_bias_act<T: Float>(out: &mut [T], bias: &[T], relu: bool) {
    let cols = bias.len();
    let kernel = |block: &mut [T]| {
        for row in block.chunks_exact_mut(cols) {
            for (o, &b) in row.iter_mut().zip(bias) {
                let v = *o + b;
                *o = if relu && v <= T::zero() { T::zero() } else { v };
            }
        }
    };
    if out.len() < PARALLEL_MIN {
        kernel(out);
    } else {
        let rows_per_piece = (PIECE_ELEMENTS / cols).max(1);
        out.par_chunks_mut(rows_per_piece * cols).for_each(kernel);
    }
}

/// Runs `f(first_row, rows_block, extra_block)` over row-aligned pieces of a row-major
/// `buf: [rows, cols]` and the matching pieces of `extra` (one value per row), in parallel when
/// the buffer is large. `f` must compute each row from that row alone.
pub(crate) fn for_row_pieces<T: Float, F>(buf: &mut [T], cols: usize, extra: &mut [f64], f: F)
where
    F: Fn(usize, &mut [T], &mut [f64]) + Sync + Send,
{
    let rows = buf.len().checked_div(cols).unwrap_or(0);
    let rows_per_piece = (PIECE_ELEMENTS / cols.max(1)).max(1);
    if buf.len() < PARALLEL_MIN || rows <= rows_per_piece {
        f(0, buf, extra);
        return;
    }
    buf.par_chunks_mut(rows_per_piece * cols)
        .zip(extra.par_chunks_mut(rows_per_piece))
        .enumerate()
        .for_each(|(p, (block, extra))| f(p * rows_per_piece, block, extra));
}

/// One output row: adds the bias, computes `(term, dL/df) = term_and_grad(f, x)` per element
/// (when `GRAD`, overwriting the row with `dL/df`), and returns the row's sum of terms. The
/// elementwise loop has no loop-carried dependency, so it vectorises; the terms go through
/// `terms` (scratch, the row's length) and are summed by [`lane_sum`].
#[inline(always)]
pub(crate) fn output_row<T: Float, const GRAD: bool>(
    out: &mut [T],
    x: &[T],
    bias: &[T],
    terms: &mut [T],
    term_and_grad: impl Fn(T, T) -> (T, T),
) -> f64 {
    for (((o, &xv), &b), t) in out.iter_mut().zip(x).zip(bias).zip(terms.iter_mut()) {
        let (term, d) = term_and_grad(*o + b, xv);
        *t = term;
        if GRAD {
            *o = d;
        }
    }
    lane_sum(terms)
}

/// Sum in f64 with [`LANES`] fixed accumulators (element `i` goes to lane `i % LANES`), combined
/// pairwise: the same result whatever vector width the compiler picks.
#[inline(always)]
pub(crate) fn lane_sum<T: Float>(v: &[T]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for lane in 0..LANES {
            acc[lane] += c[lane].as_f64();
        }
    }
    for (lane, &t) in chunks.remainder().iter().enumerate() {
        acc[lane] += t.as_f64();
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `relu_mask` is the select `act <= 0 ? +0 : d` for every value, signed zeros and NaNs
    /// included, on pieces long enough to run in parallel too.
    #[test]
    fn relu_mask_keeps_d_exactly_where_act_is_not_at_most_zero() {
        let acts = [
            1.5f32,
            0.0,
            -0.0,
            -2.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
        ];
        let ds = [-3.0f32, 7.0, f32::NAN, -0.0, 2.5, -1.0, 4.0, 9.0];
        for len in [8, PARALLEL_MIN + 8] {
            let act: Vec<f32> = (0..len).map(|i| acts[i % 8]).collect();
            let mut d: Vec<f32> = (0..len).map(|i| ds[(i * 3) % 8]).collect();
            let before = d.clone();
            relu_mask(&mut d, &act);
            for ((got, a), was) in d.iter().zip(&act).zip(&before) {
                let want = if *a <= 0.0 { 0.0f32 } else { *was };
                assert_eq!(got.to_bits(), want.to_bits(), "act {a}, d {was}");
            }
        }
    }
    use crate::kernels::on_every_path;

    fn filled(len: usize, salt: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 131 + salt * 17) % 997) as f32 / 997.0) - 0.5)
            .collect()
    }

    #[test]
    fn add_assign_is_elementwise_at_every_length() {
        for len in [0, 3, PARALLEL_MIN - 1, PARALLEL_MIN, 5 * PIECE_ELEMENTS + 7] {
            let (a, b) = (filled(len, 1), filled(len, 2));
            let mut acc = a.clone();
            add_assign(&mut acc, &b);
            for ((got, x), y) in acc.iter().zip(&a).zip(&b) {
                assert_eq!(got.to_bits(), (x + y).to_bits());
            }
        }
    }

    #[test]
    fn an_output_row_has_the_same_bits_on_every_vector_path() {
        // The Bernoulli terms as the decoder computes them: polynomials, a division, lane sums.
        let d = 784;
        let logits: Vec<f32> = filled(d, 5).iter().map(|v| v * 60.0).collect();
        let x: Vec<f32> = filled(d, 6).iter().map(|v| (v + 0.5).round()).collect();
        let bias = filled(d, 7);
        let term = |f: f32, xv: f32| {
            let (sp, s) = f32::softplus_sigmoid(f);
            (xv * f - sp, (s - xv) * 0.25)
        };
        let results = on_every_path(
            #[inline(always)]
            || {
                let mut row = logits.clone();
                let mut terms = vec![0.0f32; d];
                let sum = output_row::<f32, true>(&mut row, &x, &bias, &mut terms, term);
                let bits: Vec<u32> = row.iter().map(|v| v.to_bits()).collect();
                (sum.to_bits(), bits)
            },
        );
        let (_, baseline) = &results[0];
        for (path, result) in &results[1..] {
            assert!(result == baseline, "{path} differs from baseline");
        }
    }

    #[test]
    fn lane_sum_and_bias_relu() {
        let v: Vec<f64> = filled(1003, 3).into_iter().map(f64::from).collect();
        let want = v.iter().sum::<f64>();
        assert!((lane_sum(&v) - want).abs() < 1e-12);
        let mut bias_rows = vec![0.0f32; 40 * 500];
        let bias = filled(500, 4);
        add_bias_act(&mut bias_rows, &bias, true);
        for row in bias_rows.chunks_exact(500) {
            for (o, b) in row.iter().zip(&bias) {
                assert_eq!(*o, b.max(0.0));
            }
        }
    }
}
