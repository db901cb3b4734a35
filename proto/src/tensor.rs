//! Tensors on the wire: raw little-endian f32 bytes, converted at memcpy speed.

use bytes::Bytes;
use common::train::Magnitude;

// The conversions below reinterpret native f32 bytes; on a big-endian host they would need a swap.
#[cfg(not(target_endian = "little"))]
compile_error!("the wire format is little-endian f32: add a byte swap for big-endian hosts");

/// `values` as little-endian bytes.
pub fn encode_f32(values: &[f32]) -> Bytes {
    Bytes::copy_from_slice(bytemuck::cast_slice(values))
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
