//! Tensors on the wire: raw little-endian f32 bytes, converted at memcpy speed.

use bytes::Bytes;

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
    let n = bytes.len() / 4;
    out.resize(n, 0.0);
    bytemuck::cast_slice_mut::<f32, u8>(&mut out[..]).copy_from_slice(&bytes[..4 * n]);
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
}
