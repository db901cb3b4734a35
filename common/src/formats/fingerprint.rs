//! A model's fingerprint: the SHA-256 of its parameters, to compare runs bit for bit.
//!
//! The hash covers the flat parameter vector as little-endian f32 bytes, in
//! [`ParamLayout`](crate::model::ParamLayout) storage order: for each linear layer its weight
//! (`[out, in]`, row-major) then its bias, layers in the order encoder hidden layers, mean head,
//! log-variance head, decoder hidden layers, decoder output layer (for the default model: `fc1`,
//! `fc21`, `fc22`, `fc3`, `fc4`). The same model trained with 1 or 8 workers has the same
//! fingerprint; one flipped bit anywhere (including `-0.0` for `0.0`) changes it.
//!
//! The data section of `model.safetensors` is these same bytes, so
//! `hashlib.sha256(struct.pack('<%df' % n, *params))` in Python gives the same hex string.

use sha2::{Digest, Sha256};

/// Parameters hashed per `update` call: bounds the staging buffer at 16 KiB.
const BATCH: usize = 4096;

/// Lower-case hex SHA-256 of `params` as little-endian f32 bytes (64 characters).
///
/// ```
/// // python3 -c "import hashlib; print(hashlib.sha256(b'').hexdigest())"
/// assert_eq!(
///     common::formats::fingerprint(&[]),
///     "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
/// );
/// ```
pub fn fingerprint(params: &[f32]) -> String {
    hex::encode(sha256_f32(params))
}

/// The raw SHA-256 digest of `values` as little-endian f32 bytes.
pub(crate) fn sha256_f32(values: &[f32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut bytes = Vec::with_capacity(BATCH * 4);
    for batch in values.chunks(BATCH) {
        bytes.clear();
        bytes.extend(batch.iter().flat_map(|x| x.to_le_bytes()));
        hasher.update(&bytes);
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python_hashlib() {
        // python3 -c "import hashlib, struct
        // v = [0.0, 1.0, -2.5, 0.1, -0.0, 3.4028234663852886e38, 1e-45]
        // print(hashlib.sha256(struct.pack('<%df' % len(v), *v)).hexdigest())"
        // (0.1 packs to the nearest f32, as `0.1_f32`; 1e-45 packs to the smallest subnormal.)
        let v = [0.0, 1.0, -2.5, 0.1, -0.0, f32::MAX, f32::from_bits(1)];
        assert_eq!(
            fingerprint(&v),
            "05824cfe0abc83659ac009fe4d6d6ca49df1da1b683c74898282e7378ab1d247"
        );
    }

    #[test]
    fn matches_python_hashlib_across_batches() {
        // python3 -c "import hashlib, struct
        // print(hashlib.sha256(struct.pack('<10000f', *[i*0.5 for i in range(10000)])).hexdigest())"
        let v: Vec<f32> = (0..10_000).map(|i| i as f32 * 0.5).collect();
        assert_eq!(
            fingerprint(&v),
            "455e911c884d528ea4b200bf354b4593d244ca2b9df0c5ceb4cc5787038f4375"
        );
    }

    #[test]
    fn distinguishes_signed_zeros() {
        assert_ne!(fingerprint(&[0.0]), fingerprint(&[-0.0]));
    }
}
