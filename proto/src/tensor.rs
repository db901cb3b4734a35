//! Tensors on the wire: raw little-endian f32 bytes, converted at memcpy speed.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use common::train::Magnitude;

// The conversions below reinterpret native f32 bytes; on a big-endian host they would need a swap.
#[cfg(not(target_endian = "little"))]
compile_error!("the wire format is little-endian f32: add a byte swap for big-endian hosts");

/// `values` as little-endian bytes.
pub fn encode_f32(values: &[f32]) -> Bytes {
    Bytes::copy_from_slice(bytemuck::cast_slice(values))
}

/// Buffers of values lent to messages as their [`Bytes`] without a copy, and given back here when
/// the last message holding them is dropped (once sent), so that a stream of tensors reuses a few
/// buffers. [`encode_f32`] would copy each 2.6 MB tensor of the default model into fresh bytes:
/// a worker's gradient on the TCP path, and the parameters the coordinator sends inline.
#[derive(Debug, Clone, Default)]
pub struct TensorPool(Arc<Mutex<Vec<Vec<f32>>>>);

/// Buffers a pool keeps; any given back beyond them are freed. A worker lends one or two a step,
/// the coordinator one, and each comes back within the step that sent it.
const POOL_KEEPS: usize = 4;

impl TensorPool {
    /// A buffer given back earlier (its length and values are whatever its last lender left), or
    /// an empty one.
    pub fn take(&self) -> Vec<f32> {
        lock(&self.0).pop().unwrap_or_default()
    }

    /// `values` as the little-endian bytes [`encode_f32`] makes, in their own memory; the buffer
    /// comes back to this pool when the last clone of the bytes is dropped (after the pool itself,
    /// it is freed).
    pub fn lend(&self, values: Vec<f32>) -> Bytes {
        Bytes::from_owner(Lent {
            values,
            pool: Arc::downgrade(&self.0),
        })
    }
}

/// A lent buffer: the owner of the [`Bytes`] that [`TensorPool::lend`] makes.
struct Lent {
    values: Vec<f32>,
    pool: Weak<Mutex<Vec<Vec<f32>>>>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.values)
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            let mut pool = lock(&pool);
            if pool.len() < POOL_KEEPS {
                pool.push(std::mem::take(&mut self.values));
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Little-endian bytes as f32 values, or `None` if the length is not a multiple of 4.
pub fn decode_f32(bytes: &[u8]) -> Option<Vec<f32>> {
    bytes
        .len()
        .is_multiple_of(4)
        .then(|| bytemuck::pod_collect_to_vec(bytes))
}

/// Little-endian bytes into `out` (resized; its allocation is reused). The length must be a
/// multiple of 4 (inline tensors are checked on decode); trailing bytes are ignored.
pub fn decode_f32_into(bytes: &[u8], out: &mut Vec<f32>) {
    // The measuring decode, for its choice of copy loop; the magnitude costs little beside it.
    decode_f32_measuring(bytes, out);
}

/// [`decode_f32_into`], measuring the values' [`Magnitude`] as they are copied (so checking a
/// gradient received inline needs no second pass over it).
pub fn decode_f32_measuring(bytes: &[u8], out: &mut Vec<f32>) -> Magnitude {
    out.resize(bytes.len() / 4, 0.0);
    match bytemuck::try_cast_slice::<u8, f32>(bytes) {
        // Whole values on 4-byte boundaries (as a message's field usually is, but need not be):
        // the measuring copy, which avoids `memcpy` where the two sides' line offsets differ.
        Ok(values) => Magnitude::copy_measuring(out, values),
        Err(_) => Magnitude::fill_measuring(out, |at, piece| {
            let src = &bytes[4 * at..4 * (at + piece.len())];
            bytemuck::cast_slice_mut::<f32, u8>(piece).copy_from_slice(src);
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_bit_for_bit_and_rejects_ragged_lengths() {
        let values = [
            0.0f32,
            -0.0,
            1.5,
            f32::MIN_POSITIVE,
            -3.25e-7,
            f32::MAX,
            f32::NAN,
        ];
        let bytes = encode_f32(&values);
        assert_eq!(&bytes[4..8], &(-0.0f32).to_le_bytes());
        let back = decode_f32(&bytes).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&values));
        // Unaligned input is fine too.
        let shifted: Vec<u8> = std::iter::once(0).chain(bytes.iter().copied()).collect();
        assert_eq!(bits(&decode_f32(&shifted[1..]).unwrap()), bits(&values));
        assert!(decode_f32(&[0, 0, 0]).is_none());
        let mut into = vec![9.0; 100];
        decode_f32_into(&shifted[1..], &mut into);
        assert_eq!(bits(&into), bits(&values));
    }

    /// Lent bytes are `encode_f32`'s, in the values' own memory, which comes back to the pool
    /// when the last clone is dropped; a full pool, or none, frees it instead.
    #[test]
    fn lent_tensors_are_encoded_without_a_copy_and_come_back() {
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).cos()).collect();
        let pool = TensorPool::default();
        assert!(pool.take().is_empty(), "a new pool has no buffers");
        let encoded = encode_f32(&values);
        let memory = values.as_ptr();
        let bytes = pool.lend(values);
        assert_eq!(bytes, encoded);
        assert_eq!(bytes.as_ptr(), memory.cast::<u8>(), "no copy");
        let clone = bytes.slice(4..);
        drop(bytes);
        assert!(pool.take().is_empty(), "a clone still holds the buffer");
        drop(clone);
        let back = pool.take();
        assert_eq!(
            (back.as_ptr(), back.len()),
            (memory, 1000),
            "the same buffer, as lent"
        );

        let lent: Vec<Bytes> = (0..POOL_KEEPS + 2)
            .map(|_| pool.lend(vec![1.0; 8]))
            .collect();
        drop(lent);
        let kept = std::iter::from_fn(|| Some(pool.take()).filter(|b| !b.is_empty())).count();
        assert_eq!(
            kept, POOL_KEEPS,
            "a pool keeps at most {POOL_KEEPS} buffers"
        );

        let orphan = pool.lend(vec![2.0; 8]);
        drop(pool);
        assert_eq!(orphan, encode_f32(&[2.0; 8]), "bytes outlive their pool");
    }

    /// The measuring decode gives the same values, and the magnitude of all of them: across
    /// pieces, from unaligned bytes, with the outlier in the last, partial piece.
    #[test]
    fn a_measuring_decode_sees_every_value() {
        let n = 2 * 2048 + 3;
        for outlier in [-1e30f32, f32::NAN, f32::INFINITY] {
            let mut values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).sin()).collect();
            values[n - 1] = outlier;
            let bytes = encode_f32(&values);
            // Byte offsets that are and are not whole values, as a message's buffer may be.
            for shift in 0..8 {
                let shifted: Vec<u8> = std::iter::repeat_n(0, shift)
                    .chain(bytes.iter().copied())
                    .collect();
                let mut out = vec![7.0; 3];
                let magnitude = decode_f32_measuring(&shifted[shift..], &mut out);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&out), bits(&values), "{outlier}, shift {shift}");
                assert_eq!(
                    magnitude,
                    Magnitude::of(&values),
                    "{outlier}, shift {shift}"
                );
                assert!(!magnitude.is_within(1e29), "{outlier}: outlier missed");
            }
        }
        assert_eq!(
            decode_f32_measuring(&[], &mut vec![1.0]),
            Magnitude::default()
        );
    }
}
