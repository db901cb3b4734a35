//! Reparameterisation noise keyed by the example, not by the process (docs/design.md §2).
//!
//! `eps` for `(seed, epoch, example, sample k)` is the first `Z` standard normals of the stream
//! `KeyedRng::new(&[NOISE, seed, epoch, example, k])`, drawn in Box-Muller pairs. Any process,
//! any thread, in any order, draws the same `eps` for the same key.

use rayon::prelude::*;

use crate::kernels::Float;
use crate::model::{KeyedRng, domain};

/// Examples per parallel piece when filling noise for many examples.
const PARALLEL_PIECE: usize = 32;

/// Writes the `out.len()` (the latent size Z) normals of `(seed, epoch, example, k)` into `out`.
pub fn sample_eps<T: Float>(seed: u64, epoch: u64, example: u64, k: u64, out: &mut [T]) {
    let mut rng = KeyedRng::new(&[domain::NOISE, seed, epoch, example, k]);
    for pair in out.chunks_mut(2) {
        let (a, b) = rng.next_normal_pair();
        pair[0] = T::from_f64(a);
        if let Some(second) = pair.get_mut(1) {
            *second = T::from_f64(b);
        }
    }
}

/// Fills `out: [examples.len() * samples, latent]` (row `i * samples + k` holds sample `k` of
/// example `examples[i]`) with samples `first_k .. first_k + samples` of each example.
pub fn fill_eps<T: Float, E: Copy + Into<u64> + Sync>(
    seed: u64,
    epoch: u64,
    examples: &[E],
    first_k: u64,
    samples: usize,
    latent: usize,
    out: &mut [T],
) {
    assert_eq!(
        out.len(),
        examples.len() * samples * latent,
        "noise buffer is [examples * samples, latent]"
    );
    if latent == 0 || samples == 0 {
        return;
    }
    let per_example = samples * latent;
    let fill = |example: E, block: &mut [T]| {
        for (k, row) in block.chunks_exact_mut(latent).enumerate() {
            sample_eps(seed, epoch, example.into(), first_k + k as u64, row);
        }
    };
    if examples.len() <= PARALLEL_PIECE {
        for (&example, block) in examples.iter().zip(out.chunks_exact_mut(per_example)) {
            fill(example, block);
        }
    } else {
        examples
            .par_chunks(PARALLEL_PIECE)
            .zip(out.par_chunks_mut(PARALLEL_PIECE * per_example))
            .for_each(|(ids, blocks)| {
                for (&example, block) in ids.iter().zip(blocks.chunks_exact_mut(per_example)) {
                    fill(example, block);
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_key_layout() {
        let examples = [5u64, 9, 2];
        let (samples, latent) = (3, 5);
        let mut out = vec![0.0f64; examples.len() * samples * latent];
        fill_eps(11, 4, &examples, 0, samples, latent, &mut out);
        for (i, &ex) in examples.iter().enumerate() {
            for k in 0..samples {
                let mut want = vec![0.0f64; latent];
                sample_eps(11, 4, ex, k as u64, &mut want);
                let row = (i * samples + k) * latent;
                assert_eq!(&out[row..row + latent], &want[..]);
            }
        }
        // An odd latent size uses the first of the last pair.
        let mut three = [0.0f64; 3];
        let mut four = [0.0f64; 4];
        sample_eps(1, 2, 3, 0, &mut three);
        sample_eps(1, 2, 3, 0, &mut four);
        assert_eq!(three[..], four[..3]);
    }
}
