//! Counter-based random numbers keyed by what they are for, not by who draws them.
//!
//! Every random choice in training (the reparameterisation noise of an example, a shard's order in
//! an epoch) is a pure function of a key such as `(seed, epoch, example, sample)`. Any process
//! draws the same numbers for the same key, in any order: the basis of docs/design.md §2.

/// SplitMix64's finaliser: a bijective 64-bit mixer with full avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hashes a key tuple into one 64-bit stream seed. Distinct domains (noise, shard order, ...) pass
/// distinct tags as the first key so their streams never coincide.
pub fn hash_key(parts: &[u64]) -> u64 {
    let mut h = 0x6a09_e667_f3bc_c908_u64; // sqrt(2) fraction bits: an arbitrary non-zero start
    for &p in parts {
        h = mix64(h ^ mix64(p.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    }
    h
}

/// A SplitMix64 stream started from a hashed key.
#[derive(Debug, Clone)]
pub struct KeyedRng {
    state: u64,
}

impl KeyedRng {
    pub fn new(parts: &[u64]) -> Self {
        KeyedRng {
            state: hash_key(parts),
        }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// Uniform in the open interval (0, 1), 53 random bits: never 0, so `ln` is finite.
    #[inline]
    pub fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n` by rejection (unbiased).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0) has no values");
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let r = self.next_u64();
            if r < zone {
                return r % n;
            }
        }
    }

    /// A pair of independent standard normals (Box-Muller). `ln`, `sqrt`, `sin` and `cos` are
    /// deterministic for the same build, which is all the invariant asks.
    #[inline]
    pub fn next_normal_pair(&mut self) -> (f64, f64) {
        let u1 = self.next_open01();
        let u2 = self.next_open01();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        (r * theta.cos(), r * theta.sin())
    }
}

/// Domain tags for [`hash_key`], so streams for different purposes never collide.
pub mod domain {
    pub const NOISE: u64 = 1;
    pub const SHARD_ORDER: u64 = 2;
    pub const INIT: u64 = 3;
    pub const SYNTHETIC: u64 = 4;
    pub const BENCH: u64 = 5;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_stream_different_key_different_stream() {
        let a: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(KeyedRng::new(&[1, 2, 3]), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(KeyedRng::new(&[1, 2, 3]), |r, _| Some(r.next_u64()))
            .collect();
        let c: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(KeyedRng::new(&[1, 2, 4]), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(hash_key(&[1, 2]), hash_key(&[2, 1]));
    }

    #[test]
    fn normals_have_unit_moments() {
        let mut rng = KeyedRng::new(&[7]);
        let n = 200_000;
        let (mut s, mut s2) = (0.0, 0.0);
        for _ in 0..n / 2 {
            let (a, b) = rng.next_normal_pair();
            s += a + b;
            s2 += a * a + b * b;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        // Standard errors: 1/sqrt(n) ~ 0.0022 for the mean, sqrt(2/n) ~ 0.0032 for the variance.
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.015, "variance {var}");
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = KeyedRng::new(&[9]);
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            seen[rng.below(7) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }
}
