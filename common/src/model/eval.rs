//! Held-out evaluation: the ELBO and the importance-weighted bound.
//!
//! - ELBO with K = 1 and the fixed evaluation noise key `(NOISE, seed, EVAL_EPOCH, row, k)`, so
//!   the figure for the same parameters is the same in every epoch and on every machine.
//! - The importance-weighted bound (Burda et al.) with k samples,
//!   `log (1/k) sum_j p(x, z_j) / q(z_j | x)`, `z_j = mu + sigma eps_j`, where
//!   `log p(x, z) - log q(z|x) = log p(x|z) - |z|^2/2 + sum_i lv_i/2 + |eps|^2/2` (the
//!   `Z/2 log 2 pi` terms cancel). The log-mean-exp runs in f64 with a running maximum.
//!
//! Examples are cut into fixed chunks evaluated in parallel and combined in chunk order, so the
//! report is the same for any thread count. Rows are keyed by their index in `x`.

use ndarray::{ArrayView2, Axis};
use rayon::prelude::*;

use crate::kernels::Float;
use crate::model::fill_eps;
use crate::model::{BatchStats, Vae, Workspace};
use crate::{Error, Result};

/// The `epoch` component of evaluation noise keys: no training epoch reaches it.
pub const EVAL_EPOCH: u64 = u64::MAX;

/// Examples per evaluation chunk (the unit of parallel work and of combination order).
const CHUNK_ROWS: usize = 128;

/// Decoder rows per importance-sampling pass (examples x samples), bounding memory.
const IW_DECODER_ROWS: usize = 4096;

/// Held-out figures, means per example, in nats.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalReport {
    pub examples: u64,
    /// Mean ELBO (K = 1, evaluation noise).
    pub elbo: f64,
    /// Mean reconstruction term `log p(x|z)`.
    pub recon: f64,
    /// Mean KL(q(z|x) || p(z)).
    pub kl: f64,
    /// Samples of the importance-weighted bound (0 when skipped).
    pub iw_samples: usize,
    /// Mean importance-weighted bound, `None` when `iw_samples` is 0.
    pub iw_bound: Option<f64>,
}

/// Evaluates `params` on every row of `x: [n, D]`.
pub fn evaluate<T: Float>(
    vae: &Vae,
    params: &[T],
    x: ArrayView2<T>,
    seed: u64,
    iw_samples: usize,
) -> Result<EvalReport> {
    let n = x.nrows();
    if n == 0 {
        return Err(Error::DataMismatch(
            "the evaluation set is empty: nothing to evaluate".into(),
        ));
    }
    let chunks: Vec<(usize, ArrayView2<T>)> = x
        .axis_chunks_iter(Axis(0), CHUNK_ROWS)
        .enumerate()
        .map(|(c, view)| (c * CHUNK_ROWS, view))
        .collect();
    let results: Vec<Result<(BatchStats, f64)>> = chunks
        .into_par_iter()
        .map(|(first, chunk)| evaluate_chunk(vae, params, chunk, first, seed, iw_samples))
        .collect();
    let mut total = BatchStats::default();
    let mut iw_total = 0.0;
    for result in results {
        let (stats, iw) = result?;
        total += stats;
        iw_total += iw;
    }
    let count = total.examples as f64;
    Ok(EvalReport {
        examples: total.examples,
        elbo: total.elbo / count,
        recon: total.recon / count,
        kl: total.kl / count,
        iw_samples,
        iw_bound: (iw_samples > 0).then_some(iw_total / count),
    })
}

/// One chunk: its ELBO sums and the sum of its examples' IW bounds (0 if skipped).
fn evaluate_chunk<T: Float>(
    vae: &Vae,
    params: &[T],
    x: ArrayView2<T>,
    first_row: usize,
    seed: u64,
    iw_samples: usize,
) -> Result<(BatchStats, f64)> {
    let n = x.nrows();
    let z_dim = vae.config().latent;
    let ids: Vec<u64> = (first_row as u64..(first_row + n) as u64).collect();
    let mut ws = Workspace::new();
    let mut eps = vec![T::zero(); n * z_dim];
    fill_eps(seed, EVAL_EPOCH, &ids, 0, 1, z_dim, &mut eps);
    let eps_view = ArrayView2::from_shape((n, z_dim), &eps[..]).expect("n * Z noise");
    let sums = vae.elbo(params, x, eps_view, &mut ws)?;
    if iw_samples == 0 {
        return Ok((sums, 0.0));
    }

    // The encoder's output stays in `ws`; only the decoder runs per block of samples.
    let x = x.as_standard_layout();
    let half_logvar: Vec<f64> = ws
        .posterior()
        .1
        .chunks_exact(z_dim)
        .map(|lv| lv.iter().map(|v| 0.5 * v.as_f64()).sum())
        .collect();
    let block = (IW_DECODER_ROWS / n).clamp(1, iw_samples);
    // Running log-sum-exp per example: (max, sum of exp(lw - max)).
    let mut lse = vec![(f64::NEG_INFINITY, 0.0f64); n];
    let mut k0 = 0;
    while k0 < iw_samples {
        let kb = block.min(iw_samples - k0);
        let mut eps = vec![T::zero(); n * kb * z_dim];
        fill_eps(seed, EVAL_EPOCH, &ids, k0 as u64, kb, z_dim, &mut eps);
        vae.reparameterise(&eps, kb, &mut ws);
        vae.decode(params, &x, kb, &mut ws, false);
        let z = ws.latents();
        for (r, &loglik) in ws.row_loglik()[..n * kb].iter().enumerate() {
            let i = r / kb;
            let zr = &z[r * z_dim..(r + 1) * z_dim];
            let er = &eps[r * z_dim..(r + 1) * z_dim];
            let mut quad = 0.0f64;
            for (&zv, &ev) in zr.iter().zip(er) {
                let (zv, ev) = (zv.as_f64(), ev.as_f64());
                quad += ev * ev - zv * zv;
            }
            let lw = loglik + 0.5 * quad + half_logvar[i];
            let (max, sum) = &mut lse[i];
            if lw > *max {
                *sum = *sum * (*max - lw).exp() + 1.0;
                *max = lw;
            } else {
                *sum += (lw - *max).exp();
            }
        }
        k0 += kb;
    }
    let log_k = (iw_samples as f64).ln();
    let iw: f64 = lse.iter().map(|(max, sum)| max + sum.ln() - log_k).sum();
    Ok((sums, iw))
}
